-- The outbox table, its validation and its indexes.
-- Every object is schema-qualified: function bodies resolve names with the caller's search_path.

CREATE SCHEMA IF NOT EXISTS contact_sync;

-- Validates one change for its provider. Raises SQLSTATE 22023 (invalid_parameter_value) with a
-- message that names the offending field; returns true otherwise. Used by the CHECK constraint on
-- contact_sync.jobs, so every way of inserting a job (the SQL function, the Rust batch API, a
-- hand-written INSERT) obeys the same rules.
CREATE FUNCTION contact_sync.validate_job(p_provider text, p_email text, p_payload jsonb)
RETURNS boolean
LANGUAGE plpgsql IMMUTABLE PARALLEL SAFE AS $fn$
DECLARE
    k text;
    v jsonb;
    t text;
BEGIN
    IF p_provider IS NULL OR p_provider NOT IN ('justclick', 'smartlink') THEN
        RAISE EXCEPTION USING ERRCODE = '22023',
            MESSAGE = format('contact_sync: unknown provider %s (expected "justclick" or "smartlink")',
                             coalesce(quote_literal(p_provider), 'NULL'));
    END IF;
    IF p_email IS NULL OR length(p_email) > 254
       OR p_email !~ '^[^[:space:][:cntrl:]@]+@[^[:space:][:cntrl:]@]+\.[^[:space:][:cntrl:]@.]+$' THEN
        RAISE EXCEPTION USING ERRCODE = '22023',
            MESSAGE = format('contact_sync: malformed email %s', coalesce(quote_literal(left(p_email, 80)), 'NULL')),
            HINT = 'an address like user@example.com, at most 254 characters';
    END IF;
    IF p_payload IS NULL OR jsonb_typeof(p_payload) <> 'object' THEN
        RAISE EXCEPTION USING ERRCODE = '22023',
            MESSAGE = format('contact_sync: payload must be a JSON object, got %s',
                             coalesce(jsonb_typeof(p_payload), 'NULL'));
    END IF;

    FOR k, v IN SELECT * FROM jsonb_each(p_payload) LOOP
        t := jsonb_typeof(v);
        IF p_provider = 'justclick' THEN
            IF k IN ('lead_name', 'lead_city', 'lead_phone') THEN
                IF t <> 'string' THEN
                    RAISE EXCEPTION USING ERRCODE = '22023',
                        MESSAGE = format('contact_sync: justclick field %s must be a string, got %s', k, t);
                END IF;
                IF length(v #>> '{}') > (CASE k WHEN 'lead_phone' THEN 64 ELSE 255 END) THEN
                    RAISE EXCEPTION USING ERRCODE = '22023',
                        MESSAGE = format('contact_sync: justclick field %s is longer than %s characters', k,
                                         CASE k WHEN 'lead_phone' THEN 64 ELSE 255 END);
                END IF;
            ELSIF k = 'lead_tags' THEN
                IF t = 'array' THEN
                    IF EXISTS (SELECT 1 FROM jsonb_array_elements(v) e WHERE jsonb_typeof(e) <> 'string') THEN
                        RAISE EXCEPTION USING ERRCODE = '22023',
                            MESSAGE = 'contact_sync: justclick field lead_tags must be a string or an array of strings';
                    END IF;
                    IF EXISTS (SELECT 1 FROM jsonb_array_elements_text(v) e WHERE e = '' OR position(',' in e) > 0) THEN
                        RAISE EXCEPTION USING ERRCODE = '22023',
                            MESSAGE = 'contact_sync: justclick field lead_tags: a tag in an array must be non-empty and contain no comma';
                    END IF;
                    IF (SELECT coalesce(sum(length(e) + 1), 0) FROM jsonb_array_elements_text(v) e) > 1001 THEN
                        RAISE EXCEPTION USING ERRCODE = '22023',
                            MESSAGE = 'contact_sync: justclick field lead_tags is longer than 1000 characters';
                    END IF;
                ELSIF t = 'string' THEN
                    IF length(v #>> '{}') > 1000 THEN
                        RAISE EXCEPTION USING ERRCODE = '22023',
                            MESSAGE = 'contact_sync: justclick field lead_tags is longer than 1000 characters';
                    END IF;
                ELSE
                    RAISE EXCEPTION USING ERRCODE = '22023',
                        MESSAGE = format('contact_sync: justclick field lead_tags must be a string or an array of strings, got %s', t);
                END IF;
            ELSE
                RAISE EXCEPTION USING ERRCODE = '22023',
                    MESSAGE = format('contact_sync: unknown justclick payload key %s', quote_literal(k)),
                    HINT = 'allowed: lead_name, lead_phone, lead_city, lead_tags';
            END IF;
        ELSE -- smartlink
            IF k = 'modify_ts' THEN
                IF t <> 'number' OR (v #>> '{}') !~ '^[0-9]{1,16}$' THEN
                    RAISE EXCEPTION USING ERRCODE = '22023',
                        MESSAGE = 'contact_sync: smartlink field modify_ts must be a non-negative integer (milliseconds)';
                END IF;
            ELSIF k IN ('tags', 'preferences') THEN
                IF t <> 'array' OR EXISTS (SELECT 1 FROM jsonb_array_elements(v) e WHERE jsonb_typeof(e) <> 'string') THEN
                    RAISE EXCEPTION USING ERRCODE = '22023',
                        MESSAGE = format('contact_sync: smartlink field %s must be an array of strings', k);
                END IF;
                IF jsonb_array_length(v) > 100 THEN
                    RAISE EXCEPTION USING ERRCODE = '22023',
                        MESSAGE = format('contact_sync: smartlink field %s has more than 100 entries', k);
                END IF;
                IF EXISTS (SELECT 1 FROM jsonb_array_elements_text(v) e WHERE length(e) > 255) THEN
                    RAISE EXCEPTION USING ERRCODE = '22023',
                        MESSAGE = format('contact_sync: smartlink field %s has an entry longer than 255 characters', k);
                END IF;
            ELSIF k = 'openid' THEN
                IF t <> 'string' OR (v #>> '{}') !~ '^[0-9]{1,20}$' THEN
                    RAISE EXCEPTION USING ERRCODE = '22023',
                        MESSAGE = 'contact_sync: smartlink field openid must be a string of at most 20 digits';
                END IF;
            ELSIF k = 'subscribe' THEN
                IF t <> 'number' OR (v #>> '{}') NOT IN ('-1', '0', '1', '3') THEN
                    RAISE EXCEPTION USING ERRCODE = '22023',
                        MESSAGE = 'contact_sync: smartlink field subscribe must be one of -1, 0, 1, 3';
                END IF;
            ELSIF k = 'update_strategy' THEN
                IF t <> 'number' OR (v #>> '{}') NOT IN ('0', '1', '2', '3') THEN
                    RAISE EXCEPTION USING ERRCODE = '22023',
                        MESSAGE = 'contact_sync: smartlink field update_strategy must be one of 0, 1, 2, 3';
                END IF;
            ELSIF k = 'location' THEN
                IF t <> 'string' OR (v #>> '{}') !~ '^([0-9]{3})?$' THEN
                    RAISE EXCEPTION USING ERRCODE = '22023',
                        MESSAGE = 'contact_sync: smartlink field location must be a 3-digit ISO 3166 numeric code like "004"';
                END IF;
            ELSIF k = 'language' THEN
                IF t <> 'string' OR (v #>> '{}') !~ '^([A-Za-z]{2,3}([-_][A-Za-z0-9]{2,8})*)?$' THEN
                    RAISE EXCEPTION USING ERRCODE = '22023',
                        MESSAGE = 'contact_sync: smartlink field language must be a language code like "en" or "pt-BR"';
                END IF;
            ELSIF k = 'attributes' THEN
                IF t <> 'object' THEN
                    RAISE EXCEPTION USING ERRCODE = '22023',
                        MESSAGE = 'contact_sync: smartlink field attributes must be an object';
                END IF;
                IF (SELECT count(*) FROM jsonb_object_keys(v)) > 50 THEN
                    RAISE EXCEPTION USING ERRCODE = '22023',
                        MESSAGE = 'contact_sync: smartlink field attributes has more than 50 entries';
                END IF;
                IF EXISTS (SELECT 1 FROM jsonb_each(v) a WHERE jsonb_typeof(a.value) NOT IN ('string', 'number', 'boolean')) THEN
                    RAISE EXCEPTION USING ERRCODE = '22023',
                        MESSAGE = 'contact_sync: smartlink attributes values must be strings, numbers or booleans';
                END IF;
                IF EXISTS (SELECT 1 FROM jsonb_each_text(v) a WHERE length(a.value) > 1000 OR length(a.key) > 255) THEN
                    RAISE EXCEPTION USING ERRCODE = '22023',
                        MESSAGE = 'contact_sync: smartlink attribute longer than 1000 characters';
                END IF;
            ELSE
                RAISE EXCEPTION USING ERRCODE = '22023',
                    MESSAGE = format('contact_sync: unknown smartlink payload key %s', quote_literal(k)),
                    HINT = 'allowed: modify_ts, tags, openid, subscribe, location, language, attributes, preferences, update_strategy';
            END IF;
        END IF;
    END LOOP;
    RETURN true;
END
$fn$;

CREATE TABLE contact_sync.jobs (
    id              bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    provider        text        NOT NULL,
    account         text        NOT NULL CHECK (account ~ '^[a-z0-9_]{1,64}$'),
    email           text        NOT NULL,
    -- One contact = (provider, account, lower(email)): the unit of ordering and coalescing.
    contact_key     text        GENERATED ALWAYS AS (provider || ':' || account || ':' || lower(email)) STORED,
    payload         jsonb       NOT NULL DEFAULT '{}',
    idempotency_key text,
    state           text        NOT NULL DEFAULT 'pending'
                    CHECK (state IN ('pending', 'running', 'succeeded', 'dead', 'cancelled', 'coalesced')),
    attempts        integer     NOT NULL DEFAULT 0,
    -- NULL: the worker's worker.max_attempts applies.
    max_attempts    integer     CHECK (max_attempts IS NULL OR max_attempts >= 1),
    run_at          timestamptz NOT NULL DEFAULT now(),
    created_at      timestamptz NOT NULL DEFAULT now(),
    -- The lease of a running job; extended by the owning worker's heartbeat.
    locked_until    timestamptz,
    locked_by       text,
    finished_at     timestamptz,
    last_error      text,
    -- Every failed attempt: [{"attempt", "at", "kind", "code", "error"}].
    errors          jsonb       NOT NULL DEFAULT '[]',
    coalesced_into  bigint,
    -- Smartlink double opt-in outcome: sent | deferred_until <ts> | suppressed.
    doi             text,
    CONSTRAINT jobs_valid CHECK (contact_sync.validate_job(provider, email, payload))
);

COMMENT ON TABLE contact_sync.jobs IS 'contact-sync outbox: one row per contact change';

-- Claiming: runnable jobs per account in order.
CREATE INDEX jobs_pending_idx ON contact_sync.jobs (account, run_at, id) WHERE state = 'pending';
-- Ordering: the open (pending or running) jobs of one contact.
CREATE INDEX jobs_open_contact_idx ON contact_sync.jobs (contact_key, id) WHERE state IN ('pending', 'running');
-- Never two calls in flight for one contact, whatever the timing of concurrent claims: the
-- database itself refuses a second running job of a contact.
CREATE UNIQUE INDEX jobs_one_running_per_contact_idx ON contact_sync.jobs (contact_key) WHERE state = 'running';
-- Rescue of expired leases.
CREATE INDEX jobs_running_idx ON contact_sync.jobs (locked_until) WHERE state = 'running';
-- Retention of finished jobs.
CREATE INDEX jobs_finished_idx ON contact_sync.jobs (finished_at) WHERE state IN ('succeeded', 'coalesced', 'cancelled');
-- Operator look-ups of parked jobs.
CREATE INDEX jobs_dead_idx ON contact_sync.jobs (account, id) WHERE state = 'dead';
-- Idempotent enqueue.
CREATE UNIQUE INDEX jobs_idempotency_idx ON contact_sync.jobs (account, idempotency_key) WHERE idempotency_key IS NOT NULL;

-- Wake the workers once per inserting statement (notifications are delivered at commit).
CREATE FUNCTION contact_sync.notify_jobs() RETURNS trigger
LANGUAGE plpgsql AS $fn$
BEGIN
    PERFORM pg_notify('contact_sync_jobs', '');
    RETURN NULL;
END
$fn$;

CREATE TRIGGER jobs_notify AFTER INSERT ON contact_sync.jobs
    FOR EACH STATEMENT EXECUTE FUNCTION contact_sync.notify_jobs();
