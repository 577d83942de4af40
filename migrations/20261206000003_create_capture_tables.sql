-- Capture from the application's own tables (`[sources.*]`, `contact-sync capture install`).
-- The triggers themselves are generated per source and installed by the command, not by a
-- migration: they belong to the application's tables and follow its configuration.

-- One row per installed source: what is installed, so `capture verify` can tell the installed
-- mapping from the configured one and the table as it is now.
CREATE TABLE contact_sync.capture_sources (
    source       text        PRIMARY KEY,
    table_name   text        NOT NULL,
    -- md5 of the generated SQL: equal when the configured mapping is the installed one
    mapping_md5  text        NOT NULL,
    -- the columns the mapping reads, with their types when installed (drift is a change of these)
    columns      jsonb       NOT NULL,
    installed_at timestamptz NOT NULL DEFAULT now()
);
COMMENT ON TABLE contact_sync.capture_sources IS 'contact-sync: installed capture triggers, one row per source';

-- A row that could not become a valid change (a malformed address, a value a provider cannot
-- take exactly, an error in a mapping expression on that row). The application's statement
-- commits; the row's change is recorded here instead of in the queue.
CREATE TABLE contact_sync.capture_rejections (
    id          bigint      GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    source      text        NOT NULL,
    account     text        NOT NULL,
    row_key     text        NOT NULL,
    sqlstate    text        NOT NULL,
    reason      text        NOT NULL,
    rejected_at timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX capture_rejections_source_idx ON contact_sync.capture_rejections (source, id);
COMMENT ON TABLE contact_sync.capture_rejections IS 'contact-sync: application rows whose change could not be queued, with the reason';

-- A statement whose changes could not be captured at all: the mapping no longer fits the table
-- (a mapped column renamed or dropped, a type changed) or a TRUNCATE. The application's
-- statement commits; `capture verify` names the drift and a backfill resyncs once fixed.
CREATE TABLE contact_sync.capture_failures (
    id        bigint      GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    source    text        NOT NULL,
    operation text        NOT NULL,
    sqlstate  text        NOT NULL,
    error     text        NOT NULL,
    row_count bigint      NOT NULL,
    failed_at timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX capture_failures_source_idx ON contact_sync.capture_failures (source, id);
COMMENT ON TABLE contact_sync.capture_failures IS 'contact-sync: application statements whose changes could not be captured (mapping drift, TRUNCATE)';
