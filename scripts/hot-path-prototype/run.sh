#!/usr/bin/env bash
# run.sh DESIGN N : load N jobs, then claim+complete batches of 256 in one session until empty;
# prints wall seconds and the session backend's CPU µs per job.
set -euo pipefail
design=$1; N=$2
dir=$(cd "$(dirname "$0")" && pwd)
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
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
{
  echo "\\set client_id 1"
  echo "SELECT pg_backend_pid() AS pid \\gset"
  echo "\\setenv PID :pid"
  echo "\\o /dev/null"
  echo "\\! awk '{print \$14+\$15}' /proc/\$PID/stat > $tmp/cpu0"
  for ((i = 0; i < reps; i++)); do cat "$body"; done
  echo "\\! awk '{print \$14+\$15}' /proc/\$PID/stat > $tmp/cpu1"
} > $tmp/script.sql
s=$(date +%s.%N)
psql -q -X -f $tmp/script.sql
e=$(date +%s.%N)
left=$(psql -Atq -c "select (select count(*) from p.jobs) + (select count(*) from contact_sync.jobs where state <> 'succeeded')")
c0=$(cat $tmp/cpu0); c1=$(cat $tmp/cpu1)
python3 -c "import sys; N,s,e,c0,c1,left=int(sys.argv[1]),float(sys.argv[2]),float(sys.argv[3]),int(sys.argv[4]),int(sys.argv[5]),int(sys.argv[6]); print(f'$design N={N} wall={e-s:.2f}s backend_cpu_us_per_job={(c1-c0)*10000/N:.1f} left={left}')" $N $s $e $c0 $c1 $left
