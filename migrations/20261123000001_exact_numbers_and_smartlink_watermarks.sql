-- Trust hardening (issue 9): what enqueue accepts is exactly what the worker can send.
--
-- 1. Smartlink attribute numbers must reach the provider with the value enqueued: integers
--    (no fraction digits) within the 64-bit range, or decimals of at most 15 significant digits
--    between 1e-307 and 1e308 in magnitude (the decimals a 64-bit float holds exactly, so they
--    survive every JSON library on the way). Anything else (1e400, 123456789012345678901,
--    0.1000000000000000055) is refused with SQLSTATE 22023 naming the attribute.
-- 2. One definition of a valid e-mail address, shared with the Rust clients
--    (`providers::address::is_valid_email`).
-- 3. run_at must be a finite time (no 'infinity' / '-infinity').
-- 4. Deferred double-opt-in re-sends remember which change they follow (`resend_after`), so a
--    status change committed later than the sweep still supersedes them.
-- 5. The newest Smartlink modify_ts delivered per contact, so coalescing knows when the provider
--    will discard the head of a group as stale.

CREATE FUNCTION contact_sync.number_is_exact(n numeric) RETURNS boolean
LANGUAGE plpgsql IMMUTABLE PARALLEL SAFE AS $fn$
BEGIN
    IF scale(n) = 0 AND n BETWEEN -9223372036854775808 AND 9223372036854775807 THEN
        RETURN true;  -- read as a 64-bit integer
    END IF;
    IF n <> 0 AND (abs(n) >= 1e308 OR abs(n) < 1e-307) THEN
        RETURN false;
    END IF;
    -- float8 -> numeric keeps 15 significant digits: equal iff the value has at most 15
    RETURN n::float8::numeric = n;
END
$fn$;

CREATE FUNCTION contact_sync.attribute_numbers_exact(attrs jsonb) RETURNS boolean
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $fn$
    SELECT NOT EXISTS (
        SELECT 1 FROM jsonb_each(attrs) e
        WHERE jsonb_typeof(e.value) = 'number' AND NOT contact_sync.number_is_exact(e.value::numeric))
$fn$;

CREATE FUNCTION contact_sync.reject_inexact_number(attrs jsonb) RETURNS boolean
LANGUAGE plpgsql IMMUTABLE PARALLEL SAFE AS $fn$
DECLARE
    bad record;
BEGIN
    SELECT e.key, e.value INTO bad FROM jsonb_each(attrs) e
    WHERE jsonb_typeof(e.value) = 'number' AND NOT contact_sync.number_is_exact(e.value::numeric)
    ORDER BY e.key LIMIT 1;
    RAISE EXCEPTION USING ERRCODE = '22023',
        MESSAGE = format('contact_sync: smartlink attribute %s: the number %s cannot be sent exactly',
                         quote_literal(bad.key), left(bad.value::text, 40)),
        HINT = 'numbers must be integers within +-9223372036854775807 or have at most 15 significant digits '
               || 'between 1e-307 and 1e308; send anything else as a string';
END
$fn$;

CREATE OR REPLACE FUNCTION contact_sync.validate_smartlink(p jsonb) RETURNS boolean
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
    -- numbers must reach the provider with the value enqueued (see number_is_exact)
    WHEN jsonb_path_exists(p -> 'attributes', '$.* ? (@.type() == "number")')
         AND NOT contact_sync.attribute_numbers_exact(p -> 'attributes') THEN
        contact_sync.reject_inexact_number(p -> 'attributes')
    ELSE true
END
$fn$;


-- The one definition of a valid address (mirrored by providers::address::is_valid_email):
-- local@domain, at most 254 characters (local part at most 64), no whitespace, control, format,
-- bidi or other invisible (default-ignorable) characters (Unicode included: U+00A0, U+2007,
-- U+200B, U+061C, U+FEFF, variation selectors, tags, ...), none of
-- < > ( ) [ ] , ; : \ " ; no leading, trailing or doubled dot in the local part; a domain of at
-- least two non-empty labels.
CREATE FUNCTION contact_sync.email_is_valid(e text) RETURNS boolean
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $fn$
SELECT e IS NOT NULL AND length(e) <= 254
   AND e ~ '^[^@]{1,64}@[^@.]+(\.[^@.]+)+$'
   AND e !~ '[\x01-\x20\x7f-\xa0\u00ad\u034f\u0600-\u0605\u061c\u06dd\u070f\u0890-\u0891\u08e2\u115f-\u1160\u1680\u17b4-\u17b5\u180b-\u180f\u2000-\u200f\u2028-\u202f\u205f-\u206f\u3000\u3164\ufe00-\ufe0f\ufeff\uffa0\ufff9-\ufffb\U000110bd\U000110cd\U00013430-\U0001343f\U0001bca0-\U0001bca3\U0001d173-\U0001d17a\U000e0000-\U000e0fff<>()\[\],;:\\"]'
   AND e !~ '^\.|\.@|\.\.[^@]*@'
$fn$;

CREATE OR REPLACE FUNCTION contact_sync.validate_job(p_provider text, p_email text, p_payload jsonb) RETURNS boolean
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $fn$
SELECT CASE
    WHEN p_provider IS NULL OR p_provider NOT IN ('justclick', 'smartlink') THEN
        contact_sync.reject('contact_sync: unknown provider ' || coalesce(quote_literal(p_provider), 'NULL')
                            || ' (expected "justclick" or "smartlink")', NULL, p_payload)
    WHEN NOT contact_sync.email_is_valid(p_email) THEN
        contact_sync.reject('contact_sync: malformed email ' || coalesce(quote_literal(left(p_email, 80)), 'NULL'),
                            'an address like user@example.com: at most 254 characters, no spaces (Unicode ones '
                            || 'included) or control characters, none of <>()[],;:\", a domain with a dot', p_payload)
    WHEN p_payload IS NULL OR jsonb_typeof(p_payload) <> 'object' THEN
        contact_sync.reject('contact_sync: payload must be a JSON object, got ' || coalesce(jsonb_typeof(p_payload), 'NULL'),
                            NULL, p_payload)
    WHEN p_provider = 'justclick' THEN contact_sync.validate_justclick(p_payload)
    ELSE contact_sync.validate_smartlink(p_payload)
END
$fn$;

CREATE OR REPLACE FUNCTION contact_sync.jobs_after_insert() RETURNS trigger
LANGUAGE plpgsql AS $fn$
BEGIN
    PERFORM 1 FROM new_jobs n WHERE NOT contact_sync.validate_job(n.provider, n.email, n.payload);
    PERFORM contact_sync.reject('contact_sync: run_at must be a finite time, got ' || n.run_at::text,
                                'pass a timestamp (or omit run_at for now)', to_jsonb(n.id))
    FROM new_jobs n WHERE NOT isfinite(n.run_at);
    PERFORM pg_notify('contact_sync_jobs', '');
    RETURN NULL;
END
$fn$;

CREATE OR REPLACE FUNCTION contact_sync.jobs_before_update() RETURNS trigger
LANGUAGE plpgsql AS $fn$
BEGIN
    IF NEW.provider IS DISTINCT FROM OLD.provider OR NEW.email IS DISTINCT FROM OLD.email
       OR NEW.payload IS DISTINCT FROM OLD.payload THEN
        PERFORM contact_sync.validate_job(NEW.provider, NEW.email, NEW.payload);
    END IF;
    IF NOT isfinite(NEW.run_at) THEN
        PERFORM contact_sync.reject('contact_sync: run_at must be a finite time, got ' || NEW.run_at::text,
                                    NULL, to_jsonb(NEW.id));
    END IF;
    RETURN NEW;
END
$fn$;

DROP TRIGGER jobs_validate_update ON contact_sync.jobs;
CREATE TRIGGER jobs_validate_update BEFORE UPDATE OF provider, email, payload, run_at ON contact_sync.jobs
    FOR EACH ROW EXECUTE FUNCTION contact_sync.jobs_before_update();

-- A deferred confirmation re-send: dropped when a change of the contact newer than this id
-- (and older than the re-send itself) sets a status.
ALTER TABLE contact_sync.jobs ADD COLUMN resend_after bigint;

-- The newest modify_ts delivered to Smartlink per contact (what the provider holds when
-- contact-sync is the contact's only writer). Written with each successful call, read by the
-- claim, pruned with finished jobs after retention.finished of silence.
CREATE TABLE contact_sync.smartlink_watermarks (
    contact_key text        PRIMARY KEY,
    modify_ts   bigint      NOT NULL,
    updated_at  timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX smartlink_watermarks_updated_idx ON contact_sync.smartlink_watermarks (updated_at);

-- Deferred re-sends by contact: a delivered status change removes those of its contact.
CREATE INDEX doi_deferred_contact_idx ON contact_sync.doi_deferred ((provider || ':' || account || ':' || lower(email)));

-- Parked jobs by contact: retention keeps a delivered job while an older parked job of its
-- contact exists, so that `retry` can still tell it was overtaken.
CREATE INDEX jobs_parked_contact_idx ON contact_sync.jobs (contact_key, id) WHERE state IN ('dead', 'cancelled');
