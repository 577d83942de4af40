#!/usr/bin/env bash
# blocked.sh DESIGN REPS: 10,000 contacts with a head scheduled in an hour and 5 due changes
# behind it (50,000 blocked), then 20,000 ready jobs; REPS claim+complete rounds; CPU per
# delivered job.
set -euo pipefail
design=$1; reps=$2
dir=$(cd "$(dirname "$0")" && pwd)
# shellcheck source=scripts/hot-path-prototype/loop.sh
source "$dir/loop.sh"
psql -q -c "truncate p.jobs, p.history; truncate contact_sync.jobs, contact_sync.contacts, contact_sync.contacts_dirty" >/dev/null
if [ "$design" = proto ]; then t=p.jobs; body=$dir/claim_complete.sql; else t=contact_sync.jobs; body=$dir/current_claim_complete.sql; fi
psql -q -c "insert into $t (provider, account, email, payload, run_at) select 'justclick', 'bench_jc', 'blocked' || g || '@bench.example.com', '{}', now() + interval '1 hour' from generate_series(1, 10000) g"
psql -q -c "insert into $t (provider, account, email, payload) select 'justclick', 'bench_jc', 'blocked' || g || '@bench.example.com', jsonb_build_object('lead_name', 'B' || d) from generate_series(1, 10000) g, generate_series(1, 5) d"
psql -q -c "insert into $t (provider, account, email, payload) select 'justclick', 'bench_jc', 'ready' || g || '@bench.example.com', '{\"lead_name\": \"R\"}' from generate_series(1, 20000) g"
psql -q -c "vacuum analyze" -c checkpoint
run_loop "$body" "$reps"
if [ "$design" = proto ]; then done_n=$(psql -Atq -c "select count(*) from p.history"); else done_n=$(psql -Atq -c "select count(*) from contact_sync.jobs where state = 'succeeded'"); fi
echo "$design blocked: delivered=$done_n wall=${LOOP_WALL}s backend_cpu_us_per_delivered_job=$(python3 -c "import sys; print(f'{int(sys.argv[1]) * 10000 / max(int(sys.argv[2]), 1):.1f}')" "$LOOP_TICKS" "$done_n")"
