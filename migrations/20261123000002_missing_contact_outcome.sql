-- A job can finish without changing anything at the provider: `outcome = 'not_found'` when the
-- provider does not have the contact and the account's `missing_contact = "skip"`.
-- NULL for every other job (delivered, or not finished).
ALTER TABLE contact_sync.jobs ADD COLUMN outcome text;
