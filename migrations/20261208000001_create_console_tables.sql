-- The operator console (`contact-sync console`): its sessions, its audit trail, and the
-- per-minute activity its overview charts.

-- A signed-in browser: the SHA-256 of its cookie's token (the token itself is never stored),
-- who it is, the token its forms must carry (CSRF), and a digest of the password hash it
-- signed in with (a changed password ends the session).
CREATE TABLE contact_sync.console_sessions (
    token_sha256 bytea PRIMARY KEY,
    username text NOT NULL,
    role text NOT NULL CHECK (role IN ('viewer', 'operator')),
    csrf_token text NOT NULL,
    credential text NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now(),
    expires_at timestamptz NOT NULL
);
CREATE INDEX console_sessions_expires_idx ON contact_sync.console_sessions (expires_at);
COMMENT ON TABLE contact_sync.console_sessions IS 'contact-sync: console sessions (token digests, never tokens)';

-- Every action taken from the console: who, what, on which filter or job, how many jobs.
CREATE TABLE contact_sync.console_audit (
    id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    at timestamptz NOT NULL DEFAULT now(),
    username text NOT NULL,
    action text NOT NULL,
    target text NOT NULL,
    jobs bigint NOT NULL,
    outcome text NOT NULL
);
COMMENT ON TABLE contact_sync.console_audit IS 'contact-sync: actions taken from the console';

-- Deliveries and failed attempts per account and minute, added by each worker's completer
-- every few seconds (one row per account and minute, whatever the throughput): what the
-- console's overview charts without counting finished jobs.
CREATE TABLE contact_sync.activity (
    account text NOT NULL,
    minute timestamptz NOT NULL,
    delivered bigint NOT NULL DEFAULT 0,
    failed bigint NOT NULL DEFAULT 0,
    PRIMARY KEY (account, minute)
);
COMMENT ON TABLE contact_sync.activity IS 'contact-sync: deliveries and failed attempts per account and minute';
