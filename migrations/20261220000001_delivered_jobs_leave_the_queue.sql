-- Delivered changes leave the queue's table at completion (issue 25: keep only open work in
-- the hot table). A job delivered without an idempotency key is deleted from
-- `contact_sync.jobs` and written to `contact_sync.jobs_delivered`, a child table of it: every
-- `SELECT ... FROM contact_sync.jobs` (the commands, the console, an operator's SQL, a
-- monitoring query) still sees it, while the worker's statements (`FROM ONLY`, or a state the
-- child's CHECK rules out) read and index only open work.
--
-- Why: no update of a job is HOT (`state` is in every partial index's predicate), so marking
-- it `succeeded` in place wrote a new row version and index entries into the hot table, which
-- stayed there until retention. The hot table now holds only open and parked work: the claims'
-- index scans, vacuum and retention no longer walk delivered rows there.
--
-- Jobs with an idempotency key stay in `contact_sync.jobs` when delivered: the unique index
-- that makes a repeated key return the existing job is on that table, and must keep seeing
-- them until retention deletes them (as before).
--
-- Upgrade with workers running: old workers go on marking jobs `succeeded` in place, which
-- every reader and retention still handle; delivered jobs move here once the new binary runs.
-- This migration moves the delivered jobs already in the table, in one statement under the
-- migration's lock (about 9 s per million delivered jobs on the development machine).

-- A foreign key from another table to `contact_sync.jobs(id)` would make every completion fail
-- (the delivered job's row is deleted from this table): refused, with what to do.
DO $migration$
DECLARE
    v_fk text;
BEGIN
    SELECT string_agg(format('%s on %s', c.conname, c.conrelid::regclass), ', ') INTO v_fk
    FROM pg_constraint c
    WHERE c.contype = 'f' AND c.confrelid = 'contact_sync.jobs'::regclass;
    IF v_fk IS NOT NULL THEN
        RAISE EXCEPTION USING ERRCODE = '55000',
            MESSAGE = format('contact_sync: foreign keys reference contact_sync.jobs: %s', v_fk),
            HINT = 'a job''s row leaves contact_sync.jobs when it is delivered (and at retention): drop these constraints and keep job ids as plain bigint columns, then migrate again';
    END IF;
END
$migration$;

-- The child inherits the queue's CHECK constraints (every reader's rules hold for every row,
-- on every path: triggers off, a restore, a hand UPDATE). Its own: a delivered state and no
-- idempotency key, each twice: in a form that raises a message without the row's contents
-- (checked first: Postgres checks a table's constraints in the order of their names), and in
-- the plain form the planner reads to leave this table out of every statement that names an
-- open state, or a key.
CREATE TABLE contact_sync.jobs_delivered (
    CONSTRAINT jobs_delivered_check_state CHECK (CASE WHEN state IN ('succeeded', 'coalesced') THEN true
        ELSE contact_sync.reject('contact_sync: a row of contact_sync.jobs_delivered is succeeded or coalesced, got '
                                 || coalesce(quote_literal(state), 'NULL'),
                                 'a delivered job stays delivered: to send its change again, enqueue it anew', NULL) END),
    CONSTRAINT jobs_delivered_check_key CHECK (CASE WHEN idempotency_key IS NULL THEN true
        -- (the message names a value of the row: a constant call would be evaluated, and
        -- raise, whenever the planner reads the constraint)
        ELSE contact_sync.reject('contact_sync: a row of contact_sync.jobs_delivered has no idempotency key, got one of '
                                 || length(idempotency_key) || ' characters',
                                 'jobs with a key stay in the queue''s own table: enqueue the change anew with the key', NULL) END),
    CONSTRAINT jobs_delivered_planner_state CHECK (state IN ('succeeded', 'coalesced')),
    CONSTRAINT jobs_delivered_planner_key CHECK (idempotency_key IS NULL)
) INHERITS (contact_sync.jobs);

ALTER TABLE contact_sync.jobs_delivered ADD PRIMARY KEY (id);
-- retention, oldest first, and "last finished"
CREATE INDEX jobs_delivered_finished_idx ON contact_sync.jobs_delivered (finished_at);

COMMENT ON TABLE contact_sync.jobs_delivered IS
    'contact-sync: delivered jobs without an idempotency key (succeeded, coalesced), moved here from contact_sync.jobs at completion; a child table of it: SELECT ... FROM contact_sync.jobs includes them';

-- A hand UPDATE that would reopen a delivered job says so, with the job's id (the CHECKs
-- above refuse it too, without the id).
CREATE FUNCTION contact_sync.jobs_delivered_before_update() RETURNS trigger
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $fn$
BEGIN
    IF NEW.state IS DISTINCT FROM 'succeeded' AND NEW.state IS DISTINCT FROM 'coalesced' THEN
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
    RETURN NEW;
END
$fn$;

CREATE TRIGGER jobs_delivered_validate_update BEFORE UPDATE OF state, idempotency_key ON contact_sync.jobs_delivered
    FOR EACH ROW EXECUTE FUNCTION contact_sync.jobs_delivered_before_update();

-- A job queued with an id a delivered job already has would be delivered over that job's
-- record: refused at the insert, with what to do (the primary keys are per table). The insert
-- trigger as of migration 20261219000001, with that check first.
CREATE OR REPLACE FUNCTION contact_sync.jobs_after_insert() RETURNS trigger
    LANGUAGE plpgsql
    SET search_path TO 'pg_catalog', 'pg_temp'
    SET plan_cache_mode TO 'force_generic_plan'
    SET enable_seqscan TO 'off'
    SET jit TO 'off'
    AS $fn$
DECLARE
    v_not_all_justclick boolean;
    v_not_all_smartlink boolean;
    v_providers jsonb;
    -- set by a capture function around its insert ("source:operation:rows"), heeded only in a
    -- trigger's insert (a statement of the application itself, where a session could have set
    -- it by hand, fails as it always did)
    v_capture text := CASE WHEN pg_trigger_depth() > 1
                           THEN coalesce(current_setting('contact_sync.capture', true), '') ELSE '' END;
BEGIN
    SELECT bool_or(n.provider IS DISTINCT FROM 'justclick'), bool_or(n.provider IS DISTINCT FROM 'smartlink')
    INTO v_not_all_justclick, v_not_all_smartlink
    FROM new_jobs n;
    IF v_not_all_justclick IS NULL THEN
        RETURN NULL;  -- an insert of no rows
    END IF;
    BEGIN
        -- an id a delivered job already has (the two tables' primary keys are their own): only
        -- when the id sequence is behind, as after a restore or a replica's promotion; one
        -- probe of the delivered jobs' newest id per statement says it is not
        IF (SELECT min(n.id) FROM new_jobs n) <= (SELECT max(d.id) FROM contact_sync.jobs_delivered d) THEN
            PERFORM contact_sync.reject(
                format('contact_sync: job id %s is already taken by a delivered job', n.id),
                'the id sequence is behind the jobs (a restore, a promoted replica?): run SELECT setval(''contact_sync.jobs_id_seq'', (SELECT max(id) FROM contact_sync.jobs))',
                to_jsonb(n.id))
            FROM new_jobs n
            WHERE EXISTS (SELECT 1 FROM contact_sync.jobs_delivered d WHERE d.id = n.id);
        END IF;
        -- the providers of the statement's own accounts, each probed by its key, once: no plan reads
        -- the accounts table whole or once per row
        v_providers := (SELECT jsonb_object_agg(a.account, a.provider) FROM contact_sync.accounts a
                        WHERE a.account = ANY (ARRAY(SELECT DISTINCT n.account FROM new_jobs n))
                          AND a.provider IS NOT NULL);
        PERFORM contact_sync.reject(
            format('contact_sync: account %s is a %s account, not %s', quote_literal(n.account), v_providers ->> n.account, n.provider),
            format('enqueue it with provider %s, or name one of the %s accounts', quote_literal(v_providers ->> n.account), n.provider),
            to_jsonb(n.id))
        FROM new_jobs n
        WHERE (v_providers ->> n.account) <> n.provider;
        IF NOT v_not_all_justclick THEN
            PERFORM 1 FROM new_jobs n WHERE NOT contact_sync.validate_job('justclick', n.email, n.payload);
        ELSIF NOT v_not_all_smartlink THEN
            PERFORM 1 FROM new_jobs n WHERE NOT contact_sync.validate_job('smartlink', n.email, n.payload);
        ELSE
            PERFORM 1 FROM new_jobs n WHERE NOT contact_sync.validate_job(n.provider, n.email, n.payload);
        END IF;
        PERFORM contact_sync.reject('contact_sync: run_at must be a finite time, got ' || n.run_at::text,
                                    'pass a timestamp (or omit run_at for now)', to_jsonb(n.id))
        FROM new_jobs n WHERE NOT isfinite(n.run_at);
    EXCEPTION WHEN others THEN
        IF v_capture = '' OR NOT (SQLSTATE LIKE '22%' OR SQLSTATE LIKE '23%' OR SQLSTATE LIKE '42%') THEN
            RAISE;
        END IF;
        -- A captured statement's jobs, checked by the capture an instant before, that fail
        -- here (an account given another provider in between, a session setting or a function
        -- that reads the check differently): the application's statement must not fail, so its
        -- jobs are taken out and the statement recorded as not captured (a backfill resyncs).
        DELETE FROM contact_sync.jobs j WHERE j.id = ANY (ARRAY(SELECT n.id FROM new_jobs n));
        INSERT INTO contact_sync.capture_failures (source, operation, sqlstate, error, row_count)
        VALUES (split_part(v_capture, ':', 1), split_part(v_capture, ':', 2), SQLSTATE,
                'its jobs failed the insert''s check after the capture''s own: ' || SQLERRM,
                coalesce(nullif(split_part(v_capture, ':', 3), '')::bigint, (SELECT count(*) FROM new_jobs)));
        RETURN NULL;
    END;
    PERFORM pg_notify('contact_sync_jobs', '');
    RETURN NULL;
END
$fn$;

-- A publication of contact_sync.jobs (logical replication, change data capture) gets the
-- delivered jobs' table too: a table inherited later is not added by itself.
DO $migration$
DECLARE
    r record;
BEGIN
    FOR r IN SELECT p.pubname FROM pg_publication p
             JOIN pg_publication_rel pr ON pr.prpubid = p.oid
             WHERE pr.prrelid = 'contact_sync.jobs'::regclass LOOP
        EXECUTE format('ALTER PUBLICATION %I ADD TABLE ONLY contact_sync.jobs_delivered', r.pubname);
    END LOOP;
END
$migration$;

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
