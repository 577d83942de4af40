-- The running jobs of an account (its in-flight count) no longer answer a probe of one
-- contact's running job.
--
-- The worker now plans its hot statements once per session (generic plans, on the connections
-- `outbox::hot` opens). Both running-job indexes had the predicate `state = 'running'`, so a
-- plan made while the queue was small could read a contact's running job through the account
-- index, every running job of the account filtered one by one, for every probe after. With
-- `account IS NOT NULL` in its predicate, the account index serves only statements that name
-- the account (`account = …` implies it); the contact probe can use only
-- `jobs_running_contact_idx`.
--
-- Running jobs are few, but the build reads the table once (about a second per million rows),
-- in this migration's transaction, after the drop's exclusive lock: every statement on the
-- table, producers' and workers' alike, waits until it commits.
DROP INDEX contact_sync.jobs_running_account_idx;
CREATE INDEX jobs_running_account_idx ON contact_sync.jobs (account)
    WHERE state = 'running' AND account IS NOT NULL;
