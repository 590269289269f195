#!/usr/bin/env bash
# wsproxy on one Redis against wsproxy on a Redis Cluster (issue 15):
#   bash bench/cluster.sh                 # 3 rounds of down --n 1000 --m 100000
#   ROUNDS=5 N=1000 M=100000 bash bench/cluster.sh
#   PUBSUB=classic bash bench/cluster.sh  # REDIS_CLUSTER_PUBSUB=classic, PUBLISH
#   RATE=50000 bash bench/cluster.sh      # a fixed offered rate instead of flat out
#   NO_BUILD=1 bash bench/cluster.sh      # use the release binaries as they are
#
# Starts, all on 127.0.0.1 on free ports below 32768: a private standalone
# redis-server and a private Redis Cluster of 3 masters and 3 replicas
# (redis-cli --cluster create ... --cluster-replicas 1). Then, ROUNDS times,
# alternating: a fresh release wsproxy on the standalone Redis (REDIS_URL)
# and `down`, then a fresh one on the cluster (REDIS_CLUSTER_NODES = all six
# nodes, REDIS_URL unset) and `down --redis-cluster ...` (SETEX
# session:{<id>}:auth, SPUBLISH session:{<id>}:down, one pipeline per
# master). Each wsproxy serves one run and is stopped.
#
# Printed: delivered/s, p50 and p99 of both per round and the cluster's
# ratio to the standalone figure (target: >= 0.9); per master, the SPUBLISH
# calls Redis counted (INFO commandstats after CONFIG RESETSTAT; target:
# each within 20% of the mean); per node, the connections wsproxy holds,
# sampled every 0.2 s in a separate, untimed cluster run (its sockets, from
# ss, matched to CLIENT LIST), and how many of them are pub/sub connections
# (ssub or sub > 0, or flag P; target: exactly one per master, none on
# replicas), idle and with N sessions open; and the CPU time (user +
# system) each process spent during each run: wsproxy, the Redis server(s)
# and the load generator, whole run (connects included), from /proc.
# Results: bench/results/cluster/{runs.jsonl,samples.txt,log.txt}.
# Everything started here is stopped on exit.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
OUT=$ROOT/bench/results/cluster
mkdir -p "$OUT"
JSON=$OUT/runs.jsonl
SAMPLES=$OUT/samples.txt
STATS=$OUT/commandstats.txt
CPU=$OUT/cpu.txt
LOG=$OUT/log.txt
: >"$JSON"
: >"$SAMPLES"
: >"$STATS"
: >"$CPU"
: >"$LOG"
ROUNDS=${ROUNDS:-3}
N=${N:-1000}
M=${M:-100000}
PUBSUB=${PUBSUB:-sharded}
RATE=${RATE:-0}
case $PUBSUB in
  sharded) PUBCMD=spublish ;;
  classic) PUBCMD=publish ;;
  *) echo "PUBSUB must be sharded or classic" >&2; exit 2 ;;
esac

if [[ -z "${NO_BUILD:-}" ]]; then
  echo "== building (release)"
  cargo build --release -q -p wsproxy-bench --bin wsproxy-bench
  cargo build --release -q --bin wsproxy
fi
BENCH=$ROOT/target/release/wsproxy-bench
WSPROXY=$ROOT/target/release/wsproxy

DIR=$(mktemp -d /tmp/wsproxy-bench-cluster.XXXXXX)
PIDS=()
WSP=""
SAMPLER=""
cleanup() {
  [[ -n "$SAMPLER" ]] && kill "$SAMPLER" 2>/dev/null || true
  [[ -n "$WSP" ]] && kill "$WSP" 2>/dev/null || true
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
  for p in "${PIDS[@]}"; do wait "$p" 2>/dev/null || true; done
  rm -rf "$DIR"
}
trap cleanup EXIT

# Free loopback ports in 20000..22699 whose +10000 (a cluster node's bus
# port) is free too: below Linux's ephemeral range, where outgoing
# connections take theirs.
PORTS=($(python3 - <<'PY'
import random, socket
def free(p):
    try:
        with socket.socket() as s:
            s.bind(("127.0.0.1", p))
        return True
    except OSError:
        return False
ports = []
while len(ports) < 8:
    p = random.randrange(20000, 22700)
    if p not in ports and free(p) and free(p + 10000):
        ports.append(p)
print(*ports)
PY
))
STANDALONE=${PORTS[0]}
WS_PORT=${PORTS[1]}
NODES=("${PORTS[@]:2:6}")

echo "== standalone redis-server on $STANDALONE"
redis-server --port "$STANDALONE" --bind 127.0.0.1 --save "" --appendonly no \
  --dir "$DIR" --logfile "$DIR/standalone.log" &
PIDS+=($!)
declare -A PID_OF
PID_OF[$STANDALONE]=$!
echo "== cluster nodes on ${NODES[*]}"
for p in "${NODES[@]}"; do
  redis-server --port "$p" --bind 127.0.0.1 --cluster-enabled yes \
    --cluster-config-file "$DIR/nodes-$p.conf" --cluster-node-timeout 5000 \
    --save "" --appendonly no --dir "$DIR" --logfile "$DIR/node-$p.log" &
  PIDS+=($!)
  PID_OF[$p]=$!
done
for p in "$STANDALONE" "${NODES[@]}"; do
  for _ in $(seq 1 100); do redis-cli -p "$p" ping >/dev/null 2>&1 && break; sleep 0.05; done
  redis-cli -p "$p" ping >/dev/null
done
CREATE=()
for p in "${NODES[@]}"; do CREATE+=("127.0.0.1:$p"); done
redis-cli --cluster create "${CREATE[@]}" --cluster-replicas 1 --cluster-yes >>"$LOG" 2>&1
echo -n "== waiting for cluster_state:ok and synced replicas"
for _ in $(seq 1 300); do
  ok=1
  for p in "${NODES[@]}"; do
    info=$(redis-cli -p "$p" cluster info)
    [[ $info == *cluster_state:ok* && $info == *cluster_slots_ok:16384* ]] || ok=0
    repl=$(redis-cli -p "$p" info replication)
    if [[ $repl == *role:slave* && $repl != *master_link_status:up* ]]; then ok=0; fi
  done
  [[ $ok == 1 ]] && break
  sleep 0.1
done
[[ $ok == 1 ]] || { echo " failed"; exit 1; }
echo " ok"
MASTERS=()
REPLICAS=()
for p in "${NODES[@]}"; do
  if redis-cli -p "$p" info replication | grep -q '^role:master'; then MASTERS+=("$p"); else REPLICAS+=("$p"); fi
done
echo "== masters ${MASTERS[*]}, replicas ${REPLICAS[*]}"
SEEDS=$(printf 'redis://127.0.0.1:%s,' "${NODES[@]}")
SEEDS=${SEEDS%,}

# A fresh wsproxy: "standalone" or "cluster"; waits for /ready.
start_wsproxy() {
  if [[ $1 == standalone ]]; then
    env -u REDIS_CLUSTER_NODES HOST=127.0.0.1 PORT=$WS_PORT RUST_LOG=warn \
      REDIS_URL=redis://127.0.0.1:$STANDALONE "$WSPROXY" >>"$LOG" 2>&1 &
  else
    env -u REDIS_URL HOST=127.0.0.1 PORT=$WS_PORT RUST_LOG=warn \
      REDIS_CLUSTER_NODES=$SEEDS REDIS_CLUSTER_PUBSUB=$PUBSUB "$WSPROXY" >>"$LOG" 2>&1 &
  fi
  WSP=$!
  for _ in $(seq 1 100); do
    curl -sf "http://127.0.0.1:$WS_PORT/ready" >/dev/null && return 0
    sleep 0.1
  done
  echo "wsproxy ($1) did not become ready; see $LOG" >&2
  exit 1
}
stop_wsproxy() {
  kill "$WSP" 2>/dev/null || true
  wait "$WSP" 2>/dev/null || true
  WSP=""
}

# Every 0.2 s, one line per cluster node: the connections process $1 holds
# to it (its sockets, from ss, matched to CLIENT LIST by address) and how
# many of them are in pub/sub (ssub or sub > 0, or flag P).
sample() {
  local pid=$1 label=$2
  while true; do
    local socks
    socks=$(ss -tnpH state established 2>/dev/null | grep "pid=$pid," || true)
    for p in "${NODES[@]}"; do
      local addrs role
      addrs=$(awk -v peer="127.0.0.1:$p" '$4==peer {print $3}' <<<"$socks")
      role=master
      [[ " ${REPLICAS[*]} " == *" $p "* ]] && role=replica
      redis-cli -p "$p" client list 2>/dev/null | awk -v addrs="$addrs" -v node="$p" \
        -v role="$role" -v label="$label" '
        BEGIN { n = split(addrs, a, "\n"); for (i = 1; i <= n; i++) if (a[i] != "") mine[a[i]] = 1 }
        {
          addr = ""; sub_ = 0; ssub = 0; flags = ""; cmd = ""
          for (i = 1; i <= NF; i++) {
            split($i, kv, "=")
            if (kv[1] == "addr") addr = kv[2]
            else if (kv[1] == "sub") sub_ = kv[2]
            else if (kv[1] == "ssub") ssub = kv[2]
            else if (kv[1] == "flags") flags = kv[2]
            else if (kv[1] == "cmd") cmd = kv[2]
          }
          if (addr in mine) {
            conns++
            cmds = cmds (cmds == "" ? "" : ",") cmd
            if (sub_ > 0 || ssub > 0 || flags ~ /P/) { ps++; chans += sub_ + ssub }
          }
        }
        END { printf "%s node=%s role=%s wsproxy_conns=%d pubsub_conns=%d channels=%d last_cmds=%s\n", label, node, role, conns, ps, chans, (cmds == "" ? "-" : cmds) }'
    done
    sleep 0.2
  done
}

# CPU time (user + system, all threads) of a process so far, in ms.
cpu_ms() { awk '{print ($14 + $15) * 10}' "/proc/$1/stat"; }

run_down() {
  local kind=$1 round=$2
  local args=(--wsproxy "ws://127.0.0.1:$WS_PORT" --json "$JSON")
  if [[ $kind == standalone ]]; then
    args+=(--redis "redis://127.0.0.1:$STANDALONE")
  else
    args+=(--redis-cluster "$SEEDS" --cluster-pubsub "$PUBSUB")
  fi
  start_wsproxy "$kind"
  if [[ $kind == cluster ]]; then
    for p in "${NODES[@]}"; do redis-cli -p "$p" config resetstat >/dev/null; done
  fi
  local servers=("$STANDALONE")
  [[ $kind == cluster ]] && servers=("${MASTERS[@]}" "${REPLICAS[@]}")
  declare -A before
  before[wsproxy]=$(cpu_ms "$WSP")
  for p in "${servers[@]}"; do before[$p]=$(cpu_ms "${PID_OF[$p]}"); done
  echo "-- round $round, $kind: down --n $N --m $M --rate $RATE"
  /usr/bin/time -f "%U %S" -o "$DIR/bench-time" \
    "$BENCH" "${args[@]}" down --n "$N" --m "$M" --rate "$RATE" | tee -a "$LOG"
  local line="round=$round kind=$kind wsproxy=$(($(cpu_ms "$WSP") - ${before[wsproxy]}))"
  for p in "${servers[@]}"; do
    local role=master
    [[ " ${REPLICAS[*]} " == *" $p "* ]] && role=replica
    [[ $kind == standalone ]] && role=redis
    line+=" $role:$p=$(($(cpu_ms "${PID_OF[$p]}") - ${before[$p]}))"
  done
  line+=" bench=$(awk '{printf "%d", ($1 + $2) * 1000}' "$DIR/bench-time")"
  echo "$line" >>"$CPU"
  if [[ $kind == cluster ]]; then
    for p in "${NODES[@]}"; do
      local calls
      calls=$(redis-cli -p "$p" info commandstats | tr -d '\r' |
        awk -F'[:=,]' -v c="cmdstat_$PUBCMD" '$1==c {print $3}')
      echo "round=$round node=$p calls=${calls:-0}" >>"$STATS"
    done
  fi
  stop_wsproxy
}

for round in $(seq 1 "$ROUNDS"); do
  run_down standalone "$round"
  run_down cluster "$round"
done

# Connections, apart from the timed runs (the sampler's redis-cli and ss
# calls would take CPU from them): a fresh wsproxy on the cluster, idle,
# then with N sessions open (down at 2,000 messages/s for 10 s).
echo "-- connections: wsproxy on the cluster, idle, then $N sessions"
start_wsproxy cluster
sleep 0.5
sample "$WSP" "conn idle" >>"$SAMPLES" &
SAMPLER=$!
sleep 1
kill "$SAMPLER"; wait "$SAMPLER" 2>/dev/null || true
sample "$WSP" "conn sessions" >>"$SAMPLES" &
SAMPLER=$!
"$BENCH" --wsproxy "ws://127.0.0.1:$WS_PORT" --redis-cluster "$SEEDS" --cluster-pubsub "$PUBSUB" \
  down --n "$N" --m 20000 --rate 2000 | tee -a "$LOG"
kill "$SAMPLER"; wait "$SAMPLER" 2>/dev/null || true
SAMPLER=""
stop_wsproxy

echo
echo "== summary"
python3 - "$JSON" "$STATS" "$SAMPLES" "$PUBCMD" "${MASTERS[*]}" "$CPU" <<'PY'
import json, sys, collections
runs_path, stats_path, samples_path, pubcmd, masters, cpu_path = sys.argv[1:7]
masters = masters.split()
runs = [json.loads(l) for l in open(runs_path) if l.strip()]
sa = [r for r in runs if not r["target"].startswith("wsproxy-cluster")]
cl = [r for r in runs if r["target"].startswith("wsproxy-cluster")]
ms = lambda us: f"{us / 1000:.2f} ms"
print("round | standalone delivered/s p50 p99 loss | cluster delivered/s p50 p99 loss | cluster/standalone")
for i, (a, b) in enumerate(zip(sa, cl), 1):
    print(f"{i} | {a['rate']:.0f} {ms(a['p50_us'])} {ms(a['p99_us'])} {a['sent'] - a['delivered']}"
          f" | {b['rate']:.0f} {ms(b['p50_us'])} {ms(b['p99_us'])} {b['sent'] - b['delivered']}"
          f" | x{b['rate'] / a['rate']:.2f}")
def med(xs):
    xs = sorted(xs); return xs[len(xs) // 2]
if sa and cl:
    a, b = med([r["rate"] for r in sa]), med([r["rate"] for r in cl])
    print(f"median delivered/s: standalone {a:.0f}, cluster {b:.0f}: x{b / a:.2f} (target >= 0.90)")
    print(f"median p99: standalone {ms(med([r['p99_us'] for r in sa]))}, cluster {ms(med([r['p99_us'] for r in cl]))}")
for b in cl:
    print("bench's own count:", b.get("note", ""))

print("\nCPU time per run, ms (user + system, whole bench invocation, connects included):")
for line, r in zip(open(cpu_path), [x for pair in zip(sa, cl) for x in pair]):
    f = line.split()
    kv = dict(x.split("=", 1) for x in f)
    servers = {k: int(v) for k, v in kv.items() if ":" in k}
    redis_total = sum(servers.values())
    per = lambda ms: f"{ms * 1000 / max(r['delivered'], 1):.2f}"
    print(f"round {kv['round']} {kv['kind']:10}: wsproxy {kv['wsproxy']} ({per(int(kv['wsproxy']))} us/msg),"
          f" redis {redis_total} ({per(redis_total)} us/msg) [{', '.join(f'{k} {v}' for k, v in servers.items())}],"
          f" bench {kv['bench']} ({per(int(kv['bench']))} us/msg)")

print(f"\ncmdstat_{pubcmd} calls per master (CONFIG RESETSTAT before each cluster run):")
calls = collections.defaultdict(dict)
for line in open(stats_path):
    kv = dict(x.split("=") for x in line.split())
    calls[kv["round"]][kv["node"]] = int(kv["calls"])
for rnd, by_node in calls.items():
    on_masters = [by_node.get(p, 0) for p in masters]
    mean = sum(on_masters) / len(on_masters)
    parts = [f"{p}: {by_node.get(p, 0)} ({(by_node.get(p, 0) - mean) / mean * 100:+.1f}%)" for p in masters]
    others = {p: c for p, c in by_node.items() if p not in masters and c}
    worst = max(abs(c - mean) / mean for c in on_masters) * 100
    print(f"round {rnd}: {', '.join(parts)}; mean {mean:.0f}; worst {worst:.1f}% (target <= 20%)"
          + (f"; on replicas: {others}" if others else "; replicas: 0"))

print("\nwsproxy's connections per node, untimed run (max over 0.2 s samples; pub/sub = ssub/sub > 0 or flag P):")
peak = collections.defaultdict(lambda: [0, 0, 0, "", set()])
for line in open(samples_path):
    f = line.split()
    phase = f[1]
    kv = dict(x.split("=") for x in f[2:])
    key = (phase, kv["node"])
    p = peak[key]
    p[0] = max(p[0], int(kv["wsproxy_conns"]))
    p[1] = max(p[1], int(kv["pubsub_conns"]))
    p[2] = max(p[2], int(kv["channels"]))
    p[3] = kv["role"]
    p[4].update(c for c in kv["last_cmds"].split(",") if c != "-")
for (phase, node), (conns, ps, chans, role, cmds) in sorted(peak.items(), key=lambda kv: (kv[0][0] != "idle", kv[1][3], kv[0][1])):
    print(f"{phase:8} {role:7} {node}: connections {conns}, pub/sub connections {ps}, channels {chans}; last commands seen {sorted(cmds) or '-'}")
PY
echo "results: $OUT"
