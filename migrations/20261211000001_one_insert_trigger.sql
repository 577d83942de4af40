-- A recorded change costs its producer one trigger call, and an insert of nothing costs none.
--
-- Inserting into contact_sync.jobs fired two statement triggers: the account-provider check
-- (jobs_account_check) and the validation with its NOTIFY (jobs_after_insert). Each call sets
-- up a PL/pgSQL frame and its statements (about 35 µs for a one-row insert), and an insert of
-- no rows (a captured statement that changed nothing an account maps) ran both, validated
-- nothing and woke every worker. The checks now run in one trigger, in the order they had
-- (every row's account, then every row's fields, then every row's run_at: a statement with
-- several faults reports the same one as before), and an empty insert returns at once.
--
-- contact_sync.enqueue() without an idempotency key inserts without ON CONFLICT: no unique
-- index applies to such a row, and the speculative insertion ON CONFLICT costs (an extra WAL
-- record per row) bought nothing.
--
-- Only function bodies and one trigger change: no table is rewritten or scanned. A worker of
-- the build before keeps working against this schema.
CREATE OR REPLACE FUNCTION contact_sync.jobs_after_insert() RETURNS trigger
    LANGUAGE plpgsql
    SET plan_cache_mode TO 'force_custom_plan'
    SET jit TO 'off'
    AS $$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM new_jobs) THEN
        RETURN NULL;
    END IF;
    PERFORM contact_sync.reject(
        format('contact_sync: account %s is a %s account, not %s', quote_literal(n.account), a.provider, n.provider),
        format('enqueue it with provider %s, or name one of the %s accounts', quote_literal(a.provider), n.provider),
        to_jsonb(n.id))
    FROM new_jobs n JOIN contact_sync.accounts a ON a.account = n.account
    WHERE a.provider IS NOT NULL AND a.provider <> n.provider;
    PERFORM 1 FROM new_jobs n WHERE NOT contact_sync.validate_job(n.provider, n.email, n.payload);
    PERFORM contact_sync.reject('contact_sync: run_at must be a finite time, got ' || n.run_at::text,
                                'pass a timestamp (or omit run_at for now)', to_jsonb(n.id))
    FROM new_jobs n WHERE NOT isfinite(n.run_at);
    PERFORM pg_notify('contact_sync_jobs', '');
    RETURN NULL;
END
$$;

DROP TRIGGER jobs_account_check ON contact_sync.jobs;
DROP FUNCTION contact_sync.jobs_check_account_provider();

CREATE OR REPLACE FUNCTION contact_sync.enqueue(provider text, account text, email text, payload jsonb DEFAULT '{}'::jsonb, idempotency_key text DEFAULT NULL::text, run_at timestamp with time zone DEFAULT now(), max_attempts integer DEFAULT NULL::integer) RETURNS bigint
    LANGUAGE plpgsql
    SET plan_cache_mode TO 'force_custom_plan'
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
        -- concurrent transaction committed it after this one started.
        SELECT j.id INTO v_id FROM contact_sync.jobs j
        WHERE j.account = enqueue.account AND j.idempotency_key = enqueue.idempotency_key;
    END IF;
    RETURN v_id;
END
$_$;
