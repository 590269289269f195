#!/usr/bin/env bash
# One wsproxy binary under several environments (an allocator preloaded, a
# malloc setting), interleaved: each round starts it fresh per scenario and
# prints idle RSS per connection, down flat out, and down at 2,000/s.
#
#   bash bench/alloc-ab.sh "glibc=env" "one-arena=env MALLOC_ARENA_MAX=1" \
#     "jemalloc=env LD_PRELOAD=/usr/lib/x86_64-linux-gnu/libjemalloc.so.2"
#   BIN=/tmp/wsproxy-old ROUNDS=3 WHAT="idle down" bash bench/alloc-ab.sh "old=env"
#   TARGET=reliable WHAT=idle bash bench/alloc-ab.sh "r=env RELIABLE_SESSIONS=true"
#   N_RATE=1000 WHAT=rate bash bench/alloc-ab.sh "w2=env" "w1=env TOKIO_WORKER_THREADS=1"
#   WHAT=up bash bench/alloc-ab.sh "old=/tmp/run-old.sh" "new=/tmp/run-new.sh"
# (N: connections held idle, default 10000; N_RATE: sessions at 2,000/s, default 100)
# Each argument is LABEL=PREFIX, PREFIX a command prefix such as "env X=y".
set -uo pipefail
cd "$(dirname "$0")/.."
(($#)) || { echo "usage: bash bench/alloc-ab.sh LABEL=PREFIX [LABEL=PREFIX ...]" >&2; exit 2; }
BIN=${BIN:-target/release/wsproxy}
BENCH=${BENCH:-target/release/wsproxy-bench}
[[ -x $BENCH ]] || cargo build --release -q -p wsproxy-bench
RP=${REDIS_PORT:-6431}
WP=${WS_PORT:-8131}
redis-server --port "$RP" --bind 127.0.0.1 --save '' --appendonly no --daemonize yes >/dev/null
trap 'redis-cli -p "$RP" shutdown nosave >/dev/null 2>&1 || true' EXIT
sleep 0.5
run=("$BENCH" --redis "redis://127.0.0.1:$RP" --wsproxy "ws://127.0.0.1:$WP")
for round in $(seq 1 "${ROUNDS:-2}"); do
  for spec in "$@"; do
    label=${spec%%=*}
    prefix=${spec#*=}
    for what in ${WHAT:-idle down rate}; do
      # shellcheck disable=SC2086 # the prefix is meant to split into words
      HOST=127.0.0.1 PORT=$WP REDIS_URL=redis://127.0.0.1:$RP RUST_LOG=warn $prefix "$BIN" >/dev/null 2>&1 &
      pid=$!
      for _ in $(seq 1 50); do curl -sf "http://127.0.0.1:$WP/ready" >/dev/null && break; sleep 0.1; done
      case $what in
        idle) out=$("${run[@]}" idle --target "${TARGET:-wsproxy}" --n "${N:-10000}" --pids "$pid" \
                | grep -o 'rss/conn=[0-9]* B') ;;
        down) out=$("${run[@]}" down --n 100 --m "${M:-200000}" --pids "$pid" \
                | grep -oE '(loss=[0-9]+|[0-9]+/s|cpu/op=[^ ]*)' | tr '\n' ' ') ;;
        rate) out=$("${run[@]}" down --n "${N_RATE:-100}" --m 20000 --rate 2000 --pids "$pid" \
                | grep -oE '(loss=[0-9]+|p50=[^ ]*|p99=[^ ]*|cpu/op=[^ ]*)' | tr '\n' ' ') ;;
        # Client messages, each client within WS_CLIENT_MESSAGE_BURST (200)
        # unless M_UP says otherwise.
        # (`up` takes no --pids: the server's CPU is read from /proc.)
        up) ticks() { awk '{print $14 + $15}' "/proc/$pid/stat"; }
            t0=$(ticks)
            out=$("${run[@]}" up --n "${N_UP:-100}" --m "${M_UP:-150}" \
                | grep -oE '(loss=[0-9]+|[0-9]+/s)' | tr '\n' ' ')
            t1=$(ticks)
            out+=$(awk -v t="$((t1 - t0))" -v hz="$(getconf CLK_TCK)" -v n="$(( ${N_UP:-100} * ${M_UP:-150} ))" \
                'BEGIN { printf "cpu/op=%.2fus", t * 1e6 / hz / n }') ;;
        *) echo "WHAT: unknown scenario $what (idle, down, rate, up)" >&2; exit 2 ;;
      esac
      echo "round $round $label $what: $out"
      kill "$pid"
      wait "$pid" 2>/dev/null
    done
  done
done
