#!/usr/bin/env bash
# A kill -9 storm: `turbosched serve` killed with SIGKILL at random instants KILLS times
# (default 100), restarted each time, with TASKS per-second tasks (default 20) under the
# three misfire policies and the three overlap policies, some slow enough to be running at
# each kill. Then one clean run, and the accounting: `turbosched audit` (every tick run,
# skipped or counted as dropped; none doubled; integrity), runs left running or orphaned,
# and children still alive.
#
#   bench/storm.sh [KILLS] [TASKS]        TURBOSCHED_BIN=path/to/turbosched to pick a build
set -euo pipefail
kills=${1:-100}
tasks=${2:-20}
root=$(cd "$(dirname "$0")/.." && pwd)
bin=${TURBOSCHED_BIN:-}
if [ -z "$bin" ]; then
  for candidate in "$root/target/release/turbosched" "$root/target/debug/turbosched"; do
    [ -x "$candidate" ] && { bin=$candidate; break; }
  done
fi
if [ -z "$bin" ]; then
  (cd "$root" && cargo build --release --locked)
  bin=$root/target/release/turbosched
fi
dir=$(mktemp -d)
trap 'rm -rf "$dir"' EXIT
mkdir -p "$dir/config"
policies=(run_once skip run_all)
overlaps=(skip queue replace)
{
  cat <<'TOML'
[scheduler]
timezone = "UTC"
database = "data/scheduler.db"
max_workers = 8
heartbeat_interval = "200ms"
heartbeat_timeout = "3s"
kill_grace = "500ms"
shutdown_grace = "1s"

[api]
bind = "127.0.0.1:0"

[defaults]
handler = "ping"
schedule = "* * * * * *"
misfire_grace = "1h"
TOML
  for i in $(seq 1 "$tasks"); do
    echo "[tasks.t$i]"
    echo "misfire = \"${policies[$((i % 3))]}\""
    echo "overlap = \"${overlaps[$(((i / 3) % 3))]}\""
    echo "retries = 2"
    if [ $((i % 4)) -eq 0 ]; then echo 'params = { sleep_sec = 1.2 }'; fi
  done
} >"$dir/config/scheduler.toml"

cd "$dir"
"$bin" validate >/dev/null
started=$(date +%s)
for i in $(seq 1 "$kills"); do
  "$bin" serve 2>>serve.log &
  pid=$!
  sleep "$(awk -v seed="$RANDOM" 'BEGIN { srand(seed); printf "%.3f", 0.2 + rand() * 2.3 }')"
  kill -9 "$pid" 2>/dev/null || true
  wait "$pid" 2>/dev/null || true
done
stormed=$(( $(date +%s) - started ))
# One clean run: orphans found and settled, catch-ups run, then a graceful stop.
"$bin" serve 2>>serve.log &
pid=$!
sleep 10
kill -TERM "$pid"
wait "$pid" || true

echo "== kill -9 storm: $kills kills in ${stormed}s, $tasks per-second tasks ($bin)"
audit_status=0
"$bin" audit --since 24h || audit_status=$?
stranded=0
for state in running orphaned; do
  n=$("$bin" runs --state "$state" --limit 100000 --json | grep -o '"id":' | wc -l || true)
  echo "runs left $state: $n"
  stranded=$((stranded + n))
done
cd /
alive=0
for proc in /proc/[0-9]*; do
  if [ "$(readlink "$proc/cwd" 2>/dev/null)" = "$dir" ]; then
    echo "alive: ${proc#/proc/} $(tr '\0' ' ' <"$proc/cmdline" 2>/dev/null)"
    alive=$((alive + 1))
  fi
done
echo "processes still alive in the storm's folder: $alive"
if [ "$audit_status" -ne 0 ] || [ "$stranded" -ne 0 ] || [ "$alive" -ne 0 ]; then
  echo "STORM FAILED"
  exit 1
fi
echo "storm ok"
