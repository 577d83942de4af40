-- A confirmation window whose call was answered records the digest of the change that call
-- carried: the same change sent again unchanged (a retry, a follower sent again) is the same
-- request; sent again edited (changed while its call was in flight), a new request inside the
-- hour.
ALTER TABLE contact_sync.doi_ledger ADD COLUMN answered_md5 text;
