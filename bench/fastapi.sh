#!/usr/bin/env bash
# wsproxy beside the FastAPI bridge users would build instead (issue 25;
# bench/peers/fastapi): the same wsproxy-bench scenarios against both, on
# fresh processes, interleaved round by round.
#
#   bash bench/fastapi.sh                       # 3 rounds, the defaults below
#   ROUNDS=5 N_IDLE="5000" RATES="2000" bash bench/fastapi.sh
#   QUICK=1 bash bench/fastapi.sh               # small N and M, to try it out
#   WS_IMPL=websockets TAG=legacy bash bench/fastapi.sh  # uvicorn's legacy websockets
#                                    # protocol, results in fastapi-legacy.{jsonl,md}
#
# Each round, for each N in N_IDLE: wsproxy idle, then the FastAPI bridge
# idle (RSS growth per held connection; for uvicorn the master, its
# workers and multiprocessing's resource tracker, summed as Pss); then for
# each rate in RATES: wsproxy down, then the FastAPI bridge down
# (N_DOWN sessions, M_DOWN messages round robin at that offered rate, and
# the server's CPU time, utime + stime from /proc/PID/stat, per delivered
# message). Every measurement starts the server fresh and stops it after.
# Results: bench/results/fastapi.jsonl (one JSON line per run) and a table
# of every round in bench/results/fastapi.md (fastapi-$TAG.* with TAG
# set). Loss must be 0: it is printed.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
q() { if [[ -n "${QUICK:-}" ]]; then echo "$1"; else echo "$2"; fi; }
ROUNDS=${ROUNDS:-$(q 1 3)}
N_IDLE=${N_IDLE:-$(q 500 "5000 10000")}
RATES=${RATES:-$(q 1000 "2000 5000")}
N_DOWN=${N_DOWN:-$(q 100 1000)}
M_DOWN=${M_DOWN:-$(q 5000 100000)}
WS_IMPL=${WS_IMPL:-websockets-sansio}
WORKERS=${WORKERS:-2}
REDIS_PORT=${REDIS_PORT:-6431}
WS_PORT=${WS_PORT:-8131}
PY_PORT=${PY_PORT:-8132}
OUT=bench/results
mkdir -p "$OUT"
NAME=fastapi${TAG:+-$TAG}
JSON=$OUT/$NAME.jsonl
: >"$JSON"
LOG=$OUT/$NAME.log
: >"$LOG"
PEER=bench/peers/fastapi

echo "== building wsproxy and wsproxy-bench (release)"
cargo build --release -q -p wsproxy -p wsproxy-bench
echo "== the FastAPI peer's environment (uv, locked versions)"
python3 -m uv --version >/dev/null 2>&1 || python3 -m pip install -q uv
(cd "$PEER" && python3 -m uv sync -q --frozen)
PY="$ROOT/$PEER/.venv/bin/python"
"$PY" - <<'PY' | tee -a "$LOG"
import importlib.metadata as m, sys
print("python", sys.version.split()[0], *(f"{p} {m.version(p)}" for p in
      ("fastapi", "starlette", "uvicorn", "redis", "hiredis", "websockets", "uvloop", "httptools")))
PY

ulimit -n "$(ulimit -Hn)"
redis-server --port "$REDIS_PORT" --bind 127.0.0.1 --save '' --appendonly no --daemonize yes \
  --logfile "$ROOT/$OUT/$NAME-redis.log" >/dev/null
SERVER=""
cleanup() {
  if [[ -n $SERVER ]]; then kill "$SERVER" 2>/dev/null || true; fi
  redis-cli -p "$REDIS_PORT" shutdown nosave >/dev/null 2>&1 || true
}
trap cleanup EXIT
sleep 0.5

BENCH=("$ROOT/target/release/wsproxy-bench" --redis "redis://127.0.0.1:$REDIS_PORT" --json "$JSON")

# Starts a fresh server; sets SERVER (the pid to stop) and PIDS (all the
# pids whose memory and CPU count, comma-separated) and URL.
start() {
  case $1 in
    wsproxy)
      HOST=127.0.0.1 PORT=$WS_PORT REDIS_URL=redis://127.0.0.1:$REDIS_PORT RUST_LOG=warn \
        "$ROOT/target/release/wsproxy" >>"$LOG" 2>&1 &
      SERVER=$!
      for _ in $(seq 1 100); do curl -sf "http://127.0.0.1:$WS_PORT/ready" >/dev/null && break; sleep 0.1; done
      PIDS=$SERVER
      URL=ws://127.0.0.1:$WS_PORT
      ;;
    fastapi)
      (cd "$PEER" && exec env REDIS_URL=redis://127.0.0.1:$REDIS_PORT "$PY" -m uvicorn app:app \
        --host 127.0.0.1 --port "$PY_PORT" --workers "$WORKERS" --no-access-log --log-level warning \
        --loop uvloop --http httptools --ws "$WS_IMPL" >>"$ROOT/$LOG" 2>&1) &
      SERVER=$!
      # Ready when every worker has run its lifespan startup: each one
      # subscribes its own channel bridge:worker:<pid> on its shared pub/sub.
      for _ in $(seq 1 300); do
        n=$(redis-cli -p "$REDIS_PORT" pubsub channels 'bridge:worker:*' | grep -c . || true)
        ((n >= WORKERS)) && break
        sleep 0.1
      done
      ((n >= WORKERS)) || { echo "fastapi: only $n of $WORKERS workers started" >&2; exit 1; }
      sleep 0.5
      PIDS=$(echo "$SERVER" $(pgrep -P "$SERVER") | tr ' ' ',')
      URL=ws://127.0.0.1:$PY_PORT
      ;;
  esac
}
stop() {
  kill "$SERVER" 2>/dev/null || true
  wait "$SERVER" 2>/dev/null || true
  SERVER=""
  # uvicorn's workers leave with the master; wait for them to be gone.
  for _ in $(seq 1 50); do
    redis-cli -p "$REDIS_PORT" pubsub channels 'bridge:worker:*' | grep -q . || break
    sleep 0.1
  done
}
run() { # run NAME ROUND ARGS...: one measurement on a fresh server
  local name=$1 round=$2
  shift 2
  start "$name"
  echo "-- round $round $name (pids $PIDS): $*" | tee -a "$LOG"
  "${BENCH[@]}" --wsproxy "$URL" --label "$name" "$@" --pids "$PIDS" | tee -a "$LOG"
  stop
}

for round in $(seq 1 "$ROUNDS"); do
  for n in $N_IDLE; do
    for who in wsproxy fastapi; do run "$who" "$round" idle --n "$n"; done
  done
  for rate in $RATES; do
    for who in wsproxy fastapi; do
      run "$who" "$round" down --n "$N_DOWN" --m "$M_DOWN" --rate "$rate"
    done
  done
done

python3 - "$JSON" "$OUT/$NAME.md" <<'PY'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
# Runs come in pairs (wsproxy, then fastapi) in the order the loops made them.
out = ["| round | scenario | N | offered/s | wsproxy | fastapi | fastapi / wsproxy | loss (wsproxy, fastapi) |",
       "|---:|---|---:|---:|---:|---:|---:|---|"]
rounds = {}
for w, f in zip(rows[0::2], rows[1::2]):
    key = (w["scenario"], w["connections"], w["offered"])
    rounds[key] = rounds.get(key, 0) + 1
    if w["scenario"] == "idle":
        a, b, unit = w["rss_per_conn"], f["rss_per_conn"], "B/conn"
        loss = f"{w['sent'] - w['delivered']}, {f['sent'] - f['delivered']} not held"
    else:
        a, b, unit = w["cpu_us_per_op"], f["cpu_us_per_op"], "µs CPU/msg"
        loss = f"{w['sent'] - w['delivered']}, {f['sent'] - f['delivered']}"
    offered = f"{w['offered']:.0f}" if w["offered"] else "-"
    out.append(f"| {rounds[key]} | {w['scenario']} | {w['connections']} | {offered} | "
               f"{a:.1f} {unit} | {b:.1f} {unit} | {b / a:.2f}x | {loss} |")
text = "\n".join(out) + "\n"
open(sys.argv[2], "w").write(text)
print(text)
PY
echo "done: $JSON, $OUT/$NAME.md"
