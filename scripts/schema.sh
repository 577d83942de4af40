#!/usr/bin/env bash
# Rewrites schema/contact_sync.sql (the current schema, as the migrations build it) and pins the
# checksums of new migrations in schema/migrations.sha384, on a throwaway PostgreSQL cluster.
# Run it after adding a migration and commit both files; the `schema::` tests check them.
set -euo pipefail
cd "$(dirname "$0")/.."
CONTACT_SYNC_UPDATE_SCHEMA=1 bash scripts/test.sh --test it -- schema:: --test-threads 1
git --no-pager diff --stat -- schema/ || true
