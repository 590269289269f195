#!/usr/bin/env bash
# Sessions over HTTP (Server-Sent Events) beside WebSockets, in one run:
#   bash bench/sse.sh             # ROUNDS=3 interleaved rounds
#   QUICK=1 bash bench/sse.sh     # small N, to try the script out
#
# Each round starts a fresh private Redis and a fresh wsproxy (release,
# RELIABLE_SESSIONS=true) for each measurement, then measures, WebSocket
# first and event stream second:
#   idle    RSS growth per held connection (N_IDLE of each, fresh process)
#   down    plain sessions, M_DOWN messages round robin over N_DOWN clients,
#           flat out
#   resume  N_RESUME times, a reliable client misses M_RESUME messages and
#           comes back (?epoch=&offset= on a WebSocket, Last-Event-ID on a
#           stream); latency from the reconnect to the last replayed message
# With nchan installed (bench/peers/peers.sh install), also nchan's
# EventSource subscribers beside its WebSocket ones, down at a fixed rate
# and flat out. Results go to bench/results/sse.jsonl (JSON lines) and the
# terminal; nothing is changed in BENCHMARKS.md.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
OUT=bench/results
mkdir -p "$OUT"
JSON=$OUT/sse.jsonl
: >"$JSON"

q() { if [[ -n "${QUICK:-}" ]]; then echo "$1"; else echo "$2"; fi; }
ROUNDS=${ROUNDS:-$(q 1 3)}
N_IDLE=$(q 500 5000)
N_DOWN=$(q 50 100)
M_DOWN=$(q 20000 200000)
N_RESUME=$(q 5 50)
M_RESUME=$(q 200 1000)
RATE=${RATE:-2000}

cargo build --release -q -p wsproxy -p wsproxy-bench
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }

PIDS=()
cleanup() { for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; }
trap cleanup EXIT

# Starts a private Redis and wsproxy; sets REDIS_PORT, WS_PORT, WS_PID, BENCH.
start() {
  cleanup
  PIDS=()
  REDIS_PORT=$(free_port)
  WS_PORT=$(free_port)
  redis-server --port "$REDIS_PORT" --bind 127.0.0.1 --save "" --appendonly no --logfile /dev/null &
  PIDS+=($!)
  for _ in $(seq 1 50); do redis-cli -p "$REDIS_PORT" ping >/dev/null 2>&1 && break; sleep 0.1; done
  HOST=127.0.0.1 PORT=$WS_PORT REDIS_URL="redis://127.0.0.1:$REDIS_PORT" RELIABLE_SESSIONS=true \
    MAX_CONNECTIONS=100000 RUST_LOG=warn "$ROOT/target/release/wsproxy" >/dev/null 2>&1 &
  WS_PID=$!
  PIDS+=("$WS_PID")
  for _ in $(seq 1 100); do curl -sf "http://127.0.0.1:$WS_PORT/ready" >/dev/null && break; sleep 0.1; done
  BENCH=("$ROOT/target/release/wsproxy-bench" --redis "redis://127.0.0.1:$REDIS_PORT"
    --wsproxy "ws://127.0.0.1:$WS_PORT" --json "$JSON" --sources 8)
}

for round in $(seq 1 "$ROUNDS"); do
  echo "== round $round of $ROUNDS"
  start; "${BENCH[@]}" idle --n "$N_IDLE" --pids "$WS_PID"
  start; "${BENCH[@]}" sse idle --n "$N_IDLE" --pids "$WS_PID"
  start
  "${BENCH[@]}" down --n "$N_DOWN" --m "$M_DOWN"
  "${BENCH[@]}" sse down --n "$N_DOWN" --m "$M_DOWN"
  "${BENCH[@]}" resume --n "$N_RESUME" --m "$M_RESUME"
  "${BENCH[@]}" sse resume --n "$N_RESUME" --m "$M_RESUME"
done

if bash bench/peers/peers.sh start >/dev/null 2>&1; then
  NCHAN=http://127.0.0.1:${NCHAN_PORT:-8091}
  echo "== nchan: WebSocket and EventSource subscribers"
  start
  for round in $(seq 1 "$ROUNDS"); do
    "${BENCH[@]}" --nchan "$NCHAN" down --target nchan --n "$N_DOWN" --m "$((M_DOWN / 10))" --rate "$RATE" || true
    "${BENCH[@]}" --nchan "$NCHAN" sse down --peer --n "$N_DOWN" --m "$((M_DOWN / 10))" --rate "$RATE" || true
    "${BENCH[@]}" sse down --n "$N_DOWN" --m "$((M_DOWN / 10))" --rate "$RATE"
    "${BENCH[@]}" --nchan "$NCHAN" sse down --peer --n "$N_DOWN" --m "$((M_DOWN / 10))" || true
    "${BENCH[@]}" sse down --n "$N_DOWN" --m "$((M_DOWN / 10))"
  done
  bash bench/peers/peers.sh stop >/dev/null 2>&1 || true
else
  echo "== nchan is not installed (bash bench/peers/peers.sh install): skipped"
fi
echo "results: $JSON"
