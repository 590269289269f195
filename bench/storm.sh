#!/usr/bin/env bash
# A deploy's reconnect storm (issue 25 item 5), wsproxy beside Socket.IO:
# each run starts its own redis-server and two server processes (A, B),
# puts CLIENTS reliable clients on A while a backend publishes RATE
# messages a second, SIGTERMs A, and every client resumes on B after a
# random pause of 0..JITTER ms. See bench/src/storm.rs and
# bench/peers/socketio/storm.mjs for what is measured.
#
#   bash bench/storm.sh                       # 3 rounds, 10,000 clients
#   ROUNDS=1 CLIENTS=2000 bash bench/storm.sh
#   JITTERS="1000 0" NO_BUILD=1 bash bench/storm.sh
#
# In each round, for each jitter: wsproxy, then Socket.IO, each on fresh
# processes (nothing is reused between runs). One line per run; the JSON
# lines go to bench/results/storm-<time>.jsonl.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
ROUNDS=${ROUNDS:-3}
CLIENTS=${CLIENTS:-10000}
RATE=${RATE:-1000}
JITTERS=${JITTERS:-"1000 0"}
PROCS=${PROCS:-4}
TIMEOUT=${TIMEOUT:-120}
mkdir -p bench/results
STAMP=$(date -u +%Y%m%dT%H%M%SZ)
JSON=bench/results/storm-$STAMP.jsonl
LOG=bench/results/storm-$STAMP.log

if [ -z "${NO_BUILD:-}" ]; then
  echo "== building (release)"
  cargo build --release -q -p wsproxy -p wsproxy-bench
fi
if [ ! -d bench/peers/socketio/node_modules ]; then
  (cd bench/peers/socketio && npm ci --no-audit --no-fund)
fi
echo "== wsproxy $(git rev-parse --short HEAD); $(redis-server --version | cut -d' ' -f3); node $(node --version);" \
  "socket.io $(node -p 'require("./bench/peers/socketio/node_modules/socket.io/package.json").version')," \
  "redis-streams-adapter $(node -p 'require("./bench/peers/socketio/node_modules/@socket.io/redis-streams-adapter/package.json").version')"
echo "== $CLIENTS clients, $RATE messages/s, jitter ${JITTERS// /, } ms, $ROUNDS rounds; $(nproc) cores, load $(cut -d' ' -f1-3 /proc/loadavg)"

for round in $(seq 1 "$ROUNDS"); do
  for jitter in $JITTERS; do
    echo "-- round $round, jitter $jitter ms"
    target/release/wsproxy-bench --json "$JSON" storm --clients "$CLIENTS" --rate "$RATE" \
      --jitter-ms "$jitter" --timeout-secs "$TIMEOUT" 2>>"$LOG" | grep '^storm' || echo "storm wsproxy: FAILED (exit $?)"
    node bench/peers/socketio/bench.mjs storm --clients "$CLIENTS" --rate "$RATE" --jitter-ms "$jitter" \
      --procs "$PROCS" --timeout-secs "$TIMEOUT" --json "$JSON" 2>>"$LOG" | grep '^storm' || echo "storm socketio: FAILED (exit $?)"
  done
done
echo "== results: $JSON (stderr of each run: $LOG)"
