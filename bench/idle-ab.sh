#!/usr/bin/env bash
# Idle memory per connection of two (or more) wsproxy binaries, interleaved:
# each round starts every binary fresh, holds N connections with
# `wsproxy-bench idle`, prints its RSS growth per connection, and stops it.
# Memory is not CPU-bound, so this A/B holds up on a busy machine where
# rates would not.
#
#   bash bench/idle-ab.sh OLD_BINARY NEW_BINARY
#   N=10000 ROUNDS=2 bash bench/idle-ab.sh target/release/wsproxy
#   TARGET=reliable EXTRA="env RELIABLE_SESSIONS=true" bash bench/idle-ab.sh target/release/wsproxy
#   KINDS="ws sse" bash bench/idle-ab.sh OLD NEW   # WebSockets and event streams, each on a fresh process
set -euo pipefail
cd "$(dirname "$0")/.."
(($#)) || { echo "usage: bash bench/idle-ab.sh BINARY [BINARY ...]" >&2; exit 2; }
BENCH=${BENCH:-target/release/wsproxy-bench}
[[ -x $BENCH ]] || cargo build --release -q -p wsproxy-bench
REDIS_PORT=${REDIS_PORT:-6421}
WS_PORT=${WS_PORT:-8121}
redis-server --port "$REDIS_PORT" --bind 127.0.0.1 --save '' --appendonly no --daemonize yes >/dev/null
trap 'redis-cli -p "$REDIS_PORT" shutdown nosave >/dev/null 2>&1 || true' EXIT
sleep 0.5
for round in $(seq 1 "${ROUNDS:-3}"); do
  for bin in "$@"; do
   for kind in ${KINDS:-ws}; do
    # shellcheck disable=SC2086 # EXTRA is a command prefix such as "env X=y"
    HOST=127.0.0.1 PORT=$WS_PORT REDIS_URL=redis://127.0.0.1:$REDIS_PORT RUST_LOG=warn ${EXTRA:-} "$bin" >/dev/null 2>&1 &
    pid=$!
    for _ in $(seq 1 50); do curl -sf "http://127.0.0.1:$WS_PORT/ready" >/dev/null && break; sleep 0.1; done
    printf '%s round %s %s: ' "$bin" "$round" "$kind"
    if [[ $kind == sse ]]; then
      what=(sse idle)
    else
      what=(idle --target "${TARGET:-wsproxy}")
    fi
    "$BENCH" --redis "redis://127.0.0.1:$REDIS_PORT" --wsproxy "ws://127.0.0.1:$WS_PORT" \
      "${what[@]}" --n "${N:-5000}" --pids "$pid" | grep -o 'rss/conn=[0-9]* B'
    kill "$pid"
    wait "$pid" 2>/dev/null || true
   done
  done
done
