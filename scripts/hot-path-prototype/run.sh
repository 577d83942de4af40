#!/usr/bin/env bash
# run.sh DESIGN N : load N jobs, then claim+complete batches of 256 in one session until empty;
# prints wall seconds and the session backend's CPU µs per job.
set -euo pipefail
design=$1; N=$2
dir=$(cd "$(dirname "$0")" && pwd)
# shellcheck source=scripts/hot-path-prototype/loop.sh
source "$dir/loop.sh"
psql -q -c "truncate p.jobs, p.history; truncate contact_sync.jobs, contact_sync.contacts, contact_sync.contacts_dirty" >/dev/null
if [ "$design" = proto ]; then
  psql -q -c "insert into p.jobs (provider, account, email, payload) select 'justclick', 'bench_jc', 'user' || g || '@bench.example.com', jsonb_build_object('lead_name', 'User ' || g, 'lead_city', 'Москва') from generate_series(1, $N) g"
  body=$dir/claim_complete.sql
else
  psql -q -c "insert into contact_sync.jobs (provider, account, email, payload) select 'justclick', 'bench_jc', 'user' || g || '@bench.example.com', jsonb_build_object('lead_name', 'User ' || g, 'lead_city', 'Москва') from generate_series(1, $N) g"
  body=$dir/current_claim_complete.sql
fi
psql -q -c "vacuum analyze" -c checkpoint
reps=$(( (N + 255) / 256 ))
run_loop "$body" "$reps"
left=$(psql -Atq -c "select (select count(*) from p.jobs) + (select count(*) from contact_sync.jobs where state <> 'succeeded')")
echo "$design N=$N wall=${LOOP_WALL}s backend_cpu_us_per_job=$(python3 -c "import sys; print(f'{int(sys.argv[1]) * 10000 / int(sys.argv[2]):.1f}')" "$LOOP_TICKS" "$N") left=$left"
