#!/usr/bin/env bash
# Connect rate and idle memory with lifecycle events and presence off and
# on, alternating in one run (issue 14's targets: connect rate on >= 0.8 of
# off; idle memory within 0.3 KB):
#   bash bench/lifecycle-ab.sh [BINARY]
#   N=2000 ROUNDS=3 IDLE_N=5000 bash bench/lifecycle-ab.sh target/release/wsproxy
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${1:-target/release/wsproxy}
BENCH=${BENCH:-target/release/wsproxy-bench}
[[ -x $BENCH ]] || cargo build --release -q -p wsproxy-bench
REDIS_PORT=${REDIS_PORT:-6431}
WS_PORT=${WS_PORT:-8131}
redis-server --port "$REDIS_PORT" --bind 127.0.0.1 --save '' --appendonly no --daemonize yes >/dev/null
trap 'redis-cli -p "$REDIS_PORT" shutdown nosave >/dev/null 2>&1 || true' EXIT
sleep 0.5
start() { # env for wsproxy; sets pid
  env HOST=127.0.0.1 PORT=$WS_PORT REDIS_URL=redis://127.0.0.1:$REDIS_PORT RUST_LOG=warn "$@" "$BIN" >/dev/null 2>&1 &
  pid=$!
  for _ in $(seq 1 50); do curl -sf "http://127.0.0.1:$WS_PORT/ready" >/dev/null && break; sleep 0.1; done
}
stop() { kill "$pid"; wait "$pid" 2>/dev/null || true; }
run() { # $1 = label, rest = env for wsproxy; each measure on a fresh process
  local label=$1; shift
  local b=("$BENCH" --redis "redis://127.0.0.1:$REDIS_PORT" --wsproxy "ws://127.0.0.1:$WS_PORT")
  start "$@"
  printf '%-4s %s\n' "$label" "$("${b[@]}" connect --n "${N:-2000}" | tr -s ' ')"
  stop
  start "$@"
  printf '%-4s %s\n' "$label" "$("${b[@]}" idle --n "${IDLE_N:-5000}" --pids "$pid" | tr -s ' ')"
  stop
}
for round in $(seq 1 "${ROUNDS:-3}"); do
  echo "round $round"
  run off
  run on LIFECYCLE_EVENTS=true PRESENCE=true
done
