#!/usr/bin/env bash
# Memory per idle session connection, the process's and the kernel's:
# holds N connections with `wsproxy-bench idle` against a fresh release
# wsproxy and a private redis-server, and samples every 0.2 s, against a
# baseline taken before, the system's slab (/proc/meminfo `Slab:`) and the
# TCP sockets and buffer pages (/proc/net/sockstat). Client and server run
# on this machine, so every connection is two sockets: the server's kernel
# share is the growth per socket. System-wide figures: run it on an
# otherwise idle machine.
#
#   bash bench/kernel-memory.sh              # N=10000
#   N=5000 WSPROXY=target/release/wsproxy bash bench/kernel-memory.sh
set -euo pipefail
cd "$(dirname "$0")/.."
N=${N:-10000}
WSPROXY=${WSPROXY:-target/release/wsproxy}
BENCH=${BENCH:-target/release/wsproxy-bench}
[[ -x $WSPROXY ]] || cargo build --release -q --bin wsproxy
[[ -x $BENCH ]] || cargo build --release -q -p wsproxy-bench
REDIS_PORT=${REDIS_PORT:-6431}
WS_PORT=${WS_PORT:-8131}
work=$(mktemp -d)
redis-server --port "$REDIS_PORT" --bind 127.0.0.1 --save '' --appendonly no --daemonize yes >/dev/null
pid=
trap '[[ -n $pid ]] && kill "$pid" 2>/dev/null; redis-cli -p "$REDIS_PORT" shutdown nosave >/dev/null 2>&1 || true; rm -rf "$work"' EXIT
sleep 0.5
HOST=127.0.0.1 PORT=$WS_PORT REDIS_URL=redis://127.0.0.1:$REDIS_PORT RUST_LOG=warn "$WSPROXY" >/dev/null 2>&1 &
pid=$!
for _ in $(seq 1 50); do curl -sf "http://127.0.0.1:$WS_PORT/ready" >/dev/null && break; sleep 0.1; done

slab() { awk '/^Slab:/{print $2}' /proc/meminfo; }                                  # kB
tcp_pages() { awk '/^TCP:/{for(i=1;i<=NF;i++) if($i=="mem") print $(i+1)}' /proc/net/sockstat; }
tcp_sockets() { awk '/^TCP:/{print $3}' /proc/net/sockstat; }
base_slab=$(slab) base_pages=$(tcp_pages) base_sockets=$(tcp_sockets)
(
  max_slab=0 max_pages=0 max_sockets=0
  while [[ ! -f $work/stop ]]; do
    s=$(slab) p=$(tcp_pages) k=$(tcp_sockets)
    ((s > max_slab)) && max_slab=$s
    ((p > max_pages)) && max_pages=$p
    ((k > max_sockets)) && max_sockets=$k
    echo "$max_slab $max_pages $max_sockets" >"$work/max"
    sleep 0.2
  done
) &
sampler=$!
rss=$("$BENCH" --redis "redis://127.0.0.1:$REDIS_PORT" --wsproxy "ws://127.0.0.1:$WS_PORT" \
  idle --n "$N" --pids "$pid" | grep -o 'rss/conn=[0-9]* B')
touch "$work/stop"
wait "$sampler" || true
read -r max_slab max_pages max_sockets <"$work/max"
sockets=$((max_sockets - base_sockets))
slab_bytes=$(((max_slab - base_slab) * 1024))
page_bytes=$(((max_pages - base_pages) * 4096))
echo "wsproxy: $rss (user memory per connection)"
echo "kernel: $sockets sockets added for $N connections; slab +$((slab_bytes / 1024)) kB = $((slab_bytes / (sockets > 0 ? sockets : 1))) B per socket (the server's share per connection); TCP buffers $((page_bytes / N)) B per connection pair"
