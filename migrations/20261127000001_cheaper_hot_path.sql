-- The worker's hot path, cheaper per job (issue 10), with the same rules:
--
-- 1. The account rule on every row (`[a-z0-9_]{1,64}`) was a regular-expression CHECK, which
--    Postgres evaluates on every UPDATE of a job, whatever the columns: about 8 µs per row on
--    the development machine, on the claim and on the completion of every job. The same rule
--    without a regular expression costs a fraction of that. Checking the existing rows is one
--    scan of the table, under the migration's lock (about a second per million jobs here).
ALTER TABLE contact_sync.jobs DROP CONSTRAINT jobs_account_check;
ALTER TABLE contact_sync.jobs ADD CONSTRAINT jobs_account_check
    CHECK (length(account) BETWEEN 1 AND 64
           AND ltrim(account, 'abcdefghijklmnopqrstuvwxyz0123456789_') = '') NOT VALID;
ALTER TABLE contact_sync.jobs VALIDATE CONSTRAINT jobs_account_check;

-- 2. refresh_contacts (every completion, retry and release runs it through the update
--    trigger) tested "is this key in the locked set" with a semi-join the planner ran as a
--    nested loop over two arrays: 368 completions compared 67,528 pairs. Each key now carries
--    which lock it holds from the one place that looks it up through a hash.

-- Brings the rows of these contacts in line with their jobs. Locks first, then reads (each
-- PL/pgSQL statement takes a fresh snapshot under READ COMMITTED): rows no one else holds are
-- locked FOR UPDATE and may be deleted; rows a producer holds (FOR KEY SHARE) are locked FOR NO
-- KEY UPDATE and, when they look empty, are only marked to be read again; rows another
-- transaction has locked are never waited for: they are noted in contacts_dirty for the sweep.
-- Under REPEATABLE READ or SERIALIZABLE the snapshot is the transaction's, older than the locks:
-- then the rows are only marked to be read again (by the sweep, under READ COMMITTED).
CREATE OR REPLACE FUNCTION contact_sync.refresh_contacts(keys text[]) RETURNS void
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
        -- the rows locked above, and contacts that have no row; which lock each holds is
        -- decided here, by hashed subplans (a semi-join against the arrays further down was
        -- planned as a nested loop: quadratic in the batch)
        SELECT DISTINCT key, key IN (SELECT unnest(strong)) AS strong_lock,
               key IN (SELECT unnest(weak)) AS weak_lock
        FROM unnest(keys) AS key
        WHERE key IN (SELECT unnest(strong) UNION ALL SELECT unnest(weak))
           OR NOT EXISTS (SELECT 1 FROM contact_sync.contacts c WHERE c.contact_key = key)
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
