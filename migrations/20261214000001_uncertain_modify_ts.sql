-- A call whose answer was lost (a timeout, a worker gone mid-call, a call abandoned at
-- shutdown) may have reached Smartlink or not: the newest modify_ts it may have carried is kept
-- per contact, so that a change older than that is never merged into a newer call (where it
-- would apply for certain, while the provider, had the lost call arrived, discards it).
-- A contact may now have an uncertain modify_ts before any delivered one.
ALTER TABLE contact_sync.smartlink_watermarks ALTER COLUMN modify_ts DROP NOT NULL;
ALTER TABLE contact_sync.smartlink_watermarks ADD COLUMN uncertain_ts bigint;
