-- contact_sync.enqueue() takes the job's own attempt budget: max_attempts (NULL: the worker's
-- worker.max_attempts). Callers that pass the first six arguments, by position or by name, are
-- unaffected: the function is replaced by one with a seventh, defaulted argument.
--
-- Idempotency keys are 1 to 200 characters on every path: an empty key (an unset shell
-- variable) would make every later change of the account with an empty key a "duplicate" of
-- the first, silently dropped. Existing rows are left as they are (NOT VALID).
ALTER TABLE contact_sync.jobs ADD CONSTRAINT jobs_idempotency_key_1_to_200_characters
    CHECK (idempotency_key IS NULL OR length(idempotency_key) BETWEEN 1 AND 200) NOT VALID;

DROP FUNCTION contact_sync.enqueue(text, text, text, jsonb, text, timestamptz);

CREATE FUNCTION contact_sync.enqueue(
    provider        text,
    account         text,
    email           text,
    payload         jsonb       DEFAULT '{}',
    idempotency_key text        DEFAULT NULL,
    run_at          timestamptz DEFAULT now(),
    max_attempts    integer     DEFAULT NULL
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
$fn$;

COMMENT ON FUNCTION contact_sync.enqueue(text, text, text, jsonb, text, timestamptz, integer) IS
    'contact-sync: record a contact change inside the caller''s transaction; returns the job id (the existing one for a repeated idempotency key)';
