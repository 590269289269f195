#!/usr/bin/env bash
# Redis instructions per `FCALL wsproxy_publish`, counted by callgrind
# inside fcallCommand (deterministic, unlike the timings of
# bench/publish-cost.sh on a shared machine), for the wsproxy library of
# two revisions and the same three ~200-byte messages (compact ASCII, 8
# non-ASCII characters, pretty-printed). HISTORY_MAX_LEN 1000, TTL 600 s;
# N messages to one session, so the trim runs N/100 times.
#   bash bench/publish-instructions.sh [REV_A] [REV_B]
#   N=6000 bash bench/publish-instructions.sh f890c36 HEAD
set -euo pipefail
cd "$(dirname "$0")/.."
A=${1:-HEAD~1}
B=${2:-HEAD}
N=${N:-6000}
PORT=${REDIS_PORT:-6434}
command -v valgrind >/dev/null || { echo "needs valgrind (apt-get install valgrind)" >&2; exit 2; }
work=$(mktemp -d)
trap 'redis-cli -p "$PORT" shutdown nosave >/dev/null 2>&1 || true; rm -rf "$work"' EXIT

. bench/publish-common.sh
library "$A" 600000 >"$work/a.lua"
library "$B" 600000 >"$work/b.lua"
payloads "$work"

once() { # library, payload -> instructions per call
  valgrind --tool=callgrind --callgrind-out-file="$work/cg.out" --toggle-collect=fcallCommand \
    redis-server --port "$PORT" --bind 127.0.0.1 --save '' --appendonly no >/dev/null 2>&1 &
  local pid=$!
  for _ in $(seq 1 200); do redis-cli -p "$PORT" ping >/dev/null 2>&1 && break; sleep 0.1; done
  redis-cli -p "$PORT" -x FUNCTION LOAD REPLACE <"$1" >/dev/null
  redis-benchmark -p "$PORT" -n "$N" -c 1 -P 16 -q FCALL wsproxy_publish 1 session:bench:history "$(cat "$2")" >/dev/null
  redis-cli -p "$PORT" shutdown nosave >/dev/null 2>&1 || true
  wait "$pid" || true
  callgrind_annotate "$work/cg.out" 2>/dev/null | awk '/PROGRAM TOTALS/ && !seen {seen = 1; gsub(",", "", $1); print $1}' |
    awk -v n="$N" '{printf "%d\n", $1 / n}'
}

for payload in ascii utf8 pretty; do
  a=$(once "$work/a.lua" "$work/$payload.json")
  b=$(once "$work/b.lua" "$work/$payload.json")
  printf '%-7s %-10s %7s  %-10s %7s instructions a publish (%.2f)\n' "$payload" "$A" "$a" "$B" "$b" "$(echo "$b / $a" | bc -l)"
done
