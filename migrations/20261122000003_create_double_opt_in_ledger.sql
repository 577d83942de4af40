-- Smartlink sends at most one confirmation email per API key and address per hour. The ledger
-- records the confirmation-triggering calls, shared by every worker, timed by the database clock.
CREATE TABLE contact_sync.doi_ledger (
    -- md5 of the API key: the key itself never reaches the database.
    api_key_id text        NOT NULL,
    -- lower-cased address
    email      text        NOT NULL,
    sent_at    timestamptz NOT NULL,
    job_id     bigint,
    PRIMARY KEY (api_key_id, email)
);

-- Pending-status re-sends postponed by the "defer" policy until the window ends.
CREATE TABLE contact_sync.doi_deferred (
    -- the job whose call was sent without the status
    job_id     bigint      PRIMARY KEY,
    -- the newest job merged into that call: a later status supersedes the re-send
    covers_id  bigint      NOT NULL,
    provider   text        NOT NULL,
    account    text        NOT NULL,
    email      text        NOT NULL,
    payload    jsonb       NOT NULL,
    due_at     timestamptz NOT NULL
);
CREATE INDEX doi_deferred_due_idx ON contact_sync.doi_deferred (due_at);
