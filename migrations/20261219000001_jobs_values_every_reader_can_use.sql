-- A job's times, attempt count and error history are checked by the table itself, so that they
-- hold for rows inserted with the triggers off (`pg_restore --disable-triggers`,
-- `session_replication_role = replica`, a logical-replication apply) and for hand-written
-- UPDATEs of any column (found by an adversarial check of the triggers-off path):
--
-- - one job whose `created_at` was `infinity` failed every claim of its account ("cannot
--   convert infinity to bigint"): nothing of that account was delivered any more;
-- - one whose `run_at` was `-infinity` was claimed, then the worker stopped at once, decoding
--   where its claim ended (the job left `running`, the same on every restart); `jobs list`,
--   `jobs show` and the console stopped at any such time, and `status` failed;
-- - an `attempts` of 2147483647 failed every claim of its account (integer overflow), an
--   `errors` that is not an array failed the recording of every failure in its batch.
--
-- The rules: every time finite and before the year 10000 (what every reader can represent),
-- `attempts` between 0 and 999,999, `errors` a JSON array. They raise the insert trigger's
-- kind of error (22023, a message that says what to fix, no row contents). `run_at` is now
-- checked as each row is written, before the statement's other checks: of several faults in
-- one INSERT, a time at fault is reported first.
--
-- Existing rows that break them are brought in line first (none can have been written through
-- the triggers): a time before every other is moved to the job's creation (it stays due first),
-- a later one to the last day of 9999 (a `run_at` still never due, a lease that never expires
-- is given to the rescuer), an attempt count clamped, an `errors` object wrapped in an array.
-- This scans the jobs table twice under the migration's lock (about a second per million jobs
-- each). The update validation trigger does not fire for these rows: their new `run_at` is
-- finite, and nothing it checks changes.

UPDATE contact_sync.jobs
SET created_at = CASE WHEN created_at > '-infinity' AND created_at < '10000-01-01 00:00:00+00' THEN created_at
                      ELSE now() END
WHERE NOT (created_at > '-infinity' AND created_at < '10000-01-01 00:00:00+00');

UPDATE contact_sync.jobs
SET run_at = CASE WHEN run_at > '-infinity' AND run_at < '10000-01-01 00:00:00+00' THEN run_at
                  WHEN run_at = '-infinity' THEN created_at
                  ELSE '9999-12-31 00:00:00+00' END,
    locked_until = CASE WHEN locked_until IS NULL
                          OR (locked_until > '-infinity' AND locked_until < '10000-01-01 00:00:00+00') THEN locked_until
                        ELSE now() END,
    finished_at = CASE WHEN finished_at IS NULL
                         OR (finished_at > '-infinity' AND finished_at < '10000-01-01 00:00:00+00') THEN finished_at
                       ELSE now() END,
    attempts = least(greatest(attempts, 0), 999999),
    errors = CASE WHEN jsonb_typeof(errors) = 'array' THEN errors ELSE jsonb_build_array(errors) END
WHERE NOT (run_at > '-infinity' AND run_at < '10000-01-01 00:00:00+00')
   OR NOT (locked_until IS NULL OR (locked_until > '-infinity' AND locked_until < '10000-01-01 00:00:00+00'))
   OR NOT (finished_at IS NULL OR (finished_at > '-infinity' AND finished_at < '10000-01-01 00:00:00+00'))
   OR attempts < 0 OR attempts > 999999
   OR jsonb_typeof(errors) <> 'array';

ALTER TABLE contact_sync.jobs ADD CONSTRAINT jobs_values_check CHECK (CASE
    WHEN NOT (run_at > '-infinity' AND run_at < '10000-01-01 00:00:00+00') THEN
        contact_sync.reject('contact_sync: run_at must be a finite time before the year 10000, got ' || run_at::text,
                            'pass a timestamp (or omit run_at for now)', NULL)
    WHEN NOT (created_at > '-infinity' AND created_at < '10000-01-01 00:00:00+00') THEN
        contact_sync.reject('contact_sync: created_at must be a finite time before the year 10000, got ' || created_at::text,
                            'omit created_at: it defaults to now()', NULL)
    WHEN locked_until IS NOT NULL AND NOT (locked_until > '-infinity' AND locked_until < '10000-01-01 00:00:00+00') THEN
        contact_sync.reject('contact_sync: locked_until must be a finite time before the year 10000, got ' || locked_until::text,
                            'leases are the worker''s to set; leave it NULL', NULL)
    WHEN finished_at IS NOT NULL AND NOT (finished_at > '-infinity' AND finished_at < '10000-01-01 00:00:00+00') THEN
        contact_sync.reject('contact_sync: finished_at must be a finite time before the year 10000, got ' || finished_at::text,
                            'leave it NULL: the worker sets it', NULL)
    WHEN attempts < 0 OR attempts > 999999 THEN
        contact_sync.reject('contact_sync: attempts must be between 0 and 999999, got ' || attempts,
                            'omit attempts: it starts at 0', NULL)
    WHEN jsonb_typeof(errors) <> 'array' THEN
        contact_sync.reject('contact_sync: errors must be a JSON array, got ' || jsonb_typeof(errors),
                            'omit errors: it starts as []', NULL)
    ELSE true
END) NOT VALID;
ALTER TABLE contact_sync.jobs VALIDATE CONSTRAINT jobs_values_check;
