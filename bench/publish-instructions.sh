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

library() { # rev -> the library as wsproxy loads it
  git show "$1:src/session/history.rs" | python3 -c '
import re, sys
lib = re.search(r"const LIBRARY: &str = r#\"(.*?)\"#;", sys.stdin.read(), re.S).group(1)
print(lib.replace("__MAX_LEN__", "1000").replace("__TTL_MS__", "600000").replace("__RENEW_MS__", "6000").replace("__PUBLISH__", "PUBLISH"))'
}
library "$A" >"$work/a.lua"
library "$B" >"$work/b.lua"
python3 - "$work" <<'PY'
import json, sys
m = {"type": "data", "payload": "The quick brown fox jumps over the lazy dog; streaming token 1234 of the reply",
     "seq": 4217, "meta": {"model": "m-1", "done": False, "usage": {"in": 512, "out": 77}}}
open(sys.argv[1] + "/ascii.json", "w").write(json.dumps(m, separators=(",", ":")))
open(sys.argv[1] + "/pretty.json", "w").write(json.dumps(m, indent=2))
m["payload"] = "Le renard brun rapide saute par-dessus le chien paresseux \u2014 \u901f\u3044\u8336\u8272\u306e\u72d0 \U0001F600 token 1234"
open(sys.argv[1] + "/utf8.json", "w").write(json.dumps(m, separators=(",", ":"), ensure_ascii=False))
PY

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
