-- A prototype of the hot-path redesign (issue 25), for measurement only: not the product's
-- schema, never installed by contact-sync. Open work only in p.jobs; a finished job leaves it at
-- completion, into p.history (no index). A contact's next change is claimable when no lower
-- open job of the contact exists (one probe of jobs_contact); a due change found behind another
-- is parked (parked_behind) so that later claims do not read it again, and is unparked when the
-- job it waits for leaves. See docs/performance.md, "The redesign, measured as a prototype".
DROP SCHEMA IF EXISTS p CASCADE;
CREATE SCHEMA p;
CREATE TABLE p.jobs (
  id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
  provider text NOT NULL, account text NOT NULL, email text NOT NULL,
  contact_key text GENERATED ALWAYS AS (provider || ':' || account || ':' || lower(email)) STORED,
  payload jsonb NOT NULL DEFAULT '{}', idempotency_key text,
  attempts int NOT NULL DEFAULT 0, max_attempts int, run_at timestamptz NOT NULL DEFAULT now(),
  created_at timestamptz NOT NULL DEFAULT now(), locked_until timestamptz, locked_by text,
  parked_behind bigint,
  last_error text, errors jsonb NOT NULL DEFAULT '[]')
  WITH (autovacuum_vacuum_scale_factor = 0.02, autovacuum_vacuum_cost_delay = 0);
CREATE INDEX jobs_ready ON p.jobs (account, run_at, id) WHERE locked_by IS NULL AND parked_behind IS NULL;
CREATE INDEX jobs_contact ON p.jobs (contact_key, id);
CREATE INDEX jobs_locked ON p.jobs (locked_by) WHERE locked_by IS NOT NULL;
CREATE INDEX jobs_parked ON p.jobs (parked_behind) WHERE parked_behind IS NOT NULL;
CREATE UNIQUE INDEX jobs_idem ON p.jobs (account, idempotency_key) WHERE idempotency_key IS NOT NULL;
CREATE TABLE p.history (id bigint, provider text, account text, email text, contact_key text, payload jsonb,
  attempts int, created_at timestamptz, finished_at timestamptz, state text, last_error text, errors jsonb);
