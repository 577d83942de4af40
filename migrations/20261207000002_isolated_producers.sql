-- A producer at REPEATABLE READ or SERIALIZABLE only inserts: it no longer reads, locks or
-- inserts the contacts queue's rows, which the workers write all the time.
--
-- Before: the insert trigger held each contact's row (FOR KEY SHARE) and inserted the missing
-- ones, so a producer whose snapshot predated a worker's change of that row failed with a
-- serialization error (REPEATABLE READ: 0.2-4.4% of transactions recording changes of 50
-- contacts; SERIALIZABLE: 44%, through predicate locks on the small contacts table), where the
-- same producers inserting into a plain table never failed. Now such a producer notes its
-- contacts in contacts_dirty (a plain insert: no unique index, nothing to conflict with) and
-- says so on the NOTIFY channel; a worker reads those contacts again at READ COMMITTED within
-- a moment (`claim::reread_contacts`). Until then the new changes wait; a contact that already
-- had work keeps it, in order.
CREATE OR REPLACE FUNCTION contact_sync.jobs_after_insert() RETURNS trigger
LANGUAGE plpgsql SET plan_cache_mode = force_custom_plan SET jit = off AS $fn$
DECLARE
    todo text[];
BEGIN
    PERFORM 1 FROM new_jobs n WHERE NOT contact_sync.validate_job(n.provider, n.email, n.payload);
    PERFORM contact_sync.reject('contact_sync: run_at must be a finite time, got ' || n.run_at::text,
                                'pass a timestamp (or omit run_at for now)', to_jsonb(n.id))
    FROM new_jobs n WHERE NOT isfinite(n.run_at);
    IF current_setting('transaction_isolation') <> 'read committed' THEN
        INSERT INTO contact_sync.contacts_dirty (contact_key)
        SELECT DISTINCT n.contact_key FROM new_jobs n WHERE n.state IN ('pending', 'running');
        PERFORM pg_notify('contact_sync_jobs', 'reread');
        RETURN NULL;
    END IF;
    todo := ARRAY(SELECT DISTINCT n.contact_key FROM new_jobs n WHERE n.state IN ('pending', 'running'));
    FOR pass IN 1..10 LOOP
        EXIT WHEN cardinality(todo) = 0;
        -- a new contact: its row, head = its first new job (one set-based insert)
        WITH first AS (
            SELECT DISTINCT ON (n.contact_key) n.contact_key, n.account, n.id, n.run_at, n.state
            FROM new_jobs n
            WHERE n.contact_key IN (SELECT unnest(todo)) AND n.state IN ('pending', 'running')
            ORDER BY n.contact_key, (n.state = 'running') DESC, n.id
        ), ins AS (
            INSERT INTO contact_sync.contacts (contact_key, account, head_id, run_at, running)
            SELECT f.contact_key, f.account, f.id, CASE WHEN f.state = 'pending' THEN f.run_at END, f.state = 'running'
            FROM first f ORDER BY f.contact_key
            ON CONFLICT (contact_key) DO NOTHING
            RETURNING contact_key
        )
        SELECT ARRAY(SELECT unnest(todo) EXCEPT SELECT contact_key FROM ins) INTO todo;
        EXIT WHEN cardinality(todo) = 0;
        -- a contact that already has a row: hold it until commit (deleted meanwhile: next pass)
        SELECT ARRAY(SELECT unnest(todo) EXCEPT SELECT s.contact_key FROM (
            SELECT c.contact_key FROM contact_sync.contacts c
            WHERE c.contact_key = ANY(ARRAY(SELECT unnest(todo))) ORDER BY c.contact_key FOR KEY SHARE) s) INTO todo;
    END LOOP;
    IF cardinality(todo) > 0 THEN
        -- only after ten deletes of one row in a row: read those contacts again
        PERFORM contact_sync.refresh_contacts(todo);
    END IF;
    PERFORM pg_notify('contact_sync_jobs', '');
    RETURN NULL;
END
$fn$;
