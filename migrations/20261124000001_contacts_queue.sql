-- Per-contact order stored, not probed: contact_sync.contacts is the queue of contacts with open
-- work (one row per contact with a pending or running job), and the jobs table is each contact's
-- ordered log. A claim reads the ready contacts of an account in (run_at, head_id) order from one
-- partial index and stops after its batch: contacts with a call in flight are not in that index,
-- and a contact whose head is scheduled later sits past `now()`. Nothing else is read.
--
-- Who writes a contact row, and the locks that keep it exact:
-- * Producers (any INSERT into jobs, through the statement trigger below) only ever insert a new
--   row (ON CONFLICT DO NOTHING) or take FOR KEY SHARE on an existing one, which keeps a worker
--   from deleting it until the producer commits. They never wait for a worker's row lock except a
--   delete in progress, and workers never wait for a producer: a producer's open transaction
--   cannot stall the queue.
-- * Workers and operator commands (claim, completion, retry, release, rescue, cancel, retry from
--   dead, coalescing, deletes) lock the row first and only then read the jobs (a fresh snapshot
--   in a later statement), so what they write reflects every committed change. A row they cannot
--   delete because a producer holds it is left with head_id NULL ("read again"); the worker's
--   sweep reads such rows again once the producer is done.
-- * The unique index on running contacts still makes the database refuse two calls in flight.

CREATE TABLE contact_sync.contacts (
    -- provider:account:lower(email), as jobs.contact_key
    contact_key text        PRIMARY KEY,
    account     text        NOT NULL,
    -- the running job, or else the first pending job (by id); NULL: to be read again
    head_id     bigint,
    -- the pending head's run_at
    run_at      timestamptz,
    running     boolean     NOT NULL DEFAULT false
);

COMMENT ON TABLE contact_sync.contacts IS 'contact-sync: contacts with open work, the queue claims read (maintained by triggers on contact_sync.jobs)';

-- The claim's index: ready contacts per account in delivery order.
CREATE INDEX contacts_ready_idx ON contact_sync.contacts (account, run_at, head_id)
    WHERE head_id IS NOT NULL AND NOT running;
-- Rows to read again (rare: a producer held the row while its last job finished).
CREATE INDEX contacts_reread_idx ON contact_sync.contacts (contact_key) WHERE head_id IS NULL;
-- Rows come and go with every job: vacuum often so the claim index stays tight.
ALTER TABLE contact_sync.contacts SET (autovacuum_vacuum_scale_factor = 0.02, autovacuum_vacuum_threshold = 500,
                                       autovacuum_vacuum_cost_delay = 0);

-- Contacts whose row another transaction held when a change of their jobs had to be reflected
-- (an operator's or application's open transaction that updated a job): the sweep refreshes them
-- later. Insert-only, no unique key, so recording one never waits.
CREATE TABLE contact_sync.contacts_dirty (
    contact_key text        NOT NULL,
    noted_at    timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX contacts_dirty_key_idx ON contact_sync.contacts_dirty (contact_key);

-- Brings the rows of these contacts in line with their jobs. Locks first, then reads (each
-- PL/pgSQL statement takes a fresh snapshot under READ COMMITTED): rows no one else holds are
-- locked FOR UPDATE and may be deleted; rows a producer holds (FOR KEY SHARE) are locked FOR NO
-- KEY UPDATE and, when they look empty, are only marked to be read again; rows another
-- transaction has locked are never waited for: they are noted in contacts_dirty for the sweep.
-- Under REPEATABLE READ or SERIALIZABLE the snapshot is the transaction's, older than the locks:
-- then the rows are only marked to be read again (by the sweep, under READ COMMITTED).
CREATE FUNCTION contact_sync.refresh_contacts(keys text[]) RETURNS void
LANGUAGE plpgsql AS $fn$
DECLARE
    strong text[];
    weak text[];
BEGIN
    IF keys IS NULL OR cardinality(keys) = 0 THEN
        RETURN;
    END IF;
    IF current_setting('transaction_isolation') <> 'read committed' THEN
        INSERT INTO contact_sync.contacts AS c (contact_key, account, head_id, run_at, running)
        SELECT DISTINCT k, split_part(k, ':', 2), NULL::bigint, NULL::timestamptz, false FROM unnest(keys) k
        ORDER BY 1
        ON CONFLICT (contact_key) DO UPDATE SET head_id = NULL, run_at = NULL, running = false;
        RETURN;
    END IF;
    SELECT coalesce(array_agg(s.contact_key), '{}') INTO strong FROM (
        SELECT c.contact_key FROM contact_sync.contacts c
        WHERE c.contact_key = ANY(keys) ORDER BY c.contact_key FOR UPDATE SKIP LOCKED) s;
    weak := '{}';
    IF cardinality(strong) < cardinality(keys) THEN
        -- held by a producer (compatible), or locked by another transaction (skipped)
        SELECT coalesce(array_agg(s.contact_key), '{}') INTO weak FROM (
            SELECT c.contact_key FROM contact_sync.contacts c
            WHERE c.contact_key = ANY(keys) AND c.contact_key NOT IN (SELECT unnest(strong))
            ORDER BY c.contact_key FOR NO KEY UPDATE SKIP LOCKED) s;
        -- rows that exist but could not be locked: for the sweep
        INSERT INTO contact_sync.contacts_dirty (contact_key)
        SELECT c.contact_key FROM contact_sync.contacts c
        WHERE c.contact_key = ANY(keys)
          AND c.contact_key NOT IN (SELECT unnest(strong) UNION ALL SELECT unnest(weak));
    END IF;
    WITH k AS (
        -- the rows locked above, and contacts that have no row
        SELECT DISTINCT key FROM unnest(keys) AS key
        WHERE key IN (SELECT unnest(strong) UNION ALL SELECT unnest(weak))
           OR NOT EXISTS (SELECT 1 FROM contact_sync.contacts c WHERE c.contact_key = key)
    ), s AS (
        SELECT k.key, r.id AS running_id, r.account AS running_account,
               p.id AS pending_id, p.run_at, p.account AS pending_account
        FROM k
        LEFT JOIN LATERAL (SELECT j.id, j.account FROM contact_sync.jobs j
                           WHERE j.contact_key = k.key AND j.state = 'running' LIMIT 1) r ON true
        LEFT JOIN LATERAL (SELECT j.id, j.run_at, j.account FROM contact_sync.jobs j
                           WHERE j.contact_key = k.key AND j.state = 'pending' ORDER BY j.id LIMIT 1) p ON true
    ), upserted AS (
        INSERT INTO contact_sync.contacts AS c (contact_key, account, head_id, run_at, running)
        SELECT s.key, coalesce(s.running_account, s.pending_account), coalesce(s.running_id, s.pending_id),
               CASE WHEN s.running_id IS NULL THEN s.run_at END, s.running_id IS NOT NULL
        FROM s WHERE s.running_id IS NOT NULL OR s.pending_id IS NOT NULL
        ORDER BY s.key
        ON CONFLICT (contact_key) DO UPDATE
            SET head_id = EXCLUDED.head_id, run_at = EXCLUDED.run_at, running = EXCLUDED.running
            WHERE (c.head_id, c.run_at, c.running) IS DISTINCT FROM (EXCLUDED.head_id, EXCLUDED.run_at, EXCLUDED.running)
    ), empty AS (
        SELECT s.key FROM s WHERE s.running_id IS NULL AND s.pending_id IS NULL
    ), deleted AS (
        -- = ANY(ARRAY(...)): primary-key probes, never a scan of the table
        DELETE FROM contact_sync.contacts c
        WHERE c.contact_key = ANY(ARRAY(SELECT e.key FROM empty e WHERE e.key IN (SELECT unnest(strong))))
    )
    UPDATE contact_sync.contacts c
    SET head_id = NULL, run_at = NULL, running = false
    WHERE c.contact_key = ANY(ARRAY(SELECT e.key FROM empty e WHERE e.key IN (SELECT unnest(weak))))
      AND (c.head_id IS NOT NULL OR c.running);
END
$fn$;

-- After loading jobs with triggers off (pg_restore --disable-triggers, a replica role):
-- SELECT contact_sync.rebuild_contacts(); rebuilds the queue from the open jobs.
CREATE FUNCTION contact_sync.rebuild_contacts() RETURNS void
LANGUAGE plpgsql AS $fn$
BEGIN
    PERFORM contact_sync.refresh_contacts(ARRAY(
        SELECT DISTINCT contact_key FROM contact_sync.jobs WHERE state IN ('pending', 'running')
        UNION
        SELECT contact_key FROM contact_sync.contacts));
END
$fn$;

-- Producers: a new contact gets its row (head: its first new job); an existing row is held
-- FOR KEY SHARE until commit, so no worker deletes it under the new job, which queues behind the
-- contact's head. A row deleted between the two steps is inserted on the next pass.
CREATE OR REPLACE FUNCTION contact_sync.jobs_after_insert() RETURNS trigger
LANGUAGE plpgsql AS $fn$
DECLARE
    todo text[];
BEGIN
    PERFORM 1 FROM new_jobs n WHERE NOT contact_sync.validate_job(n.provider, n.email, n.payload);
    PERFORM contact_sync.reject('contact_sync: run_at must be a finite time, got ' || n.run_at::text,
                                'pass a timestamp (or omit run_at for now)', to_jsonb(n.id))
    FROM new_jobs n WHERE NOT isfinite(n.run_at);
    IF current_setting('transaction_isolation') <> 'read committed' THEN
        -- hold the rows that exist first: an INSERT that meets a row version this snapshot
        -- cannot see would fail with a serialization error, a lock on it does not
        PERFORM 1 FROM (
            SELECT c.contact_key FROM contact_sync.contacts c
            WHERE c.contact_key = ANY(ARRAY(SELECT DISTINCT n.contact_key FROM new_jobs n
                                            WHERE n.state IN ('pending', 'running')))
            ORDER BY c.contact_key FOR KEY SHARE) s;
    END IF;
    todo := ARRAY(SELECT DISTINCT n.contact_key FROM new_jobs n WHERE n.state IN ('pending', 'running'));
    FOR pass IN 1..10 LOOP
        EXIT WHEN cardinality(todo) = 0;
        -- a new contact: its row, head = its first new job (one set-based insert)
        WITH first AS (
            SELECT DISTINCT ON (n.contact_key) n.contact_key, n.account, n.id, n.run_at, n.state
            FROM new_jobs n
            WHERE n.contact_key IN (SELECT unnest(todo)) AND n.state IN ('pending', 'running')
            ORDER BY n.contact_key, (n.state = 'running') DESC, n.id
        ), ins AS (
            INSERT INTO contact_sync.contacts (contact_key, account, head_id, run_at, running)
            SELECT f.contact_key, f.account, f.id, CASE WHEN f.state = 'pending' THEN f.run_at END, f.state = 'running'
            FROM first f ORDER BY f.contact_key
            ON CONFLICT (contact_key) DO NOTHING
            RETURNING contact_key
        )
        SELECT ARRAY(SELECT unnest(todo) EXCEPT SELECT contact_key FROM ins) INTO todo;
        EXIT WHEN cardinality(todo) = 0;
        -- a contact that already has a row: hold it until commit (deleted meanwhile: next pass)
        SELECT ARRAY(SELECT unnest(todo) EXCEPT SELECT s.contact_key FROM (
            SELECT c.contact_key FROM contact_sync.contacts c
            WHERE c.contact_key = ANY(todo) ORDER BY c.contact_key FOR KEY SHARE) s) INTO todo;
    END LOOP;
    IF cardinality(todo) > 0 THEN
        -- only after ten deletes of one row in a row: read those contacts again
        PERFORM contact_sync.refresh_contacts(todo);
    END IF;
    PERFORM pg_notify('contact_sync_jobs', '');
    RETURN NULL;
END
$fn$;

-- After each updating statement: refresh the contacts of the jobs it left pending, or moved out
-- of an open state. A claim (pending -> running) keeps its contacts itself; lease renewals and
-- edits of finished jobs change nothing.
CREATE FUNCTION contact_sync.jobs_after_update() RETURNS trigger
LANGUAGE plpgsql AS $fn$
BEGIN
    -- (no join of the two transition tables: they have no statistics and a nested loop over
    -- them is quadratic in the batch)
    PERFORM contact_sync.refresh_contacts(ARRAY(
        SELECT n.contact_key FROM new_jobs n
        WHERE n.state = 'pending'
           OR (n.state <> 'running' AND n.id IN (SELECT o.id FROM old_jobs o WHERE o.state IN ('pending', 'running')))
        UNION
        -- an open job that left its contact (its address edited by hand)
        SELECT o.contact_key FROM old_jobs o
        WHERE o.state IN ('pending', 'running') AND o.contact_key NOT IN (SELECT n.contact_key FROM new_jobs n)));
    RETURN NULL;
END
$fn$;

CREATE TRIGGER jobs_after_update AFTER UPDATE ON contact_sync.jobs
    REFERENCING OLD TABLE AS old_jobs NEW TABLE AS new_jobs
    FOR EACH STATEMENT EXECUTE FUNCTION contact_sync.jobs_after_update();

CREATE FUNCTION contact_sync.jobs_after_delete() RETURNS trigger
LANGUAGE plpgsql AS $fn$
BEGIN
    PERFORM contact_sync.refresh_contacts(ARRAY(
        SELECT DISTINCT o.contact_key FROM old_jobs o WHERE o.state IN ('pending', 'running')));
    RETURN NULL;
END
$fn$;

CREATE TRIGGER jobs_after_delete AFTER DELETE ON contact_sync.jobs
    REFERENCING OLD TABLE AS old_jobs
    FOR EACH STATEMENT EXECUTE FUNCTION contact_sync.jobs_after_delete();

-- TRUNCATE empties the queue too.
CREATE FUNCTION contact_sync.jobs_after_truncate() RETURNS trigger
LANGUAGE plpgsql AS $fn$
BEGIN
    DELETE FROM contact_sync.contacts;
    RETURN NULL;
END
$fn$;

CREATE TRIGGER jobs_after_truncate AFTER TRUNCATE ON contact_sync.jobs
    FOR EACH STATEMENT EXECUTE FUNCTION contact_sync.jobs_after_truncate();

-- Claims no longer scan jobs by account: the per-account pending index only cost inserts.
DROP INDEX contact_sync.jobs_pending_idx;

-- Addresses are checked on every insert: the same rule without the bounded repetition
-- (`{1,64}`), which the regular-expression engine expands into a large automaton.
CREATE OR REPLACE FUNCTION contact_sync.email_is_valid(e text) RETURNS boolean
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $fn$
SELECT e IS NOT NULL AND length(e) <= 254
   AND strpos(e, '@') BETWEEN 2 AND 65
   AND e ~ '^[^@]+@[^@.]+(\.[^@.]+)+$'
   AND e !~ '[\x01-\x20\x7f-\xa0\u00ad\u034f\u0600-\u0605\u061c\u06dd\u070f\u0890-\u0891\u08e2\u115f-\u1160\u1680\u17b4-\u17b5\u180b-\u180f\u2000-\u200f\u2028-\u202f\u205f-\u206f\u3000\u3164\ufe00-\ufe0f\ufeff\uffa0\ufff9-\ufffb\U000110bd\U000110cd\U00013430-\U0001343f\U0001bca0-\U0001bca3\U0001d173-\U0001d17a\U000e0000-\U000e0fff<>()\[\],;:\\"]'
   AND e !~ '^\.|\.@|\.\.[^@]*@'
$fn$;

-- The queue of the jobs already open when this migration runs.
SELECT contact_sync.refresh_contacts(ARRAY(
    SELECT DISTINCT contact_key FROM contact_sync.jobs WHERE state IN ('pending', 'running')));
