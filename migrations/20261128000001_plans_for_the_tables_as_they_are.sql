-- Plans made for the tables as they are now, not as they were when a session first ran a
-- statement (issue 10: "plans that need no luck").
--
-- PL/pgSQL keeps each statement's plan for the session: after five runs it may switch to a
-- generic plan and keep it until the table's statistics change. `contact_sync.contacts` holds
-- only contacts with open work, so it is empty whenever the queue is, and a plan made then
-- reads it with a sequential scan (cheapest for one page). When a backlog of a million arrives,
-- every completion's `refresh_contacts` and every producer's insert trigger kept scanning the
-- whole table, 12–130 ms a statement, until autovacuum next analysed it: measured with a worker
-- that had been idle before a backlog, Postgres's CPU per job went from about 100 µs to 450 µs.
--
-- With `plan_cache_mode = force_custom_plan` on these functions, each statement is planned for
-- the table's current size on every call: about 0.1–0.5 ms of planning per statement, paid
-- once per statement (a batch), not per row. The worker's own statements get the same by being
-- sent unprepared (`src/outbox/`).
ALTER FUNCTION contact_sync.refresh_contacts(text[]) SET plan_cache_mode = force_custom_plan;
ALTER FUNCTION contact_sync.rebuild_contacts() SET plan_cache_mode = force_custom_plan;
ALTER FUNCTION contact_sync.jobs_after_insert() SET plan_cache_mode = force_custom_plan;
ALTER FUNCTION contact_sync.jobs_after_update() SET plan_cache_mode = force_custom_plan;
ALTER FUNCTION contact_sync.jobs_after_delete() SET plan_cache_mode = force_custom_plan;
ALTER FUNCTION contact_sync.jobs_check_account_provider() SET plan_cache_mode = force_custom_plan;
