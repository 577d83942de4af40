-- JustClick accepts exactly what PHP's filter_var($email, FILTER_VALIDATE_EMAIL) accepts (no
-- FILTER_FLAG_EMAIL_UNICODE): addresses the generic rule (contact_sync.email_is_valid) accepts,
-- such as a@b_c.com, a@b-.com, a@-b.com, a@b.123, a@1.2.3.4 or a domain label of 64 characters,
-- passed enqueue and went dead after a call (code 100, issue 22). A JustClick job's address
-- must now pass both rules; Smartlink keeps the generic one.

-- PHP's rule (mirrored by providers::address::php_valid_email; a test holds both, and PHP
-- itself, to the same answers). It is the regular expression of php-src
-- ext/filter/logical_filters.c (php_filter_validate_email, flags /iD, after the 320-byte
-- test), with two changes that keep its meaning: \x00 becomes \x01 (a text value holds no NUL),
-- and PCRE's byte matching becomes "ASCII only" (every byte above 0x7F fails PHP's pattern).
-- Postgres evaluates that expression in about 0.4 ms, so an address without ", \ or [ (every
-- address the generic rule accepts) takes an equivalent path of about 4 us: with no quote or
-- backslash, PHP's look-aheads count characters (fewer than 255, fewer than 65 before the @),
-- the local part is a dot-atom and the domain a host name, each label shorter than 64.
CREATE FUNCTION contact_sync.justclick_email_is_valid(e text) RETURNS boolean
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $fn$
SELECT e IS NOT NULL AND e !~ '[^\x01-\x7f]' AND CASE
    WHEN e !~ '["\\[]' THEN
            length(e) <= 254
        AND strpos(e, '@') BETWEEN 2 AND 65
        AND e ~ '^[A-Za-z0-9!#$%&''*+/=?^_`{|}~-]+(\.[A-Za-z0-9!#$%&''*+/=?^_`{|}~-]+)*@([A-Za-z0-9]+(-+[A-Za-z0-9]+)*\.)+[A-Za-z][A-Za-z0-9]*(-+[A-Za-z0-9]+)*$'
        AND (length(e) - strpos(e, '@') < 64 OR substr(e, strpos(e, '@') + 1) !~ '[^.]{64}')
    ELSE
            octet_length(e) <= 320
        AND e ~* '^(?!(?:(?:\x22?\x5C[\x01-\x7E]\x22?)|(?:\x22?[^\x5C\x22]\x22?)){255,})(?!(?:(?:\x22?\x5C[\x01-\x7E]\x22?)|(?:\x22?[^\x5C\x22]\x22?)){65,}@)(?:(?:[\x21\x23-\x27\x2A\x2B\x2D\x2F-\x39\x3D\x3F\x5E-\x7E]+)|(?:\x22(?:[\x01-\x08\x0B\x0C\x0E-\x1F\x21\x23-\x5B\x5D-\x7F]|(?:\x5C[\x01-\x7F]))*\x22))(?:\.(?:(?:[\x21\x23-\x27\x2A\x2B\x2D\x2F-\x39\x3D\x3F\x5E-\x7E]+)|(?:\x22(?:[\x01-\x08\x0B\x0C\x0E-\x1F\x21\x23-\x5B\x5D-\x7F]|(?:\x5C[\x01-\x7F]))*\x22)))*@(?:(?:(?!.*[^.]{64,})(?:(?:(?:xn--)?[a-z0-9]+(?:-+[a-z0-9]+)*\.){1,126}){1,}(?:(?:[a-z][a-z0-9]*)|(?:(?:xn--)[a-z0-9]+))(?:-+[a-z0-9]+)*)|(?:\[(?:(?:IPv6:(?:(?:[a-f0-9]{1,4}(?::[a-f0-9]{1,4}){7})|(?:(?!(?:.*[a-f0-9][:\]]){7,})(?:[a-f0-9]{1,4}(?::[a-f0-9]{1,4}){0,5})?::(?:[a-f0-9]{1,4}(?::[a-f0-9]{1,4}){0,5})?)))|(?:(?:IPv6:(?:(?:[a-f0-9]{1,4}(?::[a-f0-9]{1,4}){5}:)|(?:(?!(?:.*[a-f0-9]:){5,})(?:[a-f0-9]{1,4}(?::[a-f0-9]{1,4}){0,3})?::(?:[a-f0-9]{1,4}(?::[a-f0-9]{1,4}){0,3}:)?)))?(?:(?:25[0-5])|(?:2[0-4][0-9])|(?:1[0-9]{2})|(?:[1-9]?[0-9]))(?:\.(?:(?:25[0-5])|(?:2[0-4][0-9])|(?:1[0-9]{2})|(?:[1-9]?[0-9]))){3}))\]))$'
END
$fn$;

-- The validation every insert and update path runs (jobs_after_insert, jobs_before_update):
-- unchanged but for the JustClick rule, checked after the generic one (whose message stays
-- the one for an address no provider takes).
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
    WHEN p_provider = 'justclick' AND NOT contact_sync.justclick_email_is_valid(p_email) THEN
        contact_sync.reject('contact_sync: justclick refuses the email ' || quote_literal(left(p_email, 80))
                            || ' (JustClick accepts what PHP''s FILTER_VALIDATE_EMAIL accepts)',
                            'ASCII only; a local part of letters, digits and !#$%&''*+-/=?^_`{|}~ (at most 64, dots '
                            || 'between); a domain of labels of letters, digits and inner hyphens (at most 63 each, '
                            || 'no underscore), the last one starting with a letter: no IP address', p_payload)
    WHEN p_payload IS NULL OR jsonb_typeof(p_payload) <> 'object' THEN
        contact_sync.reject('contact_sync: payload must be a JSON object, got ' || coalesce(jsonb_typeof(p_payload), 'NULL'),
                            NULL, p_payload)
    WHEN p_provider = 'justclick' THEN contact_sync.validate_justclick(p_payload)
    ELSE contact_sync.validate_smartlink(p_payload)
END
$fn$;

-- The hint named +-9223372036854775807; the accepted integers (number_is_exact, and the
-- worker's 64-bit integers) run from -9223372036854775808. Otherwise unchanged.
CREATE OR REPLACE FUNCTION contact_sync.reject_inexact_number(attrs jsonb) RETURNS boolean
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
        HINT = 'numbers must be integers from -9223372036854775808 to 9223372036854775807 or have at most 15 '
               || 'significant digits between 1e-307 and 1e308; send anything else as a string';
END
$fn$;
