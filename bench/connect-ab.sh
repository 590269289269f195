#!/usr/bin/env bash
# Authenticated connects, binaries A and B alternating on fresh processes
# (a fresh redis-server and a fresh wsproxy each run), lifecycle off:
#   bash bench/connect-ab.sh BASE_BINARY NEW_BINARY
#   N=5000 ROUNDS=3 bash bench/connect-ab.sh /tmp/wsproxy-base target/release/wsproxy
# Prints wsproxy-bench's connect line and the CPU (utime+stime, from
# /proc/PID/stat) wsproxy and Redis spent per connect over the whole run
# (connect and close), and how many commands Redis answered with NOSCRIPT
# (a script not in its cache yet; the run starts on a fresh redis-server).
set -euo pipefail
cd "$(dirname "$0")/.."
A=$1
B=$2
BENCH=${BENCH:-target/release/wsproxy-bench}
REDIS_PORT=${REDIS_PORT:-6461}
WS_PORT=${WS_PORT:-8161}
N=${N:-5000}
TCK=$(getconf CLK_TCK)
cpu() { awk '{print $14+$15}' "/proc/$1/stat"; }
one() { # $1 = label, $2 = binary
  redis-server --port "$REDIS_PORT" --bind 127.0.0.1 --save '' --appendonly no >/dev/null 2>&1 &
  local rpid=$!
  for _ in $(seq 1 50); do redis-cli -p "$REDIS_PORT" ping >/dev/null 2>&1 && break; sleep 0.1; done
  HOST=127.0.0.1 PORT=$WS_PORT REDIS_URL=redis://127.0.0.1:$REDIS_PORT RUST_LOG=warn "$2" >/dev/null 2>&1 &
  local wpid=$!
  for _ in $(seq 1 50); do curl -sf "http://127.0.0.1:$WS_PORT/ready" >/dev/null && break; sleep 0.1; done
  local w0 r0 w1 r1 line
  w0=$(cpu "$wpid"); r0=$(cpu "$rpid")
  line=$("$BENCH" --redis "redis://127.0.0.1:$REDIS_PORT" --wsproxy "ws://127.0.0.1:$WS_PORT" connect --n "$N" | tr -s ' ')
  w1=$(cpu "$wpid"); r1=$(cpu "$rpid")
  local noscript
  noscript=$(redis-cli -p "$REDIS_PORT" info errorstats | tr -d '\r' | awk -F'[=:]' '/^errorstat_NOSCRIPT/ {print $3}')
  printf '%-4s %s | cpu/connect wsproxy %s us redis %s us | NOSCRIPT %s\n' "$1" "$line" \
    "$(( (w1 - w0) * 1000000 / TCK / N ))" "$(( (r1 - r0) * 1000000 / TCK / N ))" "${noscript:-0}"
  kill "$wpid"; wait "$wpid" 2>/dev/null || true
  kill "$rpid"; wait "$rpid" 2>/dev/null || true
}
for round in $(seq 1 "${ROUNDS:-3}"); do
  echo "round $round"
  one A "$A"
  one B "$B"
done
