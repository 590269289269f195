#!/usr/bin/env bash
# CPU of held session connections: a fresh release wsproxy per ping
# interval (1 s, to see a ping's cost; 30 s, the default), N connections
# held 20 s (bench/idle-cpu.py). Numbers for the million-connection paper
# in BENCHMARKS.md.
#   N=10000 bash bench/idle-cpu.sh
set -euo pipefail
cd "$(dirname "$0")/.."
[[ -x clients/python/.venv/bin/python ]] || (cd clients/python && python3 -m uv sync --quiet --extra test)
[[ -x target/release/wsproxy ]] || cargo build --release -q -p wsproxy
RP=6481; WP=8181; N=${N:-10000}
redis-server --port $RP --bind 127.0.0.1 --save '' --appendonly no --daemonize yes >/dev/null; sleep 0.5
trap 'redis-cli -p $RP shutdown nosave >/dev/null 2>&1 || true' EXIT
for ping in 1 30; do
  HOST=127.0.0.1 PORT=$WP REDIS_URL=redis://127.0.0.1:$RP WS_PING_INTERVAL_SECS=$ping MAX_CONNECTIONS=20000 RUST_LOG=warn target/release/wsproxy >/dev/null 2>&1 &
  pid=$!
  for _ in $(seq 1 50); do curl -sf http://127.0.0.1:$WP/ready >/dev/null && break; sleep 0.1; done
  echo "== WS_PING_INTERVAL_SECS=$ping"
  ulimit -n 20000
  clients/python/.venv/bin/python bench/idle-cpu.py $N ws://127.0.0.1:$WP redis://127.0.0.1:$RP $pid 20
  kill $pid; wait $pid 2>/dev/null || true
done
