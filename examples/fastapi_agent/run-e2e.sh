#!/usr/bin/env bash
# End to end: the example's page in headless Chromium, the example app (uv
# run app.py, with its agent), a wsproxy and a Redis, all started here on
# free loopback ports and stopped when it ends.
#
#   bash examples/fastapi_agent/run-e2e.sh
#
# Environment: WSPROXY_BIN (default target/debug/wsproxy of this repository:
# cargo build --bin wsproxy), CHROMIUM_PATH (default /usr/bin/chromium), UV
# (the uv command, default uv), E2E_SCREENSHOT (a PNG of a tab whose reply
# was stopped). Needs redis-server, node >= 20 and npm (the
# browser driver, playwright-core, comes from clients/js: npm ci there when
# missing; Playwright never downloads a browser).
#
# The test checks a reply streamed piece by piece in a reliable and in a
# plain session, over WebSocket and over SSE; then Stop across two tabs of
# one reliable session (one on SSE, one on WebSocket, reloaded mid-reply
# before it presses Stop: the reply ends in both, nothing after the marker);
# then leaves in the middle of a reply and comes back, over each transport:
# the agent must have paused while the page was away and go on after. When
# the wsproxy has lifecycle events (its --help lists LIFECYCLE_EVENTS) they
# are wsproxy's own; otherwise the test appends the disconnect and resume
# events itself, in the format wsproxy will use (E2E_EVENTS=simulated).
# Replies are 100 pieces, 60 ms apart (6 s): long enough to reload a tab and
# press Stop while one streams. The whole run takes about 80 s.
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
ROOT=$(cd "$HERE/../.." && pwd)
WSPROXY_BIN=${WSPROXY_BIN:-$ROOT/target/debug/wsproxy}
CHROMIUM_PATH=${CHROMIUM_PATH:-/usr/bin/chromium}
read -r -a UV <<<"${UV:-uv}"

fail() { printf 'fastapi_agent e2e: %s\n' "$*" >&2; exit 1; }
[[ -x "$WSPROXY_BIN" ]] || fail "no wsproxy at $WSPROXY_BIN (cargo build --bin wsproxy, or set WSPROXY_BIN)"
[[ -x "$CHROMIUM_PATH" ]] || fail "no Chromium at $CHROMIUM_PATH (apt-get install chromium, or set CHROMIUM_PATH)"
command -v redis-server >/dev/null || fail "redis-server is not installed"
command -v node >/dev/null || fail "node is not installed (>= 20)"

if [[ ! -f "$ROOT/clients/js/node_modules/playwright-core/package.json" ]]; then
  echo "fastapi_agent e2e: npm ci in clients/js (playwright-core)"
  (cd "$ROOT/clients/js" && npm ci --no-audit --no-fund --loglevel=error)
fi

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
WORK=$(mktemp -d)
PIDS=()
cleanup() {
  for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$WORK"
}
trap cleanup EXIT
wait_http() { # url pid what
  for _ in $(seq 1 300); do
    curl -sf "$1" >/dev/null 2>&1 && return 0
    kill -0 "$2" 2>/dev/null || { tail -30 "$WORK"/*.log >&2; fail "$3 exited at start-up"; }
    sleep 0.1
  done
  tail -30 "$WORK"/*.log >&2
  fail "$3 not ready after 30 s"
}

REDIS_PORT=$(free_port)
redis-server --port "$REDIS_PORT" --bind 127.0.0.1 --save "" --appendonly no --logfile "$WORK/redis.log" &
PIDS+=($!)
for _ in $(seq 1 100); do redis-cli -p "$REDIS_PORT" ping >/dev/null 2>&1 && break; sleep 0.05; done

# A wsproxy without the events settings ignores them.
WS_PORT=$(free_port)
env -u PORT -u HOST -u REDIS_URL -u WS_ALLOWED_ORIGINS \
  HOST=127.0.0.1 PORT="$WS_PORT" REDIS_URL="redis://127.0.0.1:$REDIS_PORT" RELIABLE_SESSIONS=true \
  LIFECYCLE_EVENTS=true PRESENCE=true WS_ALLOWED_ORIGINS='*' SHUTDOWN_GRACE_PERIOD_SECS=2 RUST_LOG=info \
  "$WSPROXY_BIN" >"$WORK/wsproxy.log" 2>&1 &
WS_PID=$!
PIDS+=("$WS_PID")
wait_http "http://127.0.0.1:$WS_PORT/ready" "$WS_PID" wsproxy

EVENTS=simulated
"$WSPROXY_BIN" --help 2>/dev/null | grep -q LIFECYCLE_EVENTS && EVENTS=1
echo "fastapi_agent e2e: lifecycle events: $EVENTS"

APP_PORT=$(free_port)
(cd "$HERE" && exec env REDIS_URL="redis://127.0.0.1:$REDIS_PORT" WSPROXY_URL="ws://127.0.0.1:$WS_PORT" \
  APP_HOST=127.0.0.1 APP_PORT="$APP_PORT" REPLY_DELAY_MS=60 REPLY_WORDS=100 \
  "${UV[@]}" run --quiet app.py) >"$WORK/app.log" 2>&1 &
APP_PID=$!
PIDS+=("$APP_PID")
wait_http "http://127.0.0.1:$APP_PORT/healthz" "$APP_PID" "the example app"

status=0
APP_URL="http://127.0.0.1:$APP_PORT" CHROMIUM_PATH="$CHROMIUM_PATH" E2E_SCREENSHOT=${E2E_SCREENSHOT:-} E2E_EVENTS=$EVENTS REDIS_PORT=$REDIS_PORT \
  node "$HERE/e2e.mjs" || status=$?
if ((status)); then
  echo "--- app log"; tail -40 "$WORK/app.log"
  echo "--- wsproxy log"; tail -20 "$WORK/wsproxy.log"
fi
exit "$status"
