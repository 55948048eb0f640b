#!/usr/bin/env bash
# GET /scheduler/status under load: wrk -t2 -c64 on loopback, 100,000 runs in the history,
# the shipped tasks plus a per-second task that must keep firing on time meanwhile.
# Prints wrk's figures and the per-second task's fire lag. Needs wrk (apt-get install wrk).
#   bash bench/status.sh [seconds=20] [runs=100000]
set -euo pipefail
cd "$(dirname "$0")/.."
seconds=${1:-20}
runs=${2:-100000}
command -v wrk >/dev/null || { echo "wrk is not installed: apt-get install -y wrk" >&2; exit 2; }
cargo build --release -q
bin=$PWD/target/release/turbosched
dir=$(mktemp -d)
trap 'kill $(cat "$dir/pid" 2>/dev/null) 2>/dev/null || true; rm -rf "$dir"' EXIT
mkdir -p "$dir/config"
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
sed -e "s/^bind = .*/bind = \"127.0.0.1:$port\"/" config/scheduler.toml > "$dir/config/scheduler.toml"
cat >> "$dir/config/scheduler.toml" <<'TOML'

[tasks.ticker]
description = "per-second probe: must fire on time while the API is under load"
schedule = "* * * * * *"
command = ["/bin/true"]
overlap = "queue"
TOML
cd "$dir"
"$bin" bench-seed --runs "$runs"
"$bin" serve 2> serve.log & echo $! > pid
for _ in $(seq 1 100); do curl -sf "http://127.0.0.1:$port/health" >/dev/null && break; sleep 0.1; done
echo "== wrk -t2 -c64 -d${seconds}s GET /scheduler/status ($runs runs in the history)"
start=$(date -u +%Y-%m-%dT%H:%M:%SZ)
wrk -t2 -c64 -d"${seconds}s" --latency "http://127.0.0.1:$port/scheduler/status"
end=$(date -u +%Y-%m-%dT%H:%M:%SZ)
kill -TERM "$(cat pid)"; wait "$(cat pid)" 2>/dev/null || true
echo "== the per-second task meanwhile"
"$bin" runs --task ticker --limit 100000 --json | python3 -c "
import json, sys
from datetime import datetime
runs = [r for r in json.load(sys.stdin) if r['trigger'] == 'schedule' and '$start' <= r['scheduled_for'] <= '$end']
ts = lambda s: datetime.fromisoformat(s.replace('Z', '+00:00'))
lags = sorted((ts(r['started_at']) - ts(r['scheduled_for'])).total_seconds() * 1000 for r in runs if r['started_at'])
first, last = ts('$start'), ts('$end')
expected = int((last - first).total_seconds())
q = lambda p: lags[min(len(lags) - 1, int(round((len(lags) - 1) * p)))] if lags else float('nan')
print(f'ticks fired: {len(runs)} of ~{expected}; lag tick -> run started: p50 {q(.5):.2f} ms, p99 {q(.99):.2f} ms, max {lags[-1] if lags else 0:.2f} ms')
print('states:', {s: sum(1 for r in runs if r['state'] == s) for s in set(r['state'] for r in runs)})
"
