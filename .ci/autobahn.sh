#!/usr/bin/env bash
# WebSocket protocol conformance of wsproxy's reverse proxy, with kosoku
# (https://pypi.org/project/kosoku/), a Rust runner of the Autobahn TestSuite's
# own case files (fuzzingclient mode: one connection per case to an echo server).
#
#   cargo build --bin wsproxy -p wsproxy-bench   # once
#   bash .ci/autobahn.sh
#
# Starts wsproxy-bench's echo server, a private redis-server and wsproxy with
# a route /echo -> the echo server (.ci/autobahn-routes.json, a byte-tunnel
# route: no per-message limits), then runs the whole Autobahn suite (517 cases
# in kosoku 0.1.0, ~20 s per run) twice: against the echo server directly and
# through the proxy. The proxied verdict of every case (behavior and
# behaviorClose, plus the close code the peer sent) must equal the direct one.
# The suite's 12.x/13.x (permessage-deflate) cases come out UNIMPLEMENTED on
# both sides, since the echo server does not negotiate compression; they
# still check that the proxy passes the extension offer and the backend's
# refusal through unchanged.
#
# Reports (JSON + HTML per case, index.json, kosoku's output) and the logs go to
# target/autobahn/ (AUTOBAHN_OUT). Knobs: AUTOBAHN_INCLUDE / AUTOBAHN_EXCLUDE
# (space-separated case ids or globs, e.g. "1.* 7.*"), AUTOBAHN_TIMEOUT
# (seconds per kosoku run, default 100), AUTOBAHN_PARALLELISM (default 1),
# AUTOBAHN_ROUTES (another routes template: every backend port is set to the
# echo server's, and the suite goes through the first route's external_path;
# e.g. .ci/autobahn/limited-routes.json, the same route with max_message_bytes
# and rate_limit, whose frames wsproxy checks as they pass), AUTOBAHN_BACKEND
# (bench: wsproxy-bench's echo server, the default; deflate: a Python echo
# server that negotiates permessage-deflate, .ci/autobahn/deflate_echo.py, so
# that the 12.x/13.x cases send compressed messages, e.g. through the limited
# route, where wsproxy measures them by inflating them), AUTOBAHN_THROUGH
# (proxy: the second run goes through the route, the default; driver: it goes
# to wsproxy's own test-only echo endpoint /_test/echo, WS_TEST_ECHO=true,
# which runs on the connection driver of the session and pub/sub endpoints,
# so that wsproxy's own WebSocket stack is judged against the reference echo
# server).
# Exit status: 0 when every case matches; non-zero on any difference, if kosoku
# cannot be installed or run, or if a server fails or dies.
set -euo pipefail
cd "$(dirname "$0")/.."
step() { printf '\n==> %s\n' "$*"; }
fail() { printf '\nAUTOBAHN FAILED: %s\n' "$*" >&2; exit 1; }

KOSOKU_VERSION=0.1.0
KOSOKU_CASES=517 # the whole suite of kosoku 0.1.0
WEBSOCKETS_VERSION=16.1.1 # for the deflate backend
BACKEND=${AUTOBAHN_BACKEND:-bench}
OUT=${AUTOBAHN_OUT:-target/autobahn}
TIMEOUT=${AUTOBAHN_TIMEOUT:-100}
PARALLELISM=${AUTOBAHN_PARALLELISM:-1}
ROUTES_TEMPLATE=${AUTOBAHN_ROUTES:-.ci/autobahn-routes.json}
THROUGH=${AUTOBAHN_THROUGH:-proxy}
case $THROUGH in proxy | driver) ;; *) fail "AUTOBAHN_THROUGH: $THROUGH is neither proxy nor driver" ;; esac
VENV=target/autobahn-kosoku-$KOSOKU_VERSION
START=$SECONDS

for bin in wsproxy wsproxy-bench; do
  [[ -x target/debug/$bin ]] || fail "target/debug/$bin is missing: run cargo build --bin wsproxy -p wsproxy-bench"
done
command -v redis-server >/dev/null || fail "redis-server is not installed"
command -v curl >/dev/null || fail "curl is not installed"

# --- kosoku, pinned, in its own venv (nothing global is touched) -------------
PACKAGES=("kosoku==$KOSOKU_VERSION" "websockets==$WEBSOCKETS_VERSION")
have_kosoku() {
  "$VENV/bin/python" - "$KOSOKU_VERSION" "$WEBSOCKETS_VERSION" 2>/dev/null <<'EOF'
import importlib.metadata as m, sys
sys.exit(m.version("kosoku") != sys.argv[1] or m.version("websockets") != sys.argv[2])
EOF
}
if ! have_kosoku; then
  step "installing ${PACKAGES[*]} into $VENV"
  rm -rf "$VENV"
  if command -v uv >/dev/null; then
    uv venv --quiet --python python3 "$VENV" >/dev/null &&
      uv pip install --quiet --python "$VENV/bin/python" "${PACKAGES[@]}"
  else
    python3 -m venv "$VENV" &&
      "$VENV/bin/pip" install --quiet --disable-pip-version-check "${PACKAGES[@]}"
  fi || fail "could not install ${PACKAGES[*]}"
  have_kosoku || fail "${PACKAGES[*]} are not importable from $VENV"
fi
"$VENV/bin/kosoku" -h >/dev/null || fail "kosoku does not start"
PY=$VENV/bin/python

# --- servers -------------------------------------------------------------------
free_port() { "$PY" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
WORK=$(mktemp -d)
PIDS=()
cleanup() {
  local pid
  for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
  for pid in "${PIDS[@]}"; do wait "$pid" 2>/dev/null || true; done
  rm -rf "$WORK"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
rm -rf "$OUT/direct" "$OUT/proxied" "$OUT/logs" "$OUT/routes.json"
mkdir -p "$OUT/logs"
alive() { kill -0 "$1" 2>/dev/null; }

ECHO_PORT=$(free_port)
case $BACKEND in
  bench)
    step "echo backend: wsproxy-bench echo-server on 127.0.0.1:$ECHO_PORT"
    ./target/debug/wsproxy-bench echo-server --port "$ECHO_PORT" >"$OUT/logs/echo.log" 2>&1 &
    ;;
  deflate)
    step "echo backend: deflate_echo.py (permessage-deflate) on 127.0.0.1:$ECHO_PORT"
    "$PY" .ci/autobahn/deflate_echo.py "$ECHO_PORT" >"$OUT/logs/echo.log" 2>&1 &
    ;;
  *) fail "AUTOBAHN_BACKEND: $BACKEND is neither bench nor deflate" ;;
esac
ECHO_PID=$!
PIDS+=("$ECHO_PID")
for _ in $(seq 1 100); do
  (exec 3<>"/dev/tcp/127.0.0.1/$ECHO_PORT") 2>/dev/null && break
  alive "$ECHO_PID" || { cat "$OUT/logs/echo.log"; fail "the echo server exited at start-up"; }
  sleep 0.1
done
(exec 3<>"/dev/tcp/127.0.0.1/$ECHO_PORT") 2>/dev/null || fail "the echo server never listened"

REDIS_PORT=$(free_port)
step "private redis-server on 127.0.0.1:$REDIS_PORT"
redis-server --port "$REDIS_PORT" --bind 127.0.0.1 --save "" --appendonly no \
  --dir "$WORK" --logfile "$OUT/logs/redis.log" &
REDIS_PID=$!
PIDS+=("$REDIS_PID")
for _ in $(seq 1 100); do
  (exec 3<>"/dev/tcp/127.0.0.1/$REDIS_PORT") 2>/dev/null && break
  alive "$REDIS_PID" || fail "redis-server exited at start-up"
  sleep 0.1
done

# The routes template with the echo server's port in every backend; the suite
# goes through the first route's external_path.
ROUTE_PATH=$("$PY" - "$ROUTES_TEMPLATE" "$ECHO_PORT" "$WORK/routes.json" <<'EOF'
import json, sys
routes = json.load(open(sys.argv[1]))
for router in routes["routers"]:
    for backend in router["backends"]:
        backend["port"] = int(sys.argv[2])
json.dump(routes, open(sys.argv[3], "w"), indent=2)
print(routes["routers"][0]["external_path"])
EOF
) || fail "cannot make a routes file from $ROUTES_TEMPLATE"
cp "$WORK/routes.json" "$OUT/routes.json"

WS_PORT=$(free_port)
step "wsproxy on 127.0.0.1:$WS_PORT, route $ROUTE_PATH -> ws://127.0.0.1:$ECHO_PORT/"
# Config variables from the environment would change what is tested.
for v in HOST PORT REDIS_URL ROUTES_FILE AUTH_TIMEOUT_SECS AUTH_GRACE_PERIOD_SECS \
         WS_PING_INTERVAL_SECS WS_PING_TIMEOUT_SECS SHUTDOWN_GRACE_PERIOD_SECS \
         WS_MAX_MESSAGE_BYTES WS_OUTBOUND_QUEUE WS_CLIENT_MESSAGE_RATE WS_CLIENT_MESSAGE_BURST MAX_CONNECTIONS LOG_FORMAT \
         JWT_SECRET USERS_FILE CORS_ALLOWED_ORIGINS TLS_CERT TLS_KEY TLS_CERT_FILE TLS_KEY_FILE \
         WS_ALLOWED_ORIGINS WS_TEST_ECHO METRICS_TOKEN WORKERS; do
  unset "$v"
done
# For the driver, the reference server's own message limit (tungstenite's
# 64 MiB): the suite's largest messages are 16 MiB.
DRIVER_ENV=()
[[ $THROUGH == driver ]] && DRIVER_ENV=(WS_TEST_ECHO=true WS_MAX_MESSAGE_BYTES=67108864)
env "${DRIVER_ENV[@]}" HOST=127.0.0.1 PORT=$WS_PORT REDIS_URL=redis://127.0.0.1:$REDIS_PORT \
  ROUTES_FILE=$WORK/routes.json RUST_LOG=${RUST_LOG:-info} \
  ./target/debug/wsproxy >"$OUT/logs/wsproxy.log" 2>&1 &
WS_PID=$!
PIDS+=("$WS_PID")
for _ in $(seq 1 100); do
  curl -sf "http://127.0.0.1:$WS_PORT/ready" >/dev/null && break
  alive "$WS_PID" || { tail -30 "$OUT/logs/wsproxy.log"; fail "wsproxy exited at start-up"; }
  sleep 0.1
done
curl -sf "http://127.0.0.1:$WS_PORT/ready" >/dev/null ||
  { tail -30 "$OUT/logs/wsproxy.log"; fail "wsproxy never became ready"; }

# --- the suite, direct and through the proxy ------------------------------------
ARGS=(-p "$PARALLELISM")
read -r -a INCLUDE <<<"${AUTOBAHN_INCLUDE:-}" # split on spaces, no globbing
read -r -a EXCLUDE <<<"${AUTOBAHN_EXCLUDE:-}"
for c in "${INCLUDE[@]}"; do ARGS+=(-i "$c"); done
for c in "${EXCLUDE[@]}"; do ARGS+=(-x "$c"); done
EXPECT=()
if ((${#INCLUDE[@]} + ${#EXCLUDE[@]} == 0)); then EXPECT=("$KOSOKU_CASES"); fi

# kosoku exits 0 when every case passed and 1 when some did not (UNIMPLEMENTED
# counts as not passed), after writing the reports either way. Anything else, or
# no index.json, means it did not run.
run_kosoku() {
  local name=$1 url=$2 rc=0 t0=$SECONDS
  step "kosoku $KOSOKU_VERSION: $name, $url"
  timeout --kill-after=5 "$TIMEOUT" "$VENV/bin/kosoku" "${ARGS[@]}" -o "$OUT/$name" "$url" \
    >"$OUT/logs/kosoku-$name.log" 2>&1 &
  local pid=$!
  PIDS+=("$pid")
  wait "$pid" || rc=$?
  if [[ $rc -ne 0 && $rc -ne 1 ]] || [[ ! -s "$OUT/$name/index.json" ]]; then
    tail -20 "$OUT/logs/kosoku-$name.log"
    [[ $rc -eq 124 || $rc -eq 137 ]] && fail "kosoku ($name) did not finish within ${TIMEOUT}s"
    fail "kosoku ($name) did not run (exit $rc)"
  fi
  grep -h '^wrote reports' "$OUT/logs/kosoku-$name.log" || true
  echo "($((SECONDS - t0)) s)"
}
run_kosoku direct "ws://127.0.0.1:$ECHO_PORT/"
alive "$ECHO_PID" || fail "the echo server died during the direct run"
if [[ $THROUGH == driver ]]; then
  run_kosoku proxied "ws://127.0.0.1:$WS_PORT/_test/echo"
else
  run_kosoku proxied "ws://127.0.0.1:$WS_PORT$ROUTE_PATH"
fi
alive "$ECHO_PID" || fail "the echo server died during the proxied run"
alive "$WS_PID" || { tail -30 "$OUT/logs/wsproxy.log"; fail "wsproxy died during the proxied run"; }
curl -sf "http://127.0.0.1:$WS_PORT/ready" >/dev/null || fail "wsproxy is no longer ready after the run"

step "direct vs proxied, case by case"
rc=0
COMPARE=()
[[ $THROUGH == driver ]] && COMPARE=(--driver)
"$PY" .ci/autobahn/compare.py "${COMPARE[@]}" "$OUT/direct" "$OUT/proxied" "${EXPECT[@]}" || rc=$?
echo "reports: $OUT/direct/index.html, $OUT/proxied/index.html; run time $((SECONDS - START)) s"
case $rc in
  0) printf '\nAutobahn conformance: proxied matches direct.\n' ;;
  1) fail "the proxy changes the outcome of some cases (above)" ;;
  *) fail "the reports are incomplete (above)" ;;
esac
