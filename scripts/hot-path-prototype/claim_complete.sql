BEGIN;
WITH cand AS (
  SELECT j.id, j.contact_key FROM p.jobs j
  WHERE j.account = 'bench_jc' AND j.locked_by IS NULL AND j.parked_behind IS NULL AND j.run_at <= now()
  ORDER BY j.run_at, j.id LIMIT 512 FOR UPDATE SKIP LOCKED
), judged AS (
  SELECT c.id, b.id AS before FROM cand c
  LEFT JOIN LATERAL (SELECT e.id FROM p.jobs e WHERE e.contact_key = c.contact_key AND e.id < c.id
                     ORDER BY e.id LIMIT 1) b ON true
), heads AS (
  SELECT id FROM judged WHERE before IS NULL ORDER BY id LIMIT 256
), parked AS (
  UPDATE p.jobs j SET parked_behind = g.before FROM judged g WHERE j.id = g.id AND g.before IS NOT NULL
)
UPDATE p.jobs j SET locked_by = 'w:' || :client_id, locked_until = now() + interval '60s', attempts = j.attempts + 1
FROM heads h WHERE j.id = h.id RETURNING j.id, j.provider, j.email, j.payload::text, md5(j.payload::text);
COMMIT;
BEGIN;
WITH d AS (
  DELETE FROM p.jobs j WHERE j.locked_by = 'w:' || :client_id RETURNING j.*
), h AS (
  INSERT INTO p.history SELECT d.id, d.provider, d.account, d.email, d.contact_key, d.payload, d.attempts, d.created_at, now(), 'succeeded', d.last_error, d.errors FROM d
)
UPDATE p.jobs f SET parked_behind = NULL WHERE f.parked_behind = ANY(ARRAY(SELECT id FROM d));
COMMIT;
