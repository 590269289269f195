#!/usr/bin/env bash
# Regenerates the benchmark table in BENCHMARKS.md in one command:
#   bash bench/run.sh            # full run (a few minutes)
#   QUICK=1 bash bench/run.sh    # small N, for trying the script out
#   ECHO_ROUNDS=7 bash bench/run.sh  # more interleaved echo rounds (default 3)
#   FASTAPI=1 bash bench/run.sh  # then also bench/fastapi.sh (wsproxy beside
#                                # the FastAPI bridge, its own table)
#
# Starts, all on 127.0.0.1: a private Redis for wsproxy, wsproxy (release
# build), the peers (nchan with its own Redis, nginx and HAProxy proxies, via
# bench/peers/peers.sh) and an echo backend; runs every scenario against
# wsproxy and the peer in the same run; writes bench/results/latest.jsonl
# and replaces the table between the markers in BENCHMARKS.md.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
OUT=bench/results
mkdir -p "$OUT"
JSON=$OUT/latest.jsonl
: >"$JSON"
LOG=$OUT/run.log
: >"$LOG"

q() { if [[ -n "${QUICK:-}" ]]; then echo "$1"; else echo "$2"; fi; }
N_IDLE=$(q 500 10000)
N_CONNECT=$(q 500 5000)
N_DOWN=$(q 100 1000)
M_DOWN=$(q 5000 100000)
N_UP=$(q 100 1000)
M_UP=$(q 20 100)
N_FAN=$(q 100 1000)
M_FAN=$(q 50 200)
N_ECHO=$(q 20 100)
N_IDLE_PROXY=$(q 300 5000)
M_ECHO=$(q 200 2000)
ECHO_ROUNDS=${ECHO_ROUNDS:-$(q 1 3)}
# An offered rate nchan (Redis-backed) sustains on this machine, so latency
# is compared at the same load rather than at each system's saturation.
RATE=$(q 1000 2000)

WS_REDIS_PORT=6395
WS_PORT=8090
ECHO_PORT=9001

echo "== building (release)"
cargo build --release -q -p wsproxy -p wsproxy-bench
BENCH="$ROOT/target/release/wsproxy-bench --redis redis://127.0.0.1:$WS_REDIS_PORT --wsproxy ws://127.0.0.1:$WS_PORT --json $JSON"

PIDS=()
cleanup() {
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
  bash bench/peers/peers.sh stop >/dev/null 2>&1 || true
}
trap cleanup EXIT

echo "== starting redis for wsproxy on $WS_REDIS_PORT"
redis-server --port $WS_REDIS_PORT --bind 127.0.0.1 --save "" --appendonly no --logfile "$ROOT/$OUT/redis.log" &
PIDS+=($!)
echo "== starting wsproxy on $WS_PORT (with proxy routes /echo and /echo-limited -> 127.0.0.1:$ECHO_PORT)"
ROUTES=$ROOT/$OUT/routes.json
cat >"$ROUTES" <<JSON
{"version": 1, "routers": [{"protocol": "websocket",
  "backends": [{"host": "ws://127.0.0.1", "port": $ECHO_PORT, "weight": 1}],
  "external_path": "/echo", "internal_path": "/", "methods": ["GET"], "auth_required": false},
  {"protocol": "websocket",
  "backends": [{"host": "ws://127.0.0.1", "port": $ECHO_PORT, "weight": 1}],
  "external_path": "/echo-limited", "internal_path": "/", "methods": ["GET"], "auth_required": false,
  "max_message_bytes": 65536, "rate_limit": {"messages_per_sec": 1000000, "burst": 1000000}}]}
JSON
# Starts wsproxy (WSP: its pid); restart_wsproxy stops the running one
# first and waits until the fresh one is ready.
start_wsproxy() {
  HOST=127.0.0.1 PORT=$WS_PORT REDIS_URL=redis://127.0.0.1:$WS_REDIS_PORT RUST_LOG=warn ROUTES_FILE=$ROUTES \
    PUBSUB_ALLOW_ANONYMOUS=true RELIABLE_SESSIONS=true "$ROOT/target/release/wsproxy" >>"$LOG" 2>&1 &
  WSP=$!
  PIDS+=($WSP)
}
restart_wsproxy() {
  kill "$WSP" 2>/dev/null || true
  wait "$WSP" 2>/dev/null || true
  start_wsproxy
  for _ in $(seq 1 50); do curl -sf "http://127.0.0.1:$WS_PORT/ready" >/dev/null && break; sleep 0.1; done
}
start_wsproxy
echo "== starting echo backend on $ECHO_PORT"
"$ROOT/target/release/wsproxy-bench" echo-server --port $ECHO_PORT >>"$LOG" 2>&1 &
PIDS+=($!)
echo "== installing and starting peers"
bash bench/peers/peers.sh install
bash bench/peers/peers.sh start >/dev/null
STATUS=$(bash bench/peers/peers.sh status)
pids_of() { echo "$STATUS" | awk -v p="$1" '$1==p {sub("pids=","",$2); print $2}'; }
NCHAN_PIDS=$(pids_of nchan)
NGINX_PIDS=$(pids_of nginx)
HAPROXY_PIDS=$(pids_of haproxy)
for _ in $(seq 1 50); do curl -sf "http://127.0.0.1:$WS_PORT/ready" >/dev/null && break; sleep 0.1; done

run() { echo "-- $*"; $BENCH "$@" | tee -a "$LOG"; }

echo "== idle (fresh processes, so this runs first)"
run idle --target wsproxy --n "$N_IDLE" --pids "$WSP"
run idle --target nchan --n "$N_IDLE" --pids "$NCHAN_PIDS"
echo "== connect"
run compare connect --n "$N_CONNECT"
echo "== down at a fixed offered rate, then flat out"
run compare down --n "$N_DOWN" --m "$((RATE * 10))" --rate "$RATE"
run compare down --n "$N_DOWN" --m "$M_DOWN"
echo "== down in reliable mode (wsproxy.v1, FCALL wsproxy_publish), same rate, then flat out"
run down --target reliable --n "$N_DOWN" --m "$((RATE * 10))" --rate "$RATE"
run down --target reliable --n "$N_DOWN" --m "$M_DOWN"
echo "== resume: a reliable client misses 1,000 messages and reconnects"
run resume --n "$(q 10 50)" --m 1000
echo "== up"
run up --n "$N_UP" --m "$M_UP"
echo "== fanout (one channel)"
run compare fanout --n "$N_FAN" --m "$M_FAN" --rate "$(q 100 50)"
run compare fanout --ours hub --n "$N_FAN" --m "$M_FAN" --rate "$(q 100 50)"
run fanout --target hub --n "$N_FAN" --m "$M_FAN"
echo "== idle proxied connections (client and backend sockets together)"
# A fresh wsproxy, like the fresh HAProxy and nginx: a process that already
# served the scenarios above would reuse memory it freed and look smaller.
restart_wsproxy
run idle --name wsproxy-proxy --url "ws://127.0.0.1:$WS_PORT/echo" --n "$N_IDLE_PROXY" --pids "$WSP"
run idle --name haproxy --url "ws://127.0.0.1:8093/" --n "$N_IDLE_PROXY" --pids "$HAPROXY_PIDS"
run idle --name nginx --url "ws://127.0.0.1:8092/" --n "$N_IDLE_PROXY" --pids "$NGINX_PIDS"
echo "== echo: backend directly, through wsproxy, nginx and HAProxy ($ECHO_ROUNDS interleaved rounds; the table keeps each target's median round by rate)"
ROUNDS_JSON=$OUT/echo-rounds.jsonl
: >"$ROUNDS_JSON"
EB="$ROOT/target/release/wsproxy-bench --json $ROUNDS_JSON"
for round in $(seq 1 "$ECHO_ROUNDS"); do
  echo "-- echo round $round"
  $EB echo --name direct --url "ws://127.0.0.1:$ECHO_PORT/" --n "$N_ECHO" --m "$M_ECHO" | tee -a "$LOG"
  $EB echo --name wsproxy-proxy --url "ws://127.0.0.1:$WS_PORT/echo" --n "$N_ECHO" --m "$M_ECHO" --pids "$WSP" | tee -a "$LOG"
  $EB echo --name wsproxy-limited --url "ws://127.0.0.1:$WS_PORT/echo-limited" --n "$N_ECHO" --m "$M_ECHO" --pids "$WSP" | tee -a "$LOG"
  $EB echo --name nginx --url "ws://127.0.0.1:8092/" --n "$N_ECHO" --m "$M_ECHO" --pids "$NGINX_PIDS" | tee -a "$LOG"
  $EB echo --name haproxy --url "ws://127.0.0.1:8093/" --n "$N_ECHO" --m "$M_ECHO" --pids "$HAPROXY_PIDS" | tee -a "$LOG"
done
python3 - "$ROUNDS_JSON" "$JSON" <<'PY'
import json, sys
rounds, out = sys.argv[1], sys.argv[2]
by_target = {}
for line in open(rounds):
    if line.strip():
        r = json.loads(line)
        by_target.setdefault(r["target"], []).append(r)
with open(out, "a") as f:
    for target, runs in by_target.items():
        runs.sort(key=lambda r: r["rate"])
        median = runs[len(runs) // 2]
        rates = ", ".join(f"{r['rate']:.0f}" for r in runs)
        median["note"] += f"; median of {len(runs)} rounds by rate ({rates}/s)"
        f.write(json.dumps(median) + "\n")
PY

echo "== idle reliable sessions, on a fresh wsproxy"
restart_wsproxy
run idle --target reliable --n "$N_IDLE" --pids "$WSP"

echo "== writing BENCHMARKS.md"
TABLE=$("$ROOT/target/release/wsproxy-bench" report "$JSON")
MACHINE="$(nproc) cores, $(awk '/MemTotal/{printf "%.0f GiB", $2/1048576}' /proc/meminfo), $(uname -sr), $(date -u +%Y-%m-%d)"
python3 - "$TABLE" "$MACHINE" <<'PY'
import re, sys
table, machine = sys.argv[1], sys.argv[2]
path = "BENCHMARKS.md"
text = open(path).read()
block = f"<!-- results:start -->\nMachine: {machine}\n\n{table.rstrip()}\n<!-- results:end -->"
text = re.sub(r"<!-- results:start -->.*?<!-- results:end -->", lambda _: block, text, flags=re.S)
open(path, "w").write(text)
PY
echo "done: $JSON, BENCHMARKS.md"
if [[ -n "${FASTAPI:-}" ]]; then
  echo "== wsproxy beside the FastAPI bridge (bench/fastapi.sh; its own ports, fresh processes)"
  bash bench/fastapi.sh
fi
