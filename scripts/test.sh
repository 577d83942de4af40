#!/usr/bin/env bash
# Runs every test on a fresh machine: installs PostgreSQL when missing, starts a throwaway
# cluster (each test then makes its own database in it), runs `cargo test`, removes the cluster.
# Extra arguments go to `cargo test` (e.g. `scripts/test.sh ordering`).
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=scripts/pg-throwaway.sh
source scripts/pg-throwaway.sh
# The TLS test serves a self-signed certificate with the openssl command-line tool; the sandbox
# test runs JustClick's own PHP example client (php with curl) against the sandbox; the browser
# test drives Debian's Chromium through its ChromeDriver.
missing=()
command -v openssl >/dev/null || missing+=(openssl)
if ! command -v php >/dev/null || ! php -m 2>/dev/null | grep -qx curl; then
    missing+=(php-cli php-curl)
fi
command -v chromium >/dev/null || missing+=(chromium)
command -v chromedriver >/dev/null || missing+=(chromium-driver)
if [ ${#missing[@]} -gt 0 ] && [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
fi
# The test cluster trades durability for speed; the benchmark runs with fsync on.
PG_EXTRA_CONF=$'fsync = off\nsynchronous_commit = off\nfull_page_writes = off' pg_throwaway_start
cargo test --locked "$@"
