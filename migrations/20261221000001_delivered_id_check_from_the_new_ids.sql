-- The insert trigger's check that a new job's id is not one a delivered job has (added by
-- 20261220000001) read the delivered jobs' newest id with `max(id)`: a backward scan of
-- `jobs_delivered_pkey` from its top. Entries of deleted delivered jobs stay in the index until
-- a vacuum, and after a purge of an account (or retention that deleted every delivered job)
-- the scan walked all of them, in every insert statement: about 6 ms for each one-row enqueue
-- or captured write after a million delivered jobs were purged, until autovacuum ran. The
-- check now probes the index from the statement's lowest new id upward, which the ids of
-- deleted jobs are all below. Only this one test of the function changes.

CREATE OR REPLACE FUNCTION contact_sync.jobs_after_insert() RETURNS trigger
    LANGUAGE plpgsql
    SET search_path TO 'pg_catalog', 'pg_temp'
    SET plan_cache_mode TO 'force_generic_plan'
    SET enable_seqscan TO 'off'
    SET jit TO 'off'
    AS $$
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
        -- when the id sequence is behind, as after a restore or a replica's promotion. One
        -- probe of the delivered jobs' index at the statement's lowest id says it is not: the
        -- probe starts there, so it never walks the entries that deleted jobs leave at the top
        -- of the index until a vacuum (`max(id)` walked them all: about 6 ms for every insert
        -- after a million delivered jobs were purged). Written as the first id in index order,
        -- not `EXISTS`, for which the planner reads the table sequentially instead
        IF (SELECT d.id FROM contact_sync.jobs_delivered d
            WHERE d.id >= (SELECT min(n.id) FROM new_jobs n)
            ORDER BY d.id LIMIT 1) IS NOT NULL THEN
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
$$;
