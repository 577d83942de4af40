-- Statements over many contacts cost in proportion to the contacts they touch.
--
-- Before: `refresh_contacts` and the update trigger tested set membership with
-- `key IN (SELECT unnest(...))` and `NOT IN (...)` in expressions, which PostgreSQL runs as a
-- hashed subplan only while the set fits `work_mem`, and otherwise as a rescan of the whole set
-- for every row: `cancel --state pending` took 0.85 s at 20,000 contacts and did not finish
-- in 200 s at 200,000. Membership is now a join or an anti-join (`NOT EXISTS`), which the
-- planner hashes and spills to disk past `work_mem`, or sorts and merges.
--
-- JIT compilation is off in the trigger functions: their statements are short, and a large
-- batch's cost estimate made PostgreSQL compile the validation of each row's payload
-- (1.5 s of the 4 s an INSERT of 100,000 jobs took).

CREATE OR REPLACE FUNCTION contact_sync.refresh_contacts(keys text[]) RETURNS void
LANGUAGE plpgsql SET plan_cache_mode = force_custom_plan SET jit = off AS $fn$
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
            WHERE c.contact_key = ANY(ARRAY(SELECT unnest(keys)))
              AND NOT EXISTS (SELECT 1 FROM unnest(strong) AS t(k) WHERE t.k = c.contact_key)
            ORDER BY c.contact_key FOR NO KEY UPDATE SKIP LOCKED) s;
        -- rows that exist but could not be locked: for the sweep
        INSERT INTO contact_sync.contacts_dirty (contact_key)
        SELECT c.contact_key FROM contact_sync.contacts c
        WHERE c.contact_key = ANY(ARRAY(SELECT unnest(keys)))
          AND NOT EXISTS (SELECT 1 FROM unnest(strong) AS t(k) WHERE t.k = c.contact_key)
          AND NOT EXISTS (SELECT 1 FROM unnest(weak) AS t(k) WHERE t.k = c.contact_key);
    END IF;
    WITH k AS (
        -- the rows locked above, and contacts that have no row; which lock each holds is
        -- decided by outer joins (hashed or merged at any size, never a rescan per row)
        SELECT DISTINCT u.key, s.k IS NOT NULL AS strong_lock, w.k IS NOT NULL AS weak_lock
        FROM unnest(keys) AS u(key)
        LEFT JOIN unnest(strong) AS s(k) ON s.k = u.key
        LEFT JOIN unnest(weak) AS w(k) ON w.k = u.key
        WHERE s.k IS NOT NULL OR w.k IS NOT NULL
           OR NOT EXISTS (SELECT 1 FROM contact_sync.contacts c WHERE c.contact_key = u.key OFFSET 0)
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

CREATE OR REPLACE FUNCTION contact_sync.jobs_after_update() RETURNS trigger
LANGUAGE plpgsql SET plan_cache_mode = force_custom_plan SET jit = off AS $fn$
BEGIN
    -- The contacts whose open work changed: a job now pending, and an open job that is no
    -- longer open under the same key (finished, cancelled, or its address edited by hand).
    -- A claim (pending to running) and a heartbeat (running to running) change nothing here.
    -- (set operations, not a join of the two transition tables: they have no statistics, and a
    -- nested loop over them is quadratic in the batch)
    PERFORM contact_sync.refresh_contacts(ARRAY(
        SELECT n.contact_key FROM new_jobs n WHERE n.state = 'pending'
        UNION
        SELECT c.contact_key FROM (
            SELECT o.id, o.contact_key FROM old_jobs o WHERE o.state IN ('pending', 'running')
            EXCEPT
            SELECT n.id, n.contact_key FROM new_jobs n WHERE n.state IN ('pending', 'running')) c));
    RETURN NULL;
END
$fn$;

ALTER FUNCTION contact_sync.jobs_after_insert() SET jit = off;
ALTER FUNCTION contact_sync.jobs_after_delete() SET jit = off;
ALTER FUNCTION contact_sync.jobs_check_account_provider() SET jit = off;
ALTER FUNCTION contact_sync.rebuild_contacts() SET jit = off;
