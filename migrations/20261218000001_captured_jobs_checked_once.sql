-- A captured statement's jobs are checked once.
--
-- A captured statement of at most 1,000 rows is checked by the capture function, then inserted
-- in the application's own transaction. The insert trigger checked every row again: for a
-- one-row update, a tenth of the capture's cost in the application's session. The capture
-- function now checks its jobs with this trigger's own search path (pg_catalog, pg_temp: a
-- look-alike function in the application's schema no longer changes what the check accepts), so
-- the trigger skips the payload and address checks for an insert made by a capture function
-- (contact_sync.capture set around it, heeded only at pg_trigger_depth() > 1, as before). The
-- accounts' providers are still checked: an account given another provider between the two
-- makes the statement recorded as not captured, as before. Every other insert is checked as
-- before, with the same errors.
--
-- Only a function definition changes. A worker of the build before keeps working against it;
-- captures installed by the build before check their jobs with their own search path and keep
-- working, with the insert no longer checking them again: run `contact-sync capture install`
-- after the upgrade (the mapping's version changes with the generated functions).
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
        IF v_capture <> '' THEN
            -- a capture function's small statement: checked by the same function with this
            -- trigger's search path an instant before (only the accounts' providers, above, may
            -- have changed since)
            NULL;
        ELSIF NOT v_not_all_justclick THEN
            PERFORM 1 FROM new_jobs n WHERE NOT contact_sync.validate_job('justclick', n.email, n.payload);
        ELSIF NOT v_not_all_smartlink THEN
            PERFORM 1 FROM new_jobs n WHERE NOT contact_sync.validate_job('smartlink', n.email, n.payload);
        ELSE
            PERFORM 1 FROM new_jobs n WHERE NOT contact_sync.validate_job(n.provider, n.email, n.payload);
        END IF;
        IF v_capture = '' THEN
            PERFORM contact_sync.reject('contact_sync: run_at must be a finite time, got ' || n.run_at::text,
                                        'pass a timestamp (or omit run_at for now)', to_jsonb(n.id))
            FROM new_jobs n WHERE NOT isfinite(n.run_at);
        END IF;
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
