-- A parked change (dead or cancelled) remembers the newest change of its contact delivered
-- after it, so that retention can delete that delivered row without rescanning it on every
-- batch, and `retry` still refuses to re-send the older change over it.
--
-- Before: a delivered job was kept as long as an older parked job of its contact existed, and
-- every retention batch read all such kept rows again (200,000 of them: 800,000 buffers and
-- 0.4 s per batch of 1,000, every 200 ms per worker).
ALTER TABLE contact_sync.jobs ADD COLUMN overtaken_by bigint;

COMMENT ON COLUMN contact_sync.jobs.overtaken_by IS
    'contact-sync: for a dead or cancelled job, the newest later change of its contact that was delivered and has since been pruned (retry refuses to re-send this job over it)';

-- The kept rows of the old rule: their parked jobs learn of them now, so the first batches
-- after the upgrade can delete them.
UPDATE contact_sync.jobs p
SET overtaken_by = n.newest
FROM (
    SELECT o.id, max(d.id) AS newest
    FROM contact_sync.jobs o
    JOIN contact_sync.jobs d ON d.contact_key = o.contact_key AND d.id > o.id
                            AND d.state IN ('succeeded', 'coalesced')
    WHERE o.state IN ('dead', 'cancelled')
    GROUP BY o.id
) n
WHERE p.id = n.id;
