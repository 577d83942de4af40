-- The queue of contacts is replaced by the jobs' own order (issue 25).
--
-- Before: a row per contact with open work (contact_sync.contacts) said which job was its
-- head, kept by PL/pgSQL triggers on every insert, update and delete of a job: each job wrote
-- its contact's row three times besides its own, producers at READ COMMITTED locked that row,
-- and producers at other levels noted their contacts for a re-read (contacts_dirty).
--
-- Now a pending job is claimable when it is due, not waiting, and its contact has no running
-- job and no lower pending one: one probe of jobs_running_contact_idx and one of
-- jobs_pending_contact_idx per candidate, taken by the claim itself. A due job found behind
-- another is set waiting (waits_for = the job it was found behind): it leaves jobs_ready_idx, so
-- no later claim reads it again. A contact's waiting jobs come back one at a time, in order:
-- whatever ends or reschedules a contact's call brings back the contact's first pending job if
-- it is waiting and no call is in flight (its later jobs ride along with it, coalesced, or are
-- set waiting again behind it); a sweep over the contacts with waiting jobs catches what a
-- completion missed. Producers only insert, at every isolation level; triggers stay for
-- validation alone. The unique index on running contacts stays the last word on "never two
-- calls in flight for one contact".
DROP TRIGGER jobs_after_update ON contact_sync.jobs;
DROP TRIGGER jobs_after_delete ON contact_sync.jobs;
DROP TRIGGER jobs_after_truncate ON contact_sync.jobs;
DROP FUNCTION contact_sync.jobs_after_update();
DROP FUNCTION contact_sync.jobs_after_delete();
DROP FUNCTION contact_sync.jobs_after_truncate();
DROP FUNCTION contact_sync.rebuild_contacts();
DROP FUNCTION contact_sync.refresh_contacts(text[]);
DROP TABLE contact_sync.contacts;
DROP TABLE contact_sync.contacts_dirty;

ALTER TABLE contact_sync.jobs ADD COLUMN waits_for bigint;
COMMENT ON COLUMN contact_sync.jobs.waits_for IS
    'contact-sync: for a pending job found behind another open job of its contact, that job: it is claimed once that job has left running or pending';

CREATE INDEX jobs_ready_idx ON contact_sync.jobs (account, run_at, id)
    WHERE state = 'pending' AND waits_for IS NULL;
CREATE INDEX jobs_waiting_idx ON contact_sync.jobs (contact_key, id)
    WHERE state = 'pending' AND waits_for IS NOT NULL;

CREATE OR REPLACE FUNCTION contact_sync.jobs_after_insert() RETURNS trigger
LANGUAGE plpgsql SET plan_cache_mode = force_custom_plan SET jit = off AS $fn$
BEGIN
    PERFORM 1 FROM new_jobs n WHERE NOT contact_sync.validate_job(n.provider, n.email, n.payload);
    PERFORM contact_sync.reject('contact_sync: run_at must be a finite time, got ' || n.run_at::text,
                                'pass a timestamp (or omit run_at for now)', to_jsonb(n.id))
    FROM new_jobs n WHERE NOT isfinite(n.run_at);
    PERFORM pg_notify('contact_sync_jobs', '');
    RETURN NULL;
END
$fn$;

-- A job moved to another contact by hand (its provider, account or address edited) stops
-- waiting: it takes its place in its new contact's order at the next claim.
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
    IF NEW.provider IS DISTINCT FROM OLD.provider OR NEW.account IS DISTINCT FROM OLD.account
       OR lower(NEW.email) IS DISTINCT FROM lower(OLD.email) THEN
        NEW.waits_for := NULL;
    END IF;
    RETURN NEW;
END
$fn$;
DROP TRIGGER jobs_validate_update ON contact_sync.jobs;
CREATE TRIGGER jobs_validate_update BEFORE UPDATE OF provider, account, email, payload, run_at ON contact_sync.jobs
    FOR EACH ROW EXECUTE FUNCTION contact_sync.jobs_before_update();
