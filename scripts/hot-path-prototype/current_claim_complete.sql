BEGIN;
WITH picked AS (
            SELECT c.contact_key, c.head_id
            FROM unnest(ARRAY['bench_jc']::text[]::text[], ARRAY[256]::int[]::int[]) AS q(account, n)
            -- a paused account (its provider's throttle answer, or an operator) gives nothing,
            -- and an account with fleet-wide limits only within them (false: claim_within_limits)
            CROSS JOIN LATERAL (
                SELECT 1 WHERE NOT EXISTS (
                    SELECT 1 FROM contact_sync.accounts a
                    WHERE a.account = q.account
                      AND (a.paused_at IS NOT NULL OR a.throttled_until > now()
                           OR (NOT false AND (a.rate_per_second IS NOT NULL OR a.max_in_flight IS NOT NULL))))
            ) open
            CROSS JOIN LATERAL (
                SELECT c.contact_key, c.head_id FROM contact_sync.contacts c
                WHERE c.account = q.account AND c.head_id IS NOT NULL AND NOT c.running
                  AND c.run_at <= now()
                ORDER BY c.run_at, c.head_id
                LIMIT q.n
                FOR NO KEY UPDATE SKIP LOCKED
            ) c
        ), claimed AS (
            UPDATE contact_sync.jobs j
            SET state = 'running', attempts = j.attempts + 1,
                locked_until = now() + make_interval(secs => 60000::bigint / 1000.0), locked_by = ('w:' || :client_id)
            -- = ANY(ARRAY(...)): primary-key probes, never a join the planner could hash; the
            -- state test is written so that no partial index can serve it (a plain
            -- `state = 'pending'` let the planner AND the probes with a scan of the whole
            -- pending index)
            WHERE j.id = ANY(ARRAY(SELECT head_id FROM picked)) AND coalesce(j.state, '') = 'pending'
              AND NOT EXISTS (SELECT 1 FROM contact_sync.jobs r
                              WHERE r.contact_key = j.contact_key AND r.state = 'running')
              -- the contact's first pending job, whatever its queue row says (a change noted
              -- for a re-read by a REPEATABLE READ producer, then one queued by a READ
              -- COMMITTED one): otherwise the row is read again first
              AND NOT EXISTS (SELECT 1 FROM contact_sync.jobs e
                              WHERE e.contact_key = j.contact_key AND e.state = 'pending' AND e.id < j.id)
            RETURNING j.id, j.provider, j.account, j.email, j.payload, j.attempts, j.max_attempts,
                      j.created_at, j.contact_key
        ), marked AS (
            UPDATE contact_sync.contacts c
            SET running = c.head_id IN (SELECT id FROM claimed),
                head_id = CASE WHEN c.head_id IN (SELECT id FROM claimed) THEN c.head_id END,
                run_at = CASE WHEN c.head_id IN (SELECT id FROM claimed) THEN c.run_at END
            WHERE c.contact_key = ANY(ARRAY(SELECT contact_key FROM picked))
        )
        -- payload and followers as text: the worker decodes each job on its own, so one row it
        -- cannot read is parked alone instead of failing the whole batch
        SELECT j.id, j.provider, j.account, j.email, j.payload::text AS payload,
               -- the digest the completion compares, in the server's own encoding (the text the
               -- client receives is converted to UTF-8, and hashes differently in a WIN1251 database)
               md5(j.payload::text) AS payload_md5, j.attempts,
               coalesce(j.max_attempts, 20) AS max_attempts,
               floor(extract(epoch FROM j.created_at) * 1000)::bigint AS created_at_ms,
               CASE WHEN j.provider = 'smartlink' THEN
                   (SELECT w.modify_ts FROM contact_sync.smartlink_watermarks w WHERE w.contact_key = j.contact_key)
               END AS known_modify_ts,
               -- what the provider was last sent, for the accounts a source captures into (ARRAY[]::text[])
               CASE WHEN j.account = ANY(ARRAY[]::text[]::text[]) THEN
                   (SELECT s.fields::text FROM contact_sync.synced s WHERE s.contact_key = j.contact_key)
               END AS synced_fields,
               -- most heads have no follower: one index probe says so, without the
               -- aggregate's set-up for every claimed job
               CASE WHEN NOT EXISTS (SELECT 1 FROM contact_sync.jobs f
                                     WHERE f.contact_key = j.contact_key AND f.state = 'pending' AND f.id > j.id)
                    THEN '[]' ELSE
               (SELECT coalesce(jsonb_agg(jsonb_build_object(
                           'id', f.id, 'payload', f.payload, 'md5', md5(f.payload::text),
                           'created_at_ms', floor(extract(epoch FROM f.created_at) * 1000)::bigint) ORDER BY f.id), '[]')::text
                FROM (SELECT f.id, f.payload, f.created_at,
                             -- consecutive only: stop at a job scheduled later or a re-send
                             bool_and(f.run_at <= now() AND f.resend_after IS NULL) OVER (ORDER BY f.id) AS consecutive
                      FROM (SELECT f.id, f.payload, f.created_at, f.run_at, f.resend_after
                            FROM contact_sync.jobs f
                            WHERE f.contact_key = j.contact_key AND f.state = 'pending' AND f.id > j.id
                            ORDER BY f.id LIMIT 49) f) f
                WHERE f.consecutive) END AS followers
        FROM claimed j;
COMMIT;
BEGIN;
UPDATE contact_sync.jobs SET state = 'succeeded', finished_at = now(), locked_until = NULL, locked_by = NULL WHERE id IN (SELECT id FROM contact_sync.jobs WHERE state = 'running' AND locked_by = 'w:' || :client_id);
COMMIT;
