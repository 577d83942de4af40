-- A confirmation window whose call was answered records which change that call carried, as
-- '<job id>:<md5 of its payload>': the same change sent again unchanged (a retry, a follower
-- sent again) is the same request; sent again edited (changed while its call was in flight),
-- it asked already within the hour, and its status is not asked for again.
ALTER TABLE contact_sync.doi_ledger ADD COLUMN answered text;
