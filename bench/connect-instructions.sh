#!/usr/bin/env bash
# Instructions wsproxy executes per authenticated connect (and its close),
# counted by callgrind: repeatable for the same binary and inputs whatever
# else the machine does, so small changes to the connect path show where
# connects/s and CPU a connect drown in noise. Each binary runs twice, with
# N1 and N2 connects, each time on a fresh redis-server; the difference over
# N2-N1 takes out start-up and shutdown. Binaries alternate.
#   bash bench/connect-instructions.sh BASE_BINARY NEW_BINARY [...]
#   ROUNDS=2 N1=200 N2=600 bash bench/connect-instructions.sh /tmp/wsproxy-base target/release/wsproxy
# (memcpy counts one instruction per `rep movsb`, so copies cost more time
# than their share here says; use perf for where time goes.)
set -euo pipefail
cd "$(dirname "$0")/.."
BENCH=${BENCH:-target/release/wsproxy-bench}
REDIS_PORT=${REDIS_PORT:-6483}
WS_PORT=${WS_PORT:-8183}
N1=${N1:-200}
N2=${N2:-600}
OUT=$(mktemp -d)
trap 'rm -rf "$OUT"' EXIT
command -v valgrind >/dev/null || { echo "needs valgrind (apt-get install valgrind)" >&2; exit 1; }
total() { # $1 = binary, $2 = connects; prints the program's instruction count
  redis-server --port "$REDIS_PORT" --bind 127.0.0.1 --save '' --appendonly no >/dev/null 2>&1 &
  local rpid=$!
  for _ in $(seq 1 50); do redis-cli -p "$REDIS_PORT" ping >/dev/null 2>&1 && break; sleep 0.1; done
  # AUTH_TIMEOUT_SECS: valgrind runs the process tens of times slower.
  HOST=127.0.0.1 PORT=$WS_PORT REDIS_URL=redis://127.0.0.1:$REDIS_PORT RUST_LOG=warn AUTH_TIMEOUT_SECS=30 \
    valgrind --tool=callgrind --callgrind-out-file="$OUT/cg.$2" "$1" >/dev/null 2>&1 &
  local wpid=$!
  for _ in $(seq 1 300); do curl -sf "http://127.0.0.1:$WS_PORT/ready" >/dev/null && break; sleep 0.1; done
  "$BENCH" --concurrency 10 --redis "redis://127.0.0.1:$REDIS_PORT" --wsproxy "ws://127.0.0.1:$WS_PORT" \
    connect --n "$2" >/dev/null
  sleep 2
  kill "$wpid"; wait "$wpid" 2>/dev/null || true
  kill "$rpid"; wait "$rpid" 2>/dev/null || true
  callgrind_annotate "$OUT/cg.$2" 2>/dev/null | awk '/PROGRAM TOTALS/ {gsub(",", "", $1); print $1}'
}
for round in $(seq 1 "${ROUNDS:-2}"); do
  for bin in "$@"; do
    a=$(total "$bin" "$N1")
    b=$(total "$bin" "$N2")
    echo "round $round $bin: $(( (b - a) / (N2 - N1) )) instructions a connect"
  done
done
