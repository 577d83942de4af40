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

-- Jobs from before migration 20261126000001, whose idempotency key is empty or longer than 200
-- characters: that constraint was added NOT VALID, so it held for every new version of such a
-- row, and the claim's update of one failed every claim of every account (found by the same
-- check). First, since that constraint holds for every row the updates below write. Their keys
-- are dropped (an empty one never matched anything useful; a longer one
-- cannot be sent again under that key anyway), and the constraint is validated.
UPDATE contact_sync.jobs SET idempotency_key = NULL
WHERE idempotency_key IS NOT NULL AND length(idempotency_key) NOT BETWEEN 1 AND 200;
ALTER TABLE contact_sync.jobs VALIDATE CONSTRAINT jobs_idempotency_key_1_to_200_characters;

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


-- The times of contact-sync's other tables, which only it writes but an operator may edit by
-- hand: one `accounts.refilled_at` of -infinity failed every claim of every rate-limited
-- account, an infinite `doi_ledger.sent_at` made the call of its contact panic and stay
-- `running`, and such a time in `accounts`, `workers`, `synced`, `console_audit`,
-- `capture_sources` or `activity` made `status`, `accounts list`, `workers`, `/metrics` or the
-- console fail. Each is now finite and before the year 10000 (an existing one outside is set to
-- now; a per-minute counter row outside is dropped), a plain CHECK constraint.
DO $migration$
DECLARE
    c record;
BEGIN
    FOR c IN
        SELECT table_name::text AS t, column_name::text AS col
        FROM information_schema.columns
        WHERE table_schema = 'contact_sync' AND data_type = 'timestamp with time zone'
          AND table_name IN ('accounts', 'activity', 'backfills', 'capture_failures',
                             'capture_rejections', 'capture_sources', 'console_audit',
                             'console_sessions', 'doi_deferred', 'doi_ledger',
                             'smartlink_watermarks', 'synced', 'workers')
        ORDER BY 1, 2
    LOOP
        IF c.t = 'activity' THEN
            -- (a minute of the per-minute counters is part of their key: such a row is dropped)
            EXECUTE format('DELETE FROM contact_sync.%I '
                           'WHERE NOT (%I > ''-infinity'' AND %I < ''10000-01-01 00:00:00+00'')',
                           c.t, c.col, c.col);
        ELSE
            EXECUTE format('UPDATE contact_sync.%I SET %I = now() '
                           'WHERE NOT (%I > ''-infinity'' AND %I < ''10000-01-01 00:00:00+00'')',
                           c.t, c.col, c.col, c.col);
        END IF;
        EXECUTE format('ALTER TABLE contact_sync.%I ADD CONSTRAINT %I '
                       'CHECK (%I > ''-infinity'' AND %I < ''10000-01-01 00:00:00+00'')',
                       c.t, c.t || '_' || c.col || '_usable', c.col, c.col);
    END LOOP;
END
$migration$;

-- The account lists of `workers` and `backfills`: a NULL in one (an edit by hand) made
-- `workers`, the console's overview, and every `backfill` of that source, `--restart`
-- included, fail. They are refused now (such an element is dropped first).
UPDATE contact_sync.workers SET accounts = array_remove(accounts, NULL)
WHERE array_position(accounts, NULL) IS NOT NULL;
UPDATE contact_sync.backfills SET accounts = array_remove(accounts, NULL)
WHERE array_position(accounts, NULL) IS NOT NULL;
ALTER TABLE contact_sync.workers ADD CONSTRAINT workers_accounts_without_null
    CHECK (array_position(accounts, NULL) IS NULL);
ALTER TABLE contact_sync.backfills ADD CONSTRAINT backfills_accounts_without_null
    CHECK (array_position(accounts, NULL) IS NULL);
