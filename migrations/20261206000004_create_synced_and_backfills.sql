-- What each provider was last sent, per account and contact, for the accounts a source
-- captures into: the fields of every delivered change merged in delivery order (a field sent
-- replaces the one before; Smartlink attributes merge key by key; modify_ts is not kept).
-- A backfill compares a table's rows with it and sends only what differs.
CREATE TABLE contact_sync.synced (
    contact_key text        PRIMARY KEY,
    fields      jsonb       NOT NULL,
    -- the newest delivered job merged in (a slower completion of an older one changes nothing)
    job_id      bigint      NOT NULL,
    synced_at   timestamptz NOT NULL DEFAULT now()
);
COMMENT ON TABLE contact_sync.synced IS 'contact-sync: the fields each provider was last sent, per captured account and contact';

-- `sent` merged into `known` as the provider takes it.
CREATE FUNCTION contact_sync.merge_sent(known jsonb, sent jsonb) RETURNS jsonb
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $fn$
    SELECT coalesce(known, '{}'::jsonb) || (sent - 'modify_ts' - 'attributes')
        || CASE WHEN sent ? 'attributes'
                THEN jsonb_build_object('attributes', coalesce(known -> 'attributes', '{}'::jsonb) || (sent -> 'attributes'))
                ELSE '{}'::jsonb END
$fn$;

-- One row per source being backfilled (or backfilled last): where it is, what it did. A
-- killed backfill resumes after `last_key`; the page that wrote `last_key` also queued its jobs,
-- in the same transaction.
CREATE TABLE contact_sync.backfills (
    source     text        PRIMARY KEY,
    -- what this run covers: the accounts and the extra condition (a resumed run must match)
    accounts   text[]      NOT NULL,
    condition  text,
    mode       text        NOT NULL CHECK (mode IN ('send', 'force', 'baseline')),
    last_key   text,
    done       boolean     NOT NULL DEFAULT false,
    read       bigint      NOT NULL DEFAULT 0,
    enqueued   bigint      NOT NULL DEFAULT 0,
    unchanged  bigint      NOT NULL DEFAULT 0,
    rejected   bigint      NOT NULL DEFAULT 0,
    started_at timestamptz NOT NULL DEFAULT now(),
    updated_at timestamptz NOT NULL DEFAULT now()
);
COMMENT ON TABLE contact_sync.backfills IS 'contact-sync: backfill cursors, one per source';

-- Several calls' fields merged in order (one contact's calls completed in one batch).
CREATE FUNCTION contact_sync.merge_all(calls jsonb[]) RETURNS jsonb
LANGUAGE plpgsql IMMUTABLE PARALLEL SAFE AS $fn$
DECLARE
    merged jsonb := '{}'::jsonb;
    call jsonb;
BEGIN
    FOREACH call IN ARRAY calls LOOP
        merged := contact_sync.merge_sent(merged, call);
    END LOOP;
    RETURN merged;
END
$fn$;
