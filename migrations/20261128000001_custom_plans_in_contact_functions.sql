-- Plans made for the tables as they are now, not as they were when a session first ran a
-- statement (issue 10: "plans that need no luck").
--
-- PL/pgSQL keeps each statement's plan for the session: after five runs it may switch to a
-- generic plan and keep it until the table's statistics change. `contact_sync.contacts` holds
-- only contacts with open work, so it is empty whenever the queue is, and a plan made then
-- reads it with a sequential scan (cheapest for one page). When a backlog of a million arrives,
-- every completion's `refresh_contacts` and every producer's insert trigger kept scanning the
-- whole table, 12–130 ms a statement, until autovacuum next analysed it: measured with a worker
-- that had been idle before a backlog, Postgres's CPU per job went from about 100 µs to 450 µs.
--
-- With `plan_cache_mode = force_custom_plan` on these functions, each statement is planned for
-- the table's current size on every call: about 0.1–0.5 ms of planning per statement, paid
-- once per statement (a batch), not per row. The worker's own statements get the same by being
-- sent unprepared (`src/outbox/`). A later `CREATE OR REPLACE` of one of these functions must
-- repeat `SET plan_cache_mode = force_custom_plan`: replacing a function resets its settings.
ALTER FUNCTION contact_sync.rebuild_contacts() SET plan_cache_mode = force_custom_plan;
ALTER FUNCTION contact_sync.jobs_after_update() SET plan_cache_mode = force_custom_plan;
ALTER FUNCTION contact_sync.jobs_after_delete() SET plan_cache_mode = force_custom_plan;
ALTER FUNCTION contact_sync.jobs_check_account_provider() SET plan_cache_mode = force_custom_plan;
-- its look-up of an idempotency key already used
ALTER FUNCTION contact_sync.enqueue(text, text, text, jsonb, text, timestamptz, integer)
    SET plan_cache_mode = force_custom_plan;

-- A statement that uses no variable has no parameters, and Postgres keeps one plan for it
-- whatever `plan_cache_mode` says. The insert trigger's lock of existing contact rows under
-- REPEATABLE READ and SERIALIZABLE was such a statement (found by the adversarial review: a
-- producer under REPEATABLE READ read 50,000 contact rows per insert); it now names its keys
-- through the variable `todo`. Its look-ups of existing contact rows read the keys as
-- refresh_contacts' do (below: the planner does not see how many), so a batch touching a few
-- hundred queued contacts probes them instead of reading the table. Otherwise unchanged.

CREATE OR REPLACE FUNCTION contact_sync.jobs_after_insert() RETURNS trigger
LANGUAGE plpgsql SET plan_cache_mode = force_custom_plan AS $fn$
DECLARE
    todo text[];
BEGIN
    PERFORM 1 FROM new_jobs n WHERE NOT contact_sync.validate_job(n.provider, n.email, n.payload);
    PERFORM contact_sync.reject('contact_sync: run_at must be a finite time, got ' || n.run_at::text,
                                'pass a timestamp (or omit run_at for now)', to_jsonb(n.id))
    FROM new_jobs n WHERE NOT isfinite(n.run_at);
    todo := ARRAY(SELECT DISTINCT n.contact_key FROM new_jobs n WHERE n.state IN ('pending', 'running'));
    IF current_setting('transaction_isolation') <> 'read committed' THEN
        -- hold the rows that exist first: an INSERT that meets a row version this snapshot
        -- cannot see would fail with a serialization error, a lock on it does not
        -- (the keys as a variable: a statement without one keeps its first plan, see above)
        PERFORM 1 FROM (
            SELECT c.contact_key FROM contact_sync.contacts c
            WHERE c.contact_key = ANY(ARRAY(SELECT unnest(todo)))
            ORDER BY c.contact_key FOR KEY SHARE) s;
    END IF;
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
            WHERE c.contact_key = ANY(ARRAY(SELECT unnest(todo))) ORDER BY c.contact_key FOR KEY SHARE) s) INTO todo;
    END LOOP;
    IF cardinality(todo) > 0 THEN
        -- only after ten deletes of one row in a row: read those contacts again
        PERFORM contact_sync.refresh_contacts(todo);
    END IF;
    PERFORM pg_notify('contact_sync_jobs', '');
    RETURN NULL;
END
$fn$;

-- refresh_contacts, planned for the keys it is given, no longer falls back on a generic plan
-- that probes each key; and with 256 keys known, Postgres prefers one pass over `contacts` to
-- 256 probes while the table holds fewer than about 100,000 rows (measured with EXPLAIN at
-- 20,000, 50,000 and 100,000): a completion would then read the whole queue. Its look-ups of
-- contact rows now read the keys through `ARRAY(SELECT unnest(keys))`, whose size the planner
-- does not see, and its "has no row" test carries `OFFSET 0`, which keeps Postgres from turning
-- it into a hashed pass over the table: each key is one primary-key probe once the table is
-- more than a few pages long.
-- Otherwise as in 20261127000001_cheaper_hot_path.

CREATE OR REPLACE FUNCTION contact_sync.refresh_contacts(keys text[]) RETURNS void
LANGUAGE plpgsql SET plan_cache_mode = force_custom_plan AS $fn$
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
        WHERE c.contact_key = ANY(ARRAY(SELECT unnest(keys))) ORDER BY c.contact_key FOR UPDATE SKIP LOCKED) s;
    weak := '{}';
    IF cardinality(strong) < cardinality(keys) THEN
        -- held by a producer (compatible), or locked by another transaction (skipped)
        SELECT coalesce(array_agg(s.contact_key), '{}') INTO weak FROM (
            SELECT c.contact_key FROM contact_sync.contacts c
            WHERE c.contact_key = ANY(ARRAY(SELECT unnest(keys))) AND c.contact_key NOT IN (SELECT unnest(strong))
            ORDER BY c.contact_key FOR NO KEY UPDATE SKIP LOCKED) s;
        -- rows that exist but could not be locked: for the sweep
        INSERT INTO contact_sync.contacts_dirty (contact_key)
        SELECT c.contact_key FROM contact_sync.contacts c
        WHERE c.contact_key = ANY(ARRAY(SELECT unnest(keys)))
          AND c.contact_key NOT IN (SELECT unnest(strong) UNION ALL SELECT unnest(weak));
    END IF;
    WITH k AS (
        -- the rows locked above, and contacts that have no row; which lock each holds is
        -- decided here, by hashed subplans (a semi-join against the arrays further down was
        -- planned as a nested loop: quadratic in the batch)
        SELECT DISTINCT key, key IN (SELECT unnest(strong)) AS strong_lock,
               key IN (SELECT unnest(weak)) AS weak_lock
        FROM unnest(keys) AS key
        WHERE key IN (SELECT unnest(strong) UNION ALL SELECT unnest(weak))
           OR NOT EXISTS (SELECT 1 FROM contact_sync.contacts c WHERE c.contact_key = key OFFSET 0)
    ), s AS (
        SELECT k.key, k.strong_lock, k.weak_lock, r.id AS running_id, r.account AS running_account,
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
        SELECT s.key, s.strong_lock, s.weak_lock FROM s WHERE s.running_id IS NULL AND s.pending_id IS NULL
    ), deleted AS (
        -- = ANY(ARRAY(...)): primary-key probes, never a scan of the table
        DELETE FROM contact_sync.contacts c
        WHERE c.contact_key = ANY(ARRAY(SELECT e.key FROM empty e WHERE e.strong_lock))
    )
    UPDATE contact_sync.contacts c
    SET head_id = NULL, run_at = NULL, running = false
    WHERE c.contact_key = ANY(ARRAY(SELECT e.key FROM empty e WHERE e.weak_lock))
      AND (c.head_id IS NOT NULL OR c.running);
END
$fn$;
