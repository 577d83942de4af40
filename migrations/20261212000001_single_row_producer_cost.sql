-- The insert and update triggers' holes closed, and a producer's one-row statement validated
-- with its provider's rules alone.
--
-- The validation expression covered both providers, and Postgres sets up the whole expression
-- at each statement, whichever branch its rows take. A statement whose rows all have one
-- provider (an enqueue() call; a captured statement, which inserts per account) now validates
-- with that provider as a constant, so the other provider's branch is folded away when the
-- plan is made. A statement mixing providers, or naming an unknown one, validates as before.
-- The emptiness test and the providers present are one pass over the transition table.
--
-- What is checked, and which fault a statement with several reports, are unchanged: every
-- row's account, then every row's fields (in the rows' order), then every row's run_at.
--
-- Closed in the insert trigger:
-- - it ran with the caller's search_path, so a function, aggregate or operator of the same name
--   earlier on it could stand in for a built-in one and let an invalid row in; it now runs
--   with pg_catalog first;
-- - the account check joined the accounts table with the plan the session made at its first
--   insert (PL/pgSQL keeps one plan per session for a statement without parameters): made while
--   the table was empty, it read every account for every row (a 200,000-row insert among 500
--   accounts: 100 million comparisons). The statement's own accounts are now probed by their
--   key once per statement (sequential scans off in the trigger), and each row looks its
--   account up in what they returned.
-- The trigger keeps one plan per statement and session whatever the caller's plan_cache_mode
-- (a capture function's force_custom_plan would have planned the look-up at each call).
-- Closed in the update trigger: an UPDATE (an upsert's included) that gave a job an account of
-- another provider went through; it is refused as an insert is. The update trigger runs with
-- pg_catalog first too (a caller's operators could let a malformed email or an infinite run_at
-- in), and probes the account by its key whatever the plan. Its function is now called only
-- for a row whose provider, account, email or payload changed, or whose run_at is not finite
-- (the trigger's WHEN, resolved when the trigger is made): a bulk reschedule no longer calls
-- it for every row. It keeps one plan per session for its validation: planned for each row's
-- values, a bulk payload edit spent about 0.7 ms a row planning. Moving many jobs to another
-- account costs a probe of the account per row now.
--
-- contact_sync.enqueue() was planned at every call (plan_cache_mode = force_custom_plan). Its
-- inserts read no table, and keep their plans now. Its look-up of a repeated idempotency key is
-- still planned at each call (a plan made while the queue was small would read the whole table).
--
-- Only function and trigger definitions change: no table is rewritten or scanned (making the
-- update trigger again takes a brief lock on contact_sync.jobs). A worker of the build before
-- keeps working against this schema.
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
BEGIN
    SELECT bool_or(n.provider IS DISTINCT FROM 'justclick'), bool_or(n.provider IS DISTINCT FROM 'smartlink')
    INTO v_not_all_justclick, v_not_all_smartlink
    FROM new_jobs n;
    IF v_not_all_justclick IS NULL THEN
        RETURN NULL;  -- an insert of no rows
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
    PERFORM pg_notify('contact_sync_jobs', '');
    RETURN NULL;
END
$$;

CREATE OR REPLACE FUNCTION contact_sync.jobs_before_update() RETURNS trigger
    LANGUAGE plpgsql
    SET search_path TO 'pg_catalog', 'pg_temp'
    SET plan_cache_mode TO 'force_generic_plan'
    SET enable_seqscan TO 'off'
    AS $$
BEGIN
    -- (an account name the table's CHECK refuses is left to it, which reports it as for an insert)
    IF (NEW.provider IS DISTINCT FROM OLD.provider OR NEW.account IS DISTINCT FROM OLD.account)
       AND length(NEW.account) BETWEEN 1 AND 64
       AND ltrim(NEW.account, 'abcdefghijklmnopqrstuvwxyz0123456789_') = '' THEN
        PERFORM contact_sync.reject(
            format('contact_sync: account %s is a %s account, not %s', quote_literal(NEW.account), a.provider, NEW.provider),
            format('move it to a %s account, or to one of the %s accounts', a.provider, NEW.provider),
            to_jsonb(NEW.id))
        FROM contact_sync.accounts a
        WHERE a.account = NEW.account AND a.provider IS NOT NULL AND a.provider <> NEW.provider;
    END IF;
    IF NEW.provider IS DISTINCT FROM OLD.provider OR NEW.email IS DISTINCT FROM OLD.email
       OR NEW.payload IS DISTINCT FROM OLD.payload THEN
        PERFORM contact_sync.validate_job(NEW.provider, NEW.email, NEW.payload);
    END IF;
    IF NOT isfinite(NEW.run_at) THEN
        PERFORM contact_sync.reject('contact_sync: run_at must be a finite time, got ' || NEW.run_at::text,
                                    NULL, to_jsonb(NEW.id));
    END IF;
    IF NEW.provider IS DISTINCT FROM OLD.provider OR NEW.account IS DISTINCT FROM OLD.account
       OR lower(NEW.email) IS DISTINCT FROM lower(OLD.email) THEN
        NEW.waits_for := NULL;
    END IF;
    RETURN NEW;
END
$$;

DROP TRIGGER jobs_validate_update ON contact_sync.jobs;
CREATE TRIGGER jobs_validate_update
    BEFORE UPDATE OF provider, account, email, payload, run_at ON contact_sync.jobs
    FOR EACH ROW
    WHEN (NEW.provider IS DISTINCT FROM OLD.provider OR NEW.account IS DISTINCT FROM OLD.account
          OR NEW.email IS DISTINCT FROM OLD.email OR NEW.payload IS DISTINCT FROM OLD.payload
          OR NOT isfinite(NEW.run_at))
    EXECUTE FUNCTION contact_sync.jobs_before_update();

CREATE OR REPLACE FUNCTION contact_sync.enqueue(provider text, account text, email text, payload jsonb DEFAULT '{}'::jsonb, idempotency_key text DEFAULT NULL::text, run_at timestamp with time zone DEFAULT now(), max_attempts integer DEFAULT NULL::integer) RETURNS bigint
    LANGUAGE plpgsql
    AS $_$
#variable_conflict use_column
DECLARE
    v_payload jsonb := coalesce(enqueue.payload, '{}'::jsonb);
    v_id bigint;
BEGIN
    IF enqueue.account IS NULL OR enqueue.account !~ '^[a-z0-9_]{1,64}$' THEN
        RAISE EXCEPTION USING ERRCODE = '22023',
            MESSAGE = format('contact_sync: invalid account name %s', coalesce(quote_literal(enqueue.account), 'NULL')),
            HINT = 'account names use only a-z, 0-9 and _ (at most 64 characters)';
    END IF;
    IF enqueue.idempotency_key IS NOT NULL AND length(enqueue.idempotency_key) NOT BETWEEN 1 AND 200 THEN
        RAISE EXCEPTION USING ERRCODE = '22023',
            MESSAGE = format('contact_sync: idempotency_key must be 1 to 200 characters, got %s', length(enqueue.idempotency_key)),
            HINT = 'pass NULL for a change without one';
    END IF;
    IF enqueue.max_attempts IS NOT NULL AND enqueue.max_attempts < 1 THEN
        RAISE EXCEPTION USING ERRCODE = '22023',
            MESSAGE = format('contact_sync: max_attempts must be at least 1, got %s', enqueue.max_attempts),
            HINT = 'pass NULL for the worker''s worker.max_attempts';
    END IF;
    IF enqueue.provider = 'smartlink' AND jsonb_typeof(v_payload) = 'object' AND NOT v_payload ? 'modify_ts' THEN
        v_payload := v_payload || jsonb_build_object('modify_ts', floor(extract(epoch FROM clock_timestamp()) * 1000)::bigint);
    END IF;

    IF enqueue.idempotency_key IS NULL THEN
        -- no unique index applies to a row without a key: a plain insert
        INSERT INTO contact_sync.jobs (provider, account, email, payload, run_at, max_attempts)
        VALUES (enqueue.provider, enqueue.account, enqueue.email, v_payload,
                coalesce(enqueue.run_at, now()), enqueue.max_attempts)
        RETURNING id INTO v_id;
        RETURN v_id;
    END IF;

    INSERT INTO contact_sync.jobs (provider, account, email, payload, idempotency_key, run_at, max_attempts)
    VALUES (enqueue.provider, enqueue.account, enqueue.email, v_payload, enqueue.idempotency_key,
            coalesce(enqueue.run_at, now()), enqueue.max_attempts)
    ON CONFLICT (account, idempotency_key) WHERE idempotency_key IS NOT NULL DO NOTHING
    RETURNING id INTO v_id;

    IF v_id IS NULL THEN
        -- A job with this (account, idempotency_key) exists: a new statement sees it even when a
        -- concurrent transaction committed it after this one started. (EXECUTE: planned for the
        -- table as it is now; a kept plan made while the queue was small read it whole.)
        EXECUTE 'SELECT j.id FROM contact_sync.jobs j WHERE j.account = $1 AND j.idempotency_key = $2'
        INTO v_id USING enqueue.account, enqueue.idempotency_key;
    END IF;
    RETURN v_id;
END
$_$;
