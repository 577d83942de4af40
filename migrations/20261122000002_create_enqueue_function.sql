-- contact_sync.enqueue(): the public way to record a change from any language, inside the
-- producer's own transaction. Validation is the jobs_valid CHECK constraint (one set of rules for
-- every path); this function adds the Smartlink modify_ts default and idempotency.
CREATE FUNCTION contact_sync.enqueue(
    provider        text,
    account         text,
    email           text,
    payload         jsonb       DEFAULT '{}',
    idempotency_key text        DEFAULT NULL,
    run_at          timestamptz DEFAULT now()
) RETURNS bigint
LANGUAGE plpgsql AS $fn$
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
    IF enqueue.provider = 'smartlink' AND jsonb_typeof(v_payload) = 'object' AND NOT v_payload ? 'modify_ts' THEN
        v_payload := v_payload || jsonb_build_object('modify_ts', floor(extract(epoch FROM clock_timestamp()) * 1000)::bigint);
    END IF;

    INSERT INTO contact_sync.jobs (provider, account, email, payload, idempotency_key, run_at)
    VALUES (enqueue.provider, enqueue.account, enqueue.email, v_payload, enqueue.idempotency_key,
            coalesce(enqueue.run_at, now()))
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
$fn$;
