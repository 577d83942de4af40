-- The outbox table, its validation and its indexes.
-- Every object is schema-qualified: function bodies resolve names with the caller's search_path.

CREATE SCHEMA IF NOT EXISTS contact_sync;

-- Validation of one change. Raises SQLSTATE 22023 (invalid_parameter_value) with a message that
-- names the offending field; returns true otherwise. The triggers at the end of this file run
-- it for every inserted row (and on updates of provider, email or payload), so every way of
-- inserting a job (the SQL function, the Rust batch API, a hand-written INSERT) obeys the same
-- rules. (Not a CHECK constraint: Postgres re-checks those on every UPDATE, and the worker
-- updates each row twice.)
--
-- It runs for every inserted row, so the validators are plain SQL expressions that the planner
-- inlines (no PL/pgSQL interpreter, no sub-queries on the happy path); only
-- the error paths call PL/pgSQL. The raising helpers are IMMUTABLE (same arguments, same error)
-- so that inlining is allowed, and every call passes row data in `ctx` so that the planner can
-- never fold one into a constant and raise at plan time.

CREATE FUNCTION contact_sync.reject(message text, hint text, ctx jsonb) RETURNS boolean
LANGUAGE plpgsql IMMUTABLE PARALLEL SAFE AS $fn$
BEGIN
    IF hint IS NULL THEN
        RAISE EXCEPTION USING ERRCODE = '22023', MESSAGE = message;
    END IF;
    RAISE EXCEPTION USING ERRCODE = '22023', MESSAGE = message, HINT = hint;
END
$fn$;

CREATE FUNCTION contact_sync.reject_unknown_key(provider text, extra jsonb, allowed text) RETURNS boolean
LANGUAGE plpgsql IMMUTABLE PARALLEL SAFE AS $fn$
BEGIN
    RAISE EXCEPTION USING ERRCODE = '22023',
        MESSAGE = format('contact_sync: unknown %s payload key %s', provider,
                         quote_literal((SELECT min(k) FROM jsonb_object_keys(extra) k))),
        HINT = 'allowed: ' || allowed;
END
$fn$;

-- Characters of a string array joined with commas (only called for large arrays).
CREATE FUNCTION contact_sync.joined_length(arr jsonb) RETURNS integer
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $fn$
    SELECT coalesce(sum(length(e) + 1) - 1, 0)::integer FROM jsonb_array_elements_text(arr) e
$fn$;

CREATE FUNCTION contact_sync.validate_justclick(p jsonb) RETURNS boolean
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $fn$
SELECT CASE
    WHEN (p - ARRAY['lead_name', 'lead_phone', 'lead_city', 'lead_tags']) <> '{}'::jsonb THEN
        contact_sync.reject_unknown_key('justclick', p - ARRAY['lead_name', 'lead_phone', 'lead_city', 'lead_tags'],
                                        'lead_name, lead_phone, lead_city, lead_tags')
    WHEN p ? 'lead_name' AND jsonb_typeof(p -> 'lead_name') <> 'string' THEN
        contact_sync.reject('contact_sync: justclick field lead_name must be a string, got ' || jsonb_typeof(p -> 'lead_name'), NULL, p)
    WHEN p ? 'lead_name' AND length(p ->> 'lead_name') > 255 THEN
        contact_sync.reject('contact_sync: justclick field lead_name is longer than 255 characters', NULL, p)
    WHEN p ? 'lead_city' AND jsonb_typeof(p -> 'lead_city') <> 'string' THEN
        contact_sync.reject('contact_sync: justclick field lead_city must be a string, got ' || jsonb_typeof(p -> 'lead_city'), NULL, p)
    WHEN p ? 'lead_city' AND length(p ->> 'lead_city') > 255 THEN
        contact_sync.reject('contact_sync: justclick field lead_city is longer than 255 characters', NULL, p)
    WHEN p ? 'lead_phone' AND jsonb_typeof(p -> 'lead_phone') <> 'string' THEN
        contact_sync.reject('contact_sync: justclick field lead_phone must be a string, got ' || jsonb_typeof(p -> 'lead_phone'), NULL, p)
    WHEN p ? 'lead_phone' AND length(p ->> 'lead_phone') > 64 THEN
        contact_sync.reject('contact_sync: justclick field lead_phone is longer than 64 characters', NULL, p)
    WHEN NOT p ? 'lead_tags' THEN true
    WHEN jsonb_typeof(p -> 'lead_tags') = 'string' THEN
        CASE WHEN length(p ->> 'lead_tags') > 1000 THEN
            contact_sync.reject('contact_sync: justclick field lead_tags is longer than 1000 characters', NULL, p)
        ELSE true END
    WHEN jsonb_typeof(p -> 'lead_tags') <> 'array' OR jsonb_path_exists(p -> 'lead_tags', '$[*] ? (@.type() != "string")') THEN
        contact_sync.reject('contact_sync: justclick field lead_tags must be a string or an array of strings', NULL, p)
    WHEN jsonb_path_exists(p -> 'lead_tags', '$[*] ? (@ == "" || @ like_regex ",")') THEN
        contact_sync.reject('contact_sync: justclick field lead_tags: a tag in an array must be non-empty and contain no comma', NULL, p)
    WHEN length((p -> 'lead_tags')::text) > 1000 AND contact_sync.joined_length(p -> 'lead_tags') > 1000 THEN
        contact_sync.reject('contact_sync: justclick field lead_tags is longer than 1000 characters', NULL, p)
    ELSE true
END
$fn$;

CREATE FUNCTION contact_sync.validate_smartlink_list(field text, v jsonb, p jsonb) RETURNS boolean
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $fn$
SELECT CASE
    WHEN v IS NULL THEN true
    WHEN jsonb_typeof(v) <> 'array' OR jsonb_path_exists(v, '$[*] ? (@.type() != "string")') THEN
        contact_sync.reject('contact_sync: smartlink field ' || field || ' must be an array of strings', NULL, p)
    WHEN jsonb_array_length(v) > 100 THEN
        contact_sync.reject('contact_sync: smartlink field ' || field || ' has more than 100 entries', NULL, p)
    WHEN length(v::text) > 255 AND jsonb_path_exists(v, '$[*] ? (@ like_regex "^.{255}." flag "s")') THEN
        contact_sync.reject('contact_sync: smartlink field ' || field || ' has an entry longer than 255 characters', NULL, p)
    ELSE true
END
$fn$;

CREATE FUNCTION contact_sync.validate_smartlink(p jsonb) RETURNS boolean
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $fn$
SELECT CASE
    WHEN (p - ARRAY['modify_ts', 'tags', 'openid', 'subscribe', 'location', 'language', 'attributes', 'preferences', 'update_strategy']) <> '{}'::jsonb THEN
        contact_sync.reject_unknown_key('smartlink',
            p - ARRAY['modify_ts', 'tags', 'openid', 'subscribe', 'location', 'language', 'attributes', 'preferences', 'update_strategy'],
            'modify_ts, tags, openid, subscribe, location, language, attributes, preferences, update_strategy')
    WHEN p ? 'modify_ts' AND (jsonb_typeof(p -> 'modify_ts') <> 'number' OR (p ->> 'modify_ts') !~ '^[0-9]{1,16}$') THEN
        contact_sync.reject('contact_sync: smartlink field modify_ts must be a non-negative integer (milliseconds)', NULL, p)
    WHEN NOT contact_sync.validate_smartlink_list('tags', p -> 'tags', p) THEN false
    WHEN NOT contact_sync.validate_smartlink_list('preferences', p -> 'preferences', p) THEN false
    WHEN p ? 'openid' AND (jsonb_typeof(p -> 'openid') <> 'string' OR (p ->> 'openid') !~ '^[0-9]{1,20}$') THEN
        contact_sync.reject('contact_sync: smartlink field openid must be a string of at most 20 digits', NULL, p)
    WHEN p ? 'subscribe' AND (jsonb_typeof(p -> 'subscribe') <> 'number' OR (p ->> 'subscribe') NOT IN ('-1', '0', '1', '3')) THEN
        contact_sync.reject('contact_sync: smartlink field subscribe must be one of -1, 0, 1, 3', NULL, p)
    WHEN p ? 'update_strategy' AND (jsonb_typeof(p -> 'update_strategy') <> 'number' OR (p ->> 'update_strategy') NOT IN ('0', '1', '2', '3')) THEN
        contact_sync.reject('contact_sync: smartlink field update_strategy must be one of 0, 1, 2, 3', NULL, p)
    WHEN p ? 'location' AND (jsonb_typeof(p -> 'location') <> 'string' OR (p ->> 'location') !~ '^([0-9]{3})?$') THEN
        contact_sync.reject('contact_sync: smartlink field location must be a 3-digit ISO 3166 numeric code like "004"', NULL, p)
    WHEN p ? 'language' AND (jsonb_typeof(p -> 'language') <> 'string' OR (p ->> 'language') !~ '^([A-Za-z]{2,3}([-_][A-Za-z0-9]{2,8})*)?$') THEN
        contact_sync.reject('contact_sync: smartlink field language must be a language code like "en" or "pt-BR"', NULL, p)
    WHEN NOT p ? 'attributes' THEN true
    WHEN jsonb_typeof(p -> 'attributes') <> 'object' THEN
        contact_sync.reject('contact_sync: smartlink field attributes must be an object', NULL, p)
    -- (the cheap text-length tests skip the costlier checks for values too short to fail them)
    WHEN length((p -> 'attributes')::text) > 250 AND jsonb_array_length(jsonb_path_query_array(p -> 'attributes', '$.keyvalue()')) > 50 THEN
        contact_sync.reject('contact_sync: smartlink field attributes has more than 50 entries', NULL, p)
    WHEN jsonb_path_exists(p -> 'attributes', '$.* ? (@.type() != "string" && @.type() != "number" && @.type() != "boolean")') THEN
        contact_sync.reject('contact_sync: smartlink attributes values must be strings, numbers or booleans', NULL, p)
    WHEN length((p -> 'attributes')::text) > 255
      AND (jsonb_path_exists(p -> 'attributes', '$.* ? (@.type() == "string" && @ like_regex "^(.{250}){4}." flag "s")')
           OR jsonb_path_exists(p -> 'attributes', '$.keyvalue() ? (@.key like_regex "^.{255}." flag "s")')) THEN
        contact_sync.reject('contact_sync: smartlink attribute longer than 1000 characters (or a name longer than 255)', NULL, p)
    ELSE true
END
$fn$;

CREATE FUNCTION contact_sync.validate_job(p_provider text, p_email text, p_payload jsonb) RETURNS boolean
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $fn$
SELECT CASE
    WHEN p_provider IS NULL OR p_provider NOT IN ('justclick', 'smartlink') THEN
        contact_sync.reject('contact_sync: unknown provider ' || coalesce(quote_literal(p_provider), 'NULL')
                            || ' (expected "justclick" or "smartlink")', NULL, p_payload)
    WHEN p_email IS NULL OR length(p_email) > 254
         OR p_email !~ '^[^[:space:][:cntrl:]@]+@[^[:space:][:cntrl:]@]+\.[^[:space:][:cntrl:]@.]+$' THEN
        contact_sync.reject('contact_sync: malformed email ' || coalesce(quote_literal(left(p_email, 80)), 'NULL'),
                            'an address like user@example.com, at most 254 characters', p_payload)
    WHEN p_payload IS NULL OR jsonb_typeof(p_payload) <> 'object' THEN
        contact_sync.reject('contact_sync: payload must be a JSON object, got ' || coalesce(jsonb_typeof(p_payload), 'NULL'),
                            NULL, p_payload)
    WHEN p_provider = 'justclick' THEN contact_sync.validate_justclick(p_payload)
    ELSE contact_sync.validate_smartlink(p_payload)
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
    doi             text
);

COMMENT ON TABLE contact_sync.jobs IS 'contact-sync outbox: one row per contact change';

-- No statistics on `state`: a table is mostly finished rows with a few open ones, and after an
-- ANALYZE taken while nothing was pending the planner would estimate "1 pending row" and turn the
-- per-contact probes of the claim into scans of the whole pending set (quadratic in the backlog,
-- seen in `contact-sync bench`). Without statistics it assumes a modest share and always probes
-- the indexes by contact.
ALTER TABLE contact_sync.jobs ALTER COLUMN state SET STATISTICS 0;

-- Every index below is partial, so a state change only touches the indexes of the state it
-- enters: a claim (pending -> running) inserts into the primary key and the running index, a
-- completion into the primary key and the finished index.
-- Claiming: runnable jobs per account in order.
CREATE INDEX jobs_pending_idx ON contact_sync.jobs (account, run_at, id) WHERE state = 'pending';
-- Ordering: the pending jobs of one contact.
CREATE INDEX jobs_pending_contact_idx ON contact_sync.jobs (contact_key, id) WHERE state = 'pending';
-- Never two calls in flight for one contact, whatever the timing of concurrent claims: the
-- database itself refuses a second running job of a contact. Also how the rescuer finds the
-- running jobs (at most the calls in flight).
CREATE UNIQUE INDEX jobs_running_contact_idx ON contact_sync.jobs (contact_key) WHERE state = 'running';
-- Retention of finished jobs.
CREATE INDEX jobs_finished_idx ON contact_sync.jobs (finished_at) WHERE state IN ('succeeded', 'coalesced', 'cancelled');
-- Operator look-ups of parked jobs.
CREATE INDEX jobs_dead_idx ON contact_sync.jobs (account, id) WHERE state = 'dead';
-- Idempotent enqueue.
CREATE UNIQUE INDEX jobs_idempotency_idx ON contact_sync.jobs (account, idempotency_key) WHERE idempotency_key IS NOT NULL;

-- After each inserting statement: validate every new row in one set-based query, then wake the
-- workers once (notifications are delivered at commit).
CREATE FUNCTION contact_sync.jobs_after_insert() RETURNS trigger
LANGUAGE plpgsql AS $fn$
BEGIN
    PERFORM 1 FROM new_jobs n WHERE NOT contact_sync.validate_job(n.provider, n.email, n.payload);
    PERFORM pg_notify('contact_sync_jobs', '');
    RETURN NULL;
END
$fn$;

CREATE TRIGGER jobs_after_insert AFTER INSERT ON contact_sync.jobs
    REFERENCING NEW TABLE AS new_jobs
    FOR EACH STATEMENT EXECUTE FUNCTION contact_sync.jobs_after_insert();

-- A hand-written UPDATE of what a job sends is validated too.
CREATE FUNCTION contact_sync.jobs_before_update() RETURNS trigger
LANGUAGE plpgsql AS $fn$
BEGIN
    PERFORM contact_sync.validate_job(NEW.provider, NEW.email, NEW.payload);
    RETURN NEW;
END
$fn$;

CREATE TRIGGER jobs_validate_update BEFORE UPDATE OF provider, email, payload ON contact_sync.jobs
    FOR EACH ROW EXECUTE FUNCTION contact_sync.jobs_before_update();
