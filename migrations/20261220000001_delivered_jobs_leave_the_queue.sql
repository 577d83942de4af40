-- Delivered changes leave the queue's table at completion (issue 25: keep only open work in
-- the hot table). A job delivered without an idempotency key is deleted from
-- `contact_sync.jobs` and written to `contact_sync.jobs_delivered`, a child table of it: every
-- `SELECT ... FROM contact_sync.jobs` (the commands, the console, an operator's SQL, a
-- monitoring query) still sees it, while the worker's statements (`FROM ONLY`, or a state the
-- child's CHECK rules out) read and index only open work.
--
-- Why (measured on the development cluster, 100,000 running jobs completed 256 at a time, the
-- backend's CPU): marking a job `succeeded` in place costs 15-20 µs, since no update of a job is
-- HOT (`state` is in every partial index's predicate) and the finished row stays in the hot
-- table's heap and primary key until retention; deleting it and inserting it here costs 9-14
-- µs. The hot table then holds only open work, so the claims' index scans, vacuum and
-- retention no longer walk delivered rows there.
--
-- Jobs with an idempotency key stay in `contact_sync.jobs` when delivered: the unique index
-- that makes a repeated key return the existing job is on that table, and must keep seeing
-- them until retention deletes them (as before).
--
-- Upgrade with workers running: old workers go on marking jobs `succeeded` in place, which
-- every reader and retention still handle; delivered jobs move here once the new binary runs.
-- This migration moves the delivered jobs already in the table, in one statement under the
-- migration's lock (about 2 s per million delivered jobs on the development machine).

-- The queue's CHECK constraints are its own (NO INHERIT): a delivered job is written once by
-- the worker from a row that passed them, and checked by the rules below on a hand UPDATE.
DO $migration$
DECLARE
    v_sql text;
BEGIN
    SELECT 'ALTER TABLE ONLY contact_sync.jobs '
           || string_agg(format('DROP CONSTRAINT %I, ADD CONSTRAINT %I %s NO INHERIT',
                                c.conname, c.conname, pg_get_constraintdef(c.oid)), ', ' ORDER BY c.conname)
    INTO v_sql
    FROM pg_constraint c
    WHERE c.conrelid = 'contact_sync.jobs'::regclass AND c.contype = 'c' AND NOT c.connoinherit;
    IF v_sql IS NOT NULL THEN
        EXECUTE v_sql;
    END IF;
END
$migration$;

CREATE TABLE contact_sync.jobs_delivered (
    -- (what lets the planner leave this table out of every statement that names an open state)
    CONSTRAINT jobs_delivered_state_check CHECK (state IN ('succeeded', 'coalesced')),
    CONSTRAINT jobs_delivered_without_key CHECK (idempotency_key IS NULL)
) INHERITS (contact_sync.jobs);

ALTER TABLE contact_sync.jobs_delivered ADD PRIMARY KEY (id);
-- retention, oldest first, and "last finished"
CREATE INDEX jobs_delivered_finished_idx ON contact_sync.jobs_delivered (finished_at);

COMMENT ON TABLE contact_sync.jobs_delivered IS
    'contact-sync: delivered jobs without an idempotency key (succeeded, coalesced), moved here from contact_sync.jobs at completion; a child table of it: SELECT ... FROM contact_sync.jobs includes them';

-- A hand UPDATE of a delivered job (the worker never updates one) is held to the queue's value
-- rules, and cannot make it open again: a row of this table cannot move back to the queue.
CREATE FUNCTION contact_sync.jobs_delivered_before_update() RETURNS trigger
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $fn$
BEGIN
    IF NEW.state IS DISTINCT FROM OLD.state AND NEW.state IS DISTINCT FROM 'succeeded'
       AND NEW.state IS DISTINCT FROM 'coalesced' THEN
        RAISE EXCEPTION USING ERRCODE = '22023',
            MESSAGE = format('contact_sync: job %s was delivered; it cannot become %s', OLD.id,
                             coalesce(quote_literal(NEW.state), 'NULL')),
            HINT = 'to send its change again, enqueue it anew (contact_sync.enqueue or contact-sync enqueue)';
    END IF;
    IF NEW.idempotency_key IS NOT NULL THEN
        RAISE EXCEPTION USING ERRCODE = '22023',
            MESSAGE = format('contact_sync: job %s was delivered without an idempotency key; it cannot be given one', OLD.id),
            HINT = 'enqueue the change anew with the key';
    END IF;
    IF NOT (NEW.run_at > '-infinity' AND NEW.run_at < '10000-01-01 00:00:00+00')
       OR NOT (NEW.created_at > '-infinity' AND NEW.created_at < '10000-01-01 00:00:00+00')
       OR NOT (NEW.locked_until IS NULL OR (NEW.locked_until > '-infinity' AND NEW.locked_until < '10000-01-01 00:00:00+00'))
       OR NOT (NEW.finished_at IS NULL OR (NEW.finished_at > '-infinity' AND NEW.finished_at < '10000-01-01 00:00:00+00')) THEN
        RAISE EXCEPTION USING ERRCODE = '22023',
            MESSAGE = format('contact_sync: job %s: its times must be finite and before the year 10000', OLD.id),
            HINT = 'pass a timestamp';
    END IF;
    IF NEW.attempts < 0 OR NEW.attempts > 999999 THEN
        RAISE EXCEPTION USING ERRCODE = '22023',
            MESSAGE = format('contact_sync: attempts must be between 0 and 999999, got %s', NEW.attempts),
            HINT = 'leave attempts as the worker set it';
    END IF;
    IF jsonb_typeof(NEW.errors) IS DISTINCT FROM 'array' THEN
        RAISE EXCEPTION USING ERRCODE = '22023',
            MESSAGE = format('contact_sync: errors must be a JSON array, got %s', coalesce(jsonb_typeof(NEW.errors), 'NULL')),
            HINT = 'leave errors as the worker set it';
    END IF;
    RETURN NEW;
END
$fn$;

CREATE TRIGGER jobs_delivered_validate_update BEFORE UPDATE ON contact_sync.jobs_delivered
    FOR EACH ROW EXECUTE FUNCTION contact_sync.jobs_delivered_before_update();

-- The jobs already delivered.
WITH moved AS (
    DELETE FROM ONLY contact_sync.jobs
    WHERE state IN ('succeeded', 'coalesced') AND idempotency_key IS NULL
    RETURNING *
)
INSERT INTO contact_sync.jobs_delivered
    (id, provider, account, email, payload, idempotency_key, state, attempts, max_attempts, run_at,
     created_at, locked_until, locked_by, finished_at, last_error, errors, coalesced_into, doi,
     resend_after, outcome, overtaken_by, waits_for)
SELECT id, provider, account, email, payload, idempotency_key, state, attempts, max_attempts, run_at,
       created_at, locked_until, locked_by, finished_at, last_error, errors, coalesced_into, doi,
       resend_after, outcome, overtaken_by, waits_for
FROM moved;
