# Sourced by run.sh and blocked.sh: runs BODY (a claim and a completion) REPS times in one psql
# session and sets LOOP_WALL (seconds) and LOOP_TICKS (that session backend's CPU, in clock
# ticks of 10 ms, read from /proc: psql must run on the database's host).
run_loop() {
  local body=$1 reps=$2 tmp i s e
  tmp=$(mktemp -d)
  {
    echo "\\set client_id 1"
    echo "SELECT pg_backend_pid() AS pid \\gset"
    echo "\\setenv PID :pid"
    echo "\\o /dev/null"
    echo "\\! awk '{print \$14+\$15}' /proc/\$PID/stat > $tmp/cpu0"
    for ((i = 0; i < reps; i++)); do cat "$body"; done
    echo "\\! awk '{print \$14+\$15}' /proc/\$PID/stat > $tmp/cpu1"
  } > "$tmp/script.sql"
  s=$(date +%s.%N)
  psql -q -X -f "$tmp/script.sql"
  e=$(date +%s.%N)
  LOOP_WALL=$(python3 -c "import sys; print(f'{float(sys.argv[2]) - float(sys.argv[1]):.2f}')" "$s" "$e")
  LOOP_TICKS=$(( $(cat "$tmp/cpu1") - $(cat "$tmp/cpu0") ))
  rm -rf "$tmp"
}
