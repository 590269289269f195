#!/usr/bin/env bash
# Redis CPU per `FCALL wsproxy_publish` (INFO commandstats, usec_per_call of
# fcall), the wsproxy library of two revisions alternating, each round on a
# fresh private redis-server, for three ~200-byte messages: compact ASCII
# (json.dumps' default), compact with 8 non-ASCII characters (what
# JSON.stringify and the Python library send for accented, CJK and emoji
# text), and pretty-printed.
#   bash bench/publish-cost.sh [REV_A] [REV_B]
#   N=20000 ROUNDS=5 bash bench/publish-cost.sh aad8f43 HEAD
#   BATCH=16 bash bench/publish-cost.sh HEAD HEAD
# With BATCH=K, revision B publishes K messages a call with
# `FCALL wsproxy_publish_batch` (A still one a call), and both columns are
# Redis microseconds per message (usec_per_call / K).
set -euo pipefail
cd "$(dirname "$0")/.."
A=${1:-HEAD~1}
B=${2:-HEAD}
N=${N:-20000}
ROUNDS=${ROUNDS:-5}
PORT=${REDIS_PORT:-6432}
work=$(mktemp -d)
trap 'redis-cli -p "$PORT" shutdown nosave >/dev/null 2>&1 || true; rm -rf "$work"' EXIT

. bench/publish-common.sh
library "$A" 60000 >"$work/a.lua"
library "$B" 60000 >"$work/b.lua"
payloads "$work"

BATCH=${BATCH:-1}
once() { # library, payload, messages a call -> usec per message
  redis-server --port "$PORT" --bind 127.0.0.1 --save '' --appendonly no --daemonize yes >/dev/null
  for _ in $(seq 1 50); do redis-cli -p "$PORT" ping >/dev/null 2>&1 && break; sleep 0.05; done
  redis-cli -p "$PORT" -x FUNCTION LOAD REPLACE <"$1" >/dev/null
  local payload
  payload=$(cat "$2")
  redis-cli -p "$PORT" FCALL wsproxy_publish 1 session:bench:history "$payload" >/dev/null
  redis-cli -p "$PORT" CONFIG RESETSTAT >/dev/null
  if (($3 == 1)); then
    redis-benchmark -p "$PORT" -n "$N" -c 1 -q FCALL wsproxy_publish 1 session:bench:history "$payload" >/dev/null
  else
    local args=()
    for _ in $(seq 1 "$3"); do args+=("$payload"); done
    redis-benchmark -p "$PORT" -n $((N / $3)) -c 1 -q FCALL wsproxy_publish_batch 1 session:bench:history "${args[@]}" >/dev/null
  fi
  redis-cli -p "$PORT" INFO commandstats | tr -d '\r' | sed -n 's/^cmdstat_fcall:.*usec_per_call=\([0-9.]*\).*/\1/p' |
    awk -v k="$3" '{printf "%.2f\n", $1 / k}'
  redis-cli -p "$PORT" shutdown nosave >/dev/null 2>&1 || true
  sleep 0.2
}

for payload in ascii utf8 pretty; do
  a=() b=()
  for _ in $(seq 1 "$ROUNDS"); do
    a+=("$(once "$work/a.lua" "$work/$payload.json" 1)")
    b+=("$(once "$work/b.lua" "$work/$payload.json" "$BATCH")")
  done
  median() { printf '%s\n' "$@" | sort -n | awk '{v[NR]=$1} END{print v[int((NR+1)/2)]}'; }
  printf '%-7s %-10s median %6s us  (%s)\n' "$payload" "$A" "$(median "${a[@]}")" "${a[*]}"
  printf '%-7s %-10s median %6s us  (%s)\n' "$payload" "$B x$BATCH" "$(median "${b[@]}")" "${b[*]}"
done
