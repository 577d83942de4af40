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

-- 3. Type checks that let nested arrays through (found by the adversarial review). In lax mode a
--    JSON path filter unwraps arrays, so `$[*] ? (@.type() != "string")` accepted [["a"]] as an
--    array of strings and `$.* ? (...)` accepted an attribute [1, "x"] as scalars: enqueue took
--    changes no provider call can carry. The same checks in strict mode see the nested array.
CREATE OR REPLACE FUNCTION contact_sync.validate_justclick(p jsonb) RETURNS boolean
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
    WHEN jsonb_typeof(p -> 'lead_tags') <> 'array' OR jsonb_path_exists(p -> 'lead_tags', 'strict $[*] ? (@.type() != "string")') THEN
        contact_sync.reject('contact_sync: justclick field lead_tags must be a string or an array of strings', NULL, p)
    WHEN jsonb_path_exists(p -> 'lead_tags', '$[*] ? (@ == "" || @ like_regex ",")') THEN
        contact_sync.reject('contact_sync: justclick field lead_tags: a tag in an array must be non-empty and contain no comma', NULL, p)
    WHEN length((p -> 'lead_tags')::text) > 1000 AND contact_sync.joined_length(p -> 'lead_tags') > 1000 THEN
        contact_sync.reject('contact_sync: justclick field lead_tags is longer than 1000 characters', NULL, p)
    ELSE true
END
$fn$;

CREATE OR REPLACE FUNCTION contact_sync.validate_smartlink_list(field text, v jsonb, p jsonb) RETURNS boolean
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $fn$
SELECT CASE
    WHEN v IS NULL THEN true
    WHEN jsonb_typeof(v) <> 'array' OR jsonb_path_exists(v, 'strict $[*] ? (@.type() != "string")') THEN
        contact_sync.reject('contact_sync: smartlink field ' || field || ' must be an array of strings', NULL, p)
    WHEN jsonb_array_length(v) > 100 THEN
        contact_sync.reject('contact_sync: smartlink field ' || field || ' has more than 100 entries', NULL, p)
    WHEN length(v::text) > 255 AND jsonb_path_exists(v, '$[*] ? (@ like_regex "^.{255}." flag "s")') THEN
        contact_sync.reject('contact_sync: smartlink field ' || field || ' has an entry longer than 255 characters', NULL, p)
    ELSE true
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
    WHEN jsonb_path_exists(p -> 'attributes', 'strict $.* ? (@.type() != "string" && @.type() != "number" && @.type() != "boolean")') THEN
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
