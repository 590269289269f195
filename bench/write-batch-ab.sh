#!/usr/bin/env bash
# Two wsproxy binaries A and B, alternating on fresh processes against one
# private Redis: `down` flat out (delivered/s, and wsproxy's CPU per
# delivered message from /proc) and `down` at a fixed offered rate (p99).
# Made for issue 25's write coalescing (one flush per burst against one per
# message), usable for any A/B of the delivery path:
#   bash bench/write-batch-ab.sh A_BINARY B_BINARY
#   ROUNDS=5 N=1000 M=100000 RATE=2000 bash bench/write-batch-ab.sh a b
set -euo pipefail
cd "$(dirname "$0")/.."
A=$1
B=$2
BENCH=${BENCH:-target/release/wsproxy-bench}
[[ -x $BENCH ]] || cargo build --release -q -p wsproxy-bench
port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
REDIS_PORT=$(port)
WS_PORT=$(port)
redis-server --port "$REDIS_PORT" --bind 127.0.0.1 --save '' --appendonly no --daemonize yes >/dev/null
trap 'redis-cli -p "$REDIS_PORT" shutdown nosave >/dev/null 2>&1 || true' EXIT
sleep 0.5
start() { # $1 = binary; sets pid
  env HOST=127.0.0.1 PORT=$WS_PORT REDIS_URL=redis://127.0.0.1:$REDIS_PORT RUST_LOG=warn "$1" >/dev/null 2>&1 &
  pid=$!
  for _ in $(seq 1 50); do curl -sf "http://127.0.0.1:$WS_PORT/ready" >/dev/null && break; sleep 0.1; done
}
stop() { kill "$pid"; wait "$pid" 2>/dev/null || true; }
cpu_ms() { # user + system of $pid, in ms
  awk -v hz="$(getconf CLK_TCK)" '{print ($14 + $15) * 1000 / hz}' "/proc/$pid/stat"
}
run() { # $1 = label, $2 = binary
  local b=("$BENCH" --redis "redis://127.0.0.1:$REDIS_PORT" --wsproxy "ws://127.0.0.1:$WS_PORT")
  local m=${M:-100000}
  start "$2"
  local before after line
  before=$(cpu_ms)
  line=$("${b[@]}" down --n "${N:-1000}" --m "$m" | tr -s ' ')
  after=$(cpu_ms)
  printf '%s flat:  %s  wsproxy cpu %.0f ms = %.2f us/msg\n' "$1" "$line" "$((${after%.*} - ${before%.*}))" \
    "$(python3 -c "print((${after} - ${before}) * 1000 / $m)")"
  stop
  start "$2"
  printf '%s rate:  %s\n' "$1" "$("${b[@]}" down --n "${N:-1000}" --m "$((${RATE:-2000} * 10))" --rate "${RATE:-2000}" | tr -s ' ')"
  stop
}
for round in $(seq 1 "${ROUNDS:-3}"); do
  echo "round $round"
  run A "$A"
  run B "$B"
done
