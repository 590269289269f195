#!/usr/bin/env bash
# Real-browser end-to-end tests of clients/js (jwt_utils.js, the demo page,
# session.js) against a wsproxy that is ALREADY RUNNING (this script does not
# start wsproxy or Redis for them), then the tests of sessions over HTTP
# (test/sse-e2e.mjs) and over TLS with HTTP/2 (test/sse-h2-e2e.mjs, which
# needs openssl), which start their own redis-server and wsproxy
# processes from the binary WSPROXY_BIN (default ../../target/debug/wsproxy
# from this directory: build it first with cargo build --bin wsproxy).
#
#   WSPROXY_HTTP=http://127.0.0.1:8080 E2E_USER=alice E2E_PASSWORD=secret \
#   REDIS_URL=redis://127.0.0.1:6379 WSPROXY_BIN=$PWD/target/debug/wsproxy \
#   bash clients/js/run-e2e.sh
#
# The server needs JWT_SECRET, a USERS_FILE containing E2E_USER, and
# CORS_ALLOWED_ORIGINS allowing http://127.0.0.1:<any port> (e.g. '*');
# for the session test, RELIABLE_SESSIONS=true, and REDIS_URL must be the
# Redis the server uses (the test is the backend: it stores session tokens
# and publishes).
#
# On a fresh Debian machine it installs what is missing: Debian's chromium
# (apt-get) and the npm dev dependencies (npm ci, from package-lock.json).
# Playwright's own browser downloads are never used. Needs Node.js >= 20.
set -euo pipefail
cd "$(dirname "$0")"

fail() { printf 'run-e2e: %s\n' "$*" >&2; exit 1; }

: "${WSPROXY_HTTP:?set WSPROXY_HTTP, e.g. http://127.0.0.1:8080}"
: "${E2E_USER:?set E2E_USER (a user listed in USERS_FILE of the server)}"
: "${E2E_PASSWORD:?set E2E_PASSWORD}"
: "${REDIS_URL:?set REDIS_URL, the Redis the server uses (e.g. redis://127.0.0.1:6379)}"

CHROMIUM_PATH=${CHROMIUM_PATH:-/usr/bin/chromium}
if [[ ! -x "$CHROMIUM_PATH" ]]; then
  [[ "$CHROMIUM_PATH" == /usr/bin/chromium ]] || fail "CHROMIUM_PATH=$CHROMIUM_PATH is not executable"
  echo "run-e2e: installing Debian's chromium"
  SUDO=()
  if [[ $(id -u) -ne 0 ]]; then
    command -v sudo >/dev/null || fail "chromium is missing and this is not root (no sudo either)"
    SUDO=(sudo)
  fi
  export DEBIAN_FRONTEND=noninteractive
  "${SUDO[@]}" apt-get update -qq
  "${SUDO[@]}" apt-get install -y -qq chromium >/dev/null
  [[ -x /usr/bin/chromium ]] || fail "apt-get install chromium did not provide /usr/bin/chromium"
fi

command -v node >/dev/null || fail "node is not installed (Node.js >= 20 required; Debian 12's nodejs is 18, too old)"
command -v npm >/dev/null || fail "npm is not installed"
node_major=$(node -p 'process.versions.node.split(".")[0]')
(( node_major >= 20 )) || fail "Node.js $(node --version) is too old; >= 20 required"

if [[ ! -f node_modules/playwright-core/package.json || ! -f node_modules/ws/package.json ]]; then
  echo "run-e2e: npm ci"
  # playwright-core has no install script and downloads no browser.
  npm ci --no-audit --no-fund --loglevel=error
fi

export CHROMIUM_PATH
# session.js's reconnect rules against a fake WebSocket (no server, no
# browser): drops shorter than 10 s back off and count toward maxAttempts.
node --test test/session-unit.mjs
node test/browser-e2e.mjs
# The demo page (demo/), served by python3 -m http.server, in two tabs; it
# also needs PUBSUB_ALLOW_ANONYMOUS=true and WS_ALLOWED_ORIGINS allowing
# http://localhost:<any port> (e.g. '*').
node test/demo-e2e.mjs
# session.js on /{agent}/ws/{session}: reliable sessions with a cut link in
# the middle of a stream, resume failures, plain mode.
node test/session-e2e.mjs
# Sessions over HTTP: Chromium's own EventSource across a SIGKILLed and
# restarted wsproxy, a revoke, and session.js with transport 'sse'.
WSPROXY_BIN=$(realpath -m "${WSPROXY_BIN:-../../target/debug/wsproxy}")
[[ -x "$WSPROXY_BIN" ]] || fail "WSPROXY_BIN=$WSPROXY_BIN is not an executable (cargo build --bin wsproxy)"
command -v redis-server >/dev/null || fail "redis-server is not on PATH (the SSE tests start their own)"
export WSPROXY_BIN
node test/sse-e2e.mjs
# Sessions over TLS with HTTP/2: two EventSources, POSTs and a WebSocket
# from a page served by wsproxy itself, with a throwaway self-signed
# certificate made by openssl.
command -v openssl >/dev/null || fail "openssl is not on PATH (the HTTP/2 test makes its certificate with it: apt-get install openssl)"
exec node test/sse-h2-e2e.mjs
