-- Limits that hold across replicas, with Postgres as the only coordinator.
--
-- contact_sync.accounts: one row per provider account, shared by every worker of the database.
-- * Workers register the accounts they serve at start-up (provider and configured limits).
-- * The token bucket (rate_per_second, burst, tokens, refilled_at) and max_in_flight are taken
--   in the claim transaction of a limited account, under this row's lock: claims of one limited
--   account are serialized fleet-wide, the count of its running jobs is read after the lock
--   (a fresh snapshot), so no two workers can spend the same token or slot.
-- * throttled_until: a provider's throttle answer (HTTP 429 Retry-After, JustClick code 8)
--   pauses the account for every worker. paused_at: an operator's pause, until resumed.
--   No claim takes a job of a paused account.
CREATE TABLE contact_sync.accounts (
    account         text             PRIMARY KEY,
    -- as the workers that serve it configure it (NULL until one has registered)
    provider        text,
    rate_per_second double precision CHECK (rate_per_second > 0 AND rate_per_second < 'Infinity'),
    burst           double precision CHECK (burst >= 1 AND burst < 'Infinity'),
    max_in_flight   integer          CHECK (max_in_flight >= 1),
    tokens          double precision NOT NULL DEFAULT 0,
    refilled_at     timestamptz      NOT NULL DEFAULT now(),
    -- finite: an endless pause is an operator's (paused_at), ended by `accounts resume`
    throttled_until timestamptz      CHECK (isfinite(throttled_until)),
    throttle_reason text,
    paused_at       timestamptz,
    pause_reason    text,
    -- who paused it: an operator (`accounts pause`), or a worker whose credentials the provider
    -- refused (ended by the next worker start, which may bring a corrected configuration)
    paused_by       text             CHECK (paused_by IN ('operator', 'credentials')),
    registered_at   timestamptz      NOT NULL DEFAULT now(),
    updated_at      timestamptz      NOT NULL DEFAULT now()
);

COMMENT ON TABLE contact_sync.accounts IS 'contact-sync: provider accounts, their fleet-wide limits and pauses';

-- Live replicas: each worker's id, where it runs, what it serves, and its heartbeat.
CREATE TABLE contact_sync.workers (
    id           text        PRIMARY KEY,
    host         text        NOT NULL,
    pid          integer     NOT NULL,
    accounts     text[]      NOT NULL,
    concurrency  integer     NOT NULL,
    started_at   timestamptz NOT NULL DEFAULT now(),
    heartbeat_at timestamptz NOT NULL DEFAULT now(),
    -- past this, the replica is gone (killed, partitioned): it drops out of the registry
    expires_at   timestamptz NOT NULL
);

COMMENT ON TABLE contact_sync.workers IS 'contact-sync: live worker replicas (heartbeat registry)';

-- Calls in flight per account, read by the claim of an account with max_in_flight.
CREATE INDEX jobs_running_account_idx ON contact_sync.jobs (account) WHERE state = 'running';

-- Accounts that already have jobs get their row now (no limits until a worker registers them).
INSERT INTO contact_sync.accounts (account, provider)
SELECT DISTINCT ON (account) account, provider FROM contact_sync.jobs ORDER BY account, id DESC
ON CONFLICT DO NOTHING;

-- A job for a known account must name the account's provider: `enqueue('justclick', 'sl_main',
-- ...)` is refused at once instead of going dead later. Fires before the queue's own insert
-- trigger (triggers fire in name order).
CREATE FUNCTION contact_sync.jobs_check_account_provider() RETURNS trigger
LANGUAGE plpgsql AS $fn$
BEGIN
    PERFORM contact_sync.reject(
        format('contact_sync: account %s is a %s account, not %s', quote_literal(n.account), a.provider, n.provider),
        format('enqueue it with provider %s, or name one of the %s accounts', quote_literal(a.provider), n.provider),
        to_jsonb(n.id))
    FROM new_jobs n JOIN contact_sync.accounts a ON a.account = n.account
    WHERE a.provider IS NOT NULL AND a.provider <> n.provider;
    RETURN NULL;
END
$fn$;

CREATE TRIGGER jobs_account_check AFTER INSERT ON contact_sync.jobs
    REFERENCING NEW TABLE AS new_jobs
    FOR EACH STATEMENT EXECUTE FUNCTION contact_sync.jobs_check_account_provider();
