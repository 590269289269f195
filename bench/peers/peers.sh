#!/usr/bin/env bash
# Install / start / stop the peers the wsproxy benchmark compares against.
#
#   peers.sh install   apt-get install nginx-light libnginx-mod-nchan haproxy
#                      redis-server (only what is missing); never leaves the
#                      system services running or enabled.
#   peers.sh start     start on 127.0.0.1 (idempotent):
#                        redis   ${PEERS_REDIS_PORT:-6390}  private, no persistence
#                        nchan   ${NCHAN_PORT:-8091}        nginx+nchan, Redis-backed
#                        nginx   ${NGINX_PROXY_PORT:-8092}  nginx WS proxy -> echo
#                        haproxy ${HAPROXY_PORT:-8093}      HAProxy WS proxy -> echo
#                      echo backend: 127.0.0.1:${ECHO_PORT:-9001} (not started here)
#   peers.sh stop      stop everything started by `start` (pid files), idempotent
#   peers.sh status    one line per peer: "<name> pids=<p1,p2,..> port=<port>"
#                      (master first, then all workers; "pids=-" if not running).
#                      Exit 0 if all are running, 3 otherwise.
#
# Runtime state (configs, pid files, logs, temp dirs) lives in
# ${PEERS_DIR:-/tmp/wsproxy-peers}; nothing is written under /var.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
PEERS_DIR="${PEERS_DIR:-/tmp/wsproxy-peers}"
PEERS_REDIS_PORT="${PEERS_REDIS_PORT:-6390}"
NCHAN_PORT="${NCHAN_PORT:-8091}"
NGINX_PROXY_PORT="${NGINX_PROXY_PORT:-8092}"
HAPROXY_PORT="${HAPROXY_PORT:-8093}"
ECHO_PORT="${ECHO_PORT:-9001}"

PACKAGES=(nginx-light libnginx-mod-nchan haproxy redis-server)

die() { echo "peers.sh: error: $*" >&2; exit 1; }
note() { echo "peers.sh: $*" >&2; }

# ---------------------------------------------------------------- helpers

# Per-process open-file limit to configure: the hard limit, capped at 100000.
nofile_limit() {
    local hard
    hard="$(ulimit -Hn)"
    if [[ "$hard" == unlimited ]] || (( hard > 100000 )); then hard=100000; fi
    echo "$hard"
}

pid_alive() {  # alive and not a zombie
    [[ -n "${1:-}" ]] && kill -0 "$1" 2>/dev/null || return 1
    local state
    state="$(awk '{print $3}' "/proc/$1/stat" 2>/dev/null)" || return 1
    [[ -n "$state" && "$state" != Z ]]
}

pid_from_file() {  # pid_from_file FILE COMM: print pid if alive and named COMM
    local f="$1" comm="$2" pid
    [[ -s "$f" ]] || return 1
    pid="$(tr -dc '0-9' <"$f")"
    pid_alive "$pid" || return 1
    # guard against a stale pid file whose pid was reused by something else
    [[ "$(cat "/proc/$pid/comm" 2>/dev/null)" == "$comm" ]] || return 1
    echo "$pid"
}

port_listening() {
    ss -Hltn "sport = :$1" 2>/dev/null | grep -q .
}

wait_port() {  # wait_port PORT NAME LOGFILE
    local i
    for ((i = 0; i < 50; i++)); do
        port_listening "$1" && return 0
        sleep 0.1
    done
    [[ -f "$3" ]] && tail -n 5 "$3" >&2
    die "$2 did not start listening on 127.0.0.1:$1 (log: $3)"
}

render() {  # render TEMPLATE OUT KEY=VALUE...
    local tpl="$1" out="$2" kv expr=()
    shift 2
    [[ -f "$tpl" ]] || die "missing config template $tpl"
    for kv in "$@"; do
        expr+=(-e "s|@${kv%%=*}@|${kv#*=}|g")
    done
    sed "${expr[@]}" "$tpl" >"$out"
    if grep -q '@[A-Z_]*@' "$out"; then die "unreplaced placeholder in $out"; fi
}

find_nchan_module() {
    local d
    for d in /usr/lib/nginx/modules /usr/share/nginx/modules; do
        if [[ -f "$d/ngx_nchan_module.so" ]]; then echo "$d/ngx_nchan_module.so"; return 0; fi
    done
    return 1
}

children_of() {  # comma-joined list: master then its children
    local master="$1" kids
    kids="$(pgrep -P "$master" 2>/dev/null | sort -n | paste -sd, - || true)"
    if [[ -n "$kids" ]]; then echo "$master,$kids"; else echo "$master"; fi
}

stop_pid() {  # stop_pid NAME PIDFILE COMM
    local name="$1" f="$2" pid i
    if pid="$(pid_from_file "$f" "$3")"; then
        kill -TERM "$pid" 2>/dev/null || true
        for ((i = 0; i < 100; i++)); do
            pid_alive "$pid" || break
            sleep 0.1
        done
        if pid_alive "$pid"; then
            note "$name (pid $pid) did not exit on TERM, sending KILL"
            kill -KILL "$pid" 2>/dev/null || true
            sleep 0.2
        fi
        note "stopped $name (pid $pid)"
    fi
    rm -f "$f"
}

# ---------------------------------------------------------------- install

pkg_installed() {
    [[ "$(dpkg-query -W -f='${Status}' "$1" 2>/dev/null)" == "install ok installed" ]]
}

cmd_install() {
    [[ $EUID -eq 0 ]] || die "install must run as root"
    command -v apt-get >/dev/null || die "apt-get not found (Debian/Ubuntu required)"
    local missing=() p
    for p in "${PACKAGES[@]}"; do pkg_installed "$p" || missing+=("$p"); done
    if ((${#missing[@]} == 0)); then
        note "all packages already installed: ${PACKAGES[*]}"
        return 0
    fi
    export DEBIAN_FRONTEND=noninteractive
    local log
    log="$(mktemp /tmp/peers-apt.XXXXXX)"

    # Keep maintainer scripts from starting services (standard policy-rc.d
    # trick); only install our own if the system has none.
    local own_policy=0
    if [[ ! -e /usr/sbin/policy-rc.d ]]; then
        printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d
        chmod 755 /usr/sbin/policy-rc.d
        own_policy=1
    fi
    local rc=0
    if ! apt-cache show "${missing[@]}" >/dev/null 2>&1; then
        apt-get update -qq >>"$log" 2>&1 || true
    fi
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >>"$log" 2>&1 || rc=$?
    ((own_policy)) && rm -f /usr/sbin/policy-rc.d
    if ((rc != 0)); then
        tail -n 5 "$log" >&2
        die "apt-get install ${missing[*]} failed (rc=$rc, full log: $log)"
    fi
    rm -f "$log"

    # Newly installed packages: make sure their system service is neither
    # running nor enabled (it would hold port 80 / 6379 / etc.). Services of
    # packages that were already installed are left alone.
    local svc pid
    for p in "${missing[@]}"; do
        case "$p" in
            nginx-light|libnginx-mod-nchan) svc=nginx ;;
            haproxy) svc=haproxy ;;
            redis-server) svc=redis-server ;;
            *) continue ;;
        esac
        service "$svc" stop >/dev/null 2>&1 || true
        for pid in $(pgrep -x "$svc" 2>/dev/null || true); do
            # only daemons of the system service, never our own instances
            if ! grep -qs "$PEERS_DIR" "/proc/$pid/cmdline"; then kill -TERM "$pid" 2>/dev/null || true; fi
        done
        update-rc.d "$svc" disable >/dev/null 2>&1 || true
    done
    note "installed: ${missing[*]}"
}

# ---------------------------------------------------------------- start

check_tools() {
    local t
    for t in nginx haproxy redis-server redis-cli ss; do
        command -v "$t" >/dev/null || die "$t not found; run '$0 install' first"
    done
}

start_redis() {
    local d="$PEERS_DIR/redis" pid
    mkdir -p "$d"
    if pid="$(pid_from_file "$d/redis.pid" redis-server)"; then note "redis already running (pid $pid)"; return; fi
    port_listening "$PEERS_REDIS_PORT" && die "port $PEERS_REDIS_PORT already in use (not by our redis)"
    redis-server --bind 127.0.0.1 --port "$PEERS_REDIS_PORT" --protected-mode yes \
        --daemonize yes --pidfile "$d/redis.pid" --logfile "$d/redis.log" \
        --dir "$d" --save '' --appendonly no --loglevel warning \
        >/dev/null 2>&1 || die "redis-server failed to start (log: $d/redis.log)"
    wait_port "$PEERS_REDIS_PORT" redis "$d/redis.log"
    redis-cli -p "$PEERS_REDIS_PORT" ping 2>/dev/null | grep -q PONG || die "redis on port $PEERS_REDIS_PORT does not answer PING"
}

start_nginx() {  # start_nginx NAME PORT TEMPLATE KEY=VALUE...
    local name="$1" port="$2" tpl="$3" d="$PEERS_DIR/$1" pid
    shift 3
    mkdir -p "$d/tmp"
    chmod 755 "$PEERS_DIR" "$d"
    if pid="$(pid_from_file "$d/nginx.pid" nginx)"; then note "$name already running (pid $pid)"; return; fi
    port_listening "$port" && die "port $port already in use (needed by $name)"
    render "$tpl" "$d/nginx.conf" STATE="$d" PORT="$port" NOFILE="$(nofile_limit)" "$@"
    # -e: error log used before the config is read (default would be stderr / /var/log)
    nginx -t -q -p "$d" -e "$d/error.log" -c "$d/nginx.conf" 2>"$d/configtest.log" \
        || { cat "$d/configtest.log" >&2; die "$name: nginx config test failed ($d/nginx.conf)"; }
    nginx -p "$d" -e "$d/error.log" -c "$d/nginx.conf" 2>>"$d/error.log" \
        || { tail -n 5 "$d/error.log" >&2; die "$name: nginx failed to start (log: $d/error.log)"; }
    wait_port "$port" "$name" "$d/error.log"
}

start_haproxy() {
    local d="$PEERS_DIR/haproxy" pid nofile maxconn
    mkdir -p "$d"
    if pid="$(pid_from_file "$d/haproxy.pid" haproxy)"; then note "haproxy already running (pid $pid)"; return; fi
    port_listening "$HAPROXY_PORT" && die "port $HAPROXY_PORT already in use (needed by haproxy)"
    nofile="$(nofile_limit)"
    # 2 fds per proxied connection, plus headroom for listeners/pollers/etc.
    maxconn=$(((nofile - 200) / 2))
    render "$HERE/haproxy.cfg" "$d/haproxy.cfg" STATE="$d" PORT="$HAPROXY_PORT" \
        ECHO_PORT="$ECHO_PORT" MAXCONN="$maxconn"
    haproxy -c -q -f "$d/haproxy.cfg" >"$d/configtest.log" 2>&1 \
        || { cat "$d/configtest.log" >&2; die "haproxy: config check failed ($d/haproxy.cfg)"; }
    haproxy -f "$d/haproxy.cfg" >"$d/haproxy.log" 2>&1 \
        || { tail -n 5 "$d/haproxy.log" >&2; die "haproxy failed to start (log: $d/haproxy.log)"; }
    wait_port "$HAPROXY_PORT" haproxy "$d/haproxy.log"
}

cmd_start() {
    check_tools
    local module
    module="$(find_nchan_module)" || die "ngx_nchan_module.so not found; run '$0 install' first"
    mkdir -p "$PEERS_DIR"
    start_redis
    start_nginx nchan "$NCHAN_PORT" "$HERE/nchan.conf.template" \
        REDIS_PORT="$PEERS_REDIS_PORT" MODULE="$module"
    start_nginx nginx "$NGINX_PROXY_PORT" "$HERE/nginx-proxy.conf" ECHO_PORT="$ECHO_PORT"
    start_haproxy
    cmd_status
}

# ---------------------------------------------------------------- stop / status

cmd_stop() {
    [[ -d "$PEERS_DIR" ]] || { note "nothing to stop ($PEERS_DIR does not exist)"; return 0; }
    stop_pid haproxy "$PEERS_DIR/haproxy/haproxy.pid" haproxy
    stop_pid nginx "$PEERS_DIR/nginx/nginx.pid" nginx
    stop_pid nchan "$PEERS_DIR/nchan/nginx.pid" nginx
    stop_pid redis "$PEERS_DIR/redis/redis.pid" redis-server
}

cmd_status() {
    local all=0 name port f comm pid pids
    while read -r name port f comm; do
        if pid="$(pid_from_file "$f" "$comm")"; then
            pids="$(children_of "$pid")"
        else
            pids=-; all=3
        fi
        echo "$name pids=$pids port=$port"
    done <<STATUS
redis $PEERS_REDIS_PORT $PEERS_DIR/redis/redis.pid redis-server
nchan $NCHAN_PORT $PEERS_DIR/nchan/nginx.pid nginx
nginx $NGINX_PROXY_PORT $PEERS_DIR/nginx/nginx.pid nginx
haproxy $HAPROXY_PORT $PEERS_DIR/haproxy/haproxy.pid haproxy
STATUS
    return "$all"
}

case "${1:-}" in
    install) cmd_install ;;
    start) cmd_start ;;
    stop) cmd_stop ;;
    restart) cmd_stop; cmd_start ;;
    status) cmd_status ;;
    *) echo "usage: $0 {install|start|stop|restart|status}" >&2; exit 2 ;;
esac
