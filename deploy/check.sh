#!/usr/bin/env bash
# Checks the files of deploy/ against each other, the configuration reference and systemd:
#
#   bash deploy/check.sh [WSPROXY_BINARY]      e.g. target/debug/wsproxy
#
# 1. wsproxy.env names exactly the variables of the configuration reference's
#    table (each at least once, set or commented out, none set twice), in
#    lines systemd's EnvironmentFile= reads as meant;
# 2. given WSPROXY_BINARY: wsproxy starts with wsproxy.env's settings (on
#    127.0.0.1, a free port) and exits 0 on SIGTERM;
# 3. systemd-analyze verify accepts wsproxy.service with no warning about
#    it, and systemd-analyze security rates its sandbox 2.0 or better. It
#    checks a copy whose ExecStart is WSPROXY_BINARY (verify insists that
#    the binary exists; without the argument /usr/local/bin/wsproxy must)
#    and whose EnvironmentFile is deploy/wsproxy.env. Skipped, saying so,
#    where systemd-analyze is not installed (Debian package systemd).
# Exit 0 when everything checked passed, 1 otherwise.
set -euo pipefail

fail() { printf 'deploy/check: FAILED: %s\n' "$*" >&2; exit 1; }
say() { printf 'deploy/check: %s\n' "$*"; }

binary=""
if (($# > 1)); then fail "usage: bash deploy/check.sh [WSPROXY_BINARY]"; fi
if (($# == 1)); then
  [[ -x "$1" && -f "$1" ]] || fail "$1 is not an executable file"
  binary=$(cd "$(dirname "$1")" && pwd)/$(basename "$1")
fi
deploy=$(cd "$(dirname "$0")" && pwd)
reference="$deploy/../docs/src/configuration.md"
envfile="$deploy/wsproxy.env"
unit="$deploy/wsproxy.service"
work=$(mktemp -d)
pid=""
cleanup() {
  if [[ -n "$pid" ]]; then kill -KILL "$pid" 2>/dev/null || true; fi
  rm -rf "$work"
}
trap cleanup EXIT

# --- 1. wsproxy.env against the configuration reference's table -------------
# The table's rows start with "| `NAME`" (some name two variables); only
# the settings table, before the page's first "## " section, is read: the
# endpoints table below it looks alike.
# shellcheck disable=SC2016 # the backquotes are meant literally
awk '/^## /{exit} /^\| `/' "$reference" | cut -d'|' -f2 |
  grep -o '`[A-Za-z_][A-Za-z0-9_]*`' | tr -d '`' | sort -u >"$work/documented"
[[ -s "$work/documented" ]] || fail "no variables found in docs/src/configuration.md's settings table"

errors=()
lineno=0
: >"$work/named"
: >"$work/set"
while IFS= read -r line || [[ -n "$line" ]]; do
  lineno=$((lineno + 1))
  if [[ "$line" =~ ^[A-Za-z_][A-Za-z0-9_]*= ]]; then
    name=${line%%=*}
    if grep -qx "$name" "$work/set"; then errors+=("line $lineno: $name is set a second time"); fi
    echo "$name" >>"$work/set"
  elif [[ "$line" =~ ^#[[:space:]]*([A-Za-z_][A-Za-z0-9_]*)= ]]; then
    name=${BASH_REMATCH[1]}
  elif [[ -z "$line" || "$line" == '#'* ]]; then
    continue
  else
    errors+=("line $lineno: neither NAME=value nor a comment starting with #: $line")
    continue
  fi
  echo "$name" >>"$work/named"
  grep -qx "$name" "$work/documented" ||
    errors+=("line $lineno: $name is not a variable of the configuration reference (docs/src/configuration.md)")
done <"$envfile"
while IFS= read -r name; do
  grep -qx "$name" "$work/named" ||
    errors+=("$name is in the configuration reference (docs/src/configuration.md) but not in deploy/wsproxy.env (add it, set or commented out)")
done <"$work/documented"
if ((${#errors[@]})); then
  printf 'deploy/check: wsproxy.env: %s\n' "${errors[@]}" >&2
  fail "deploy/wsproxy.env and the configuration reference (docs/src/configuration.md) disagree"
fi
say "wsproxy.env names the $(wc -l <"$work/documented") variables of the configuration reference (docs/src/configuration.md) ($(wc -l <"$work/set") set)"

# --- 2. the binary starts with wsproxy.env's settings --------------------
if [[ -n "$binary" ]]; then
  settings=()
  while IFS= read -r line; do settings+=("$line"); done < <(grep -E '^[A-Za-z_][A-Za-z0-9_]*=' "$envfile")
  # A clean environment, as systemd gives, and a working directory with no
  # .env. HOST and PORT are overridden so that nothing is exposed, and
  # REDIS_URL so that no Redis this machine runs is touched: wsproxy starts
  # without Redis (it retries in the background).
  closed_port=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
  (cd "$work" && exec env -i PATH=/usr/bin:/bin "${settings[@]}" HOST=127.0.0.1 PORT=0 \
    REDIS_URL="redis://127.0.0.1:$closed_port" "$binary" >"$work/wsproxy.log" 2>&1) &
  pid=$!
  for _ in $(seq 1 100); do
    grep -q 'wsproxy listening' "$work/wsproxy.log" && break
    kill -0 "$pid" 2>/dev/null || break
    sleep 0.1
  done
  if ! grep -q 'wsproxy listening' "$work/wsproxy.log"; then
    rc=0
    if kill -0 "$pid" 2>/dev/null; then rc="still starting after 10 s"; else wait "$pid" || rc=$?; fi
    pid=""
    cat "$work/wsproxy.log" >&2
    fail "$binary did not start with deploy/wsproxy.env's settings (exit: $rc)"
  fi
  kill -TERM "$pid"
  rc=0
  wait "$pid" || rc=$?
  pid=""
  if ((rc != 0)) || ! grep -q 'shutdown complete' "$work/wsproxy.log"; then
    cat "$work/wsproxy.log" >&2
    fail "$binary exited $rc on SIGTERM, expected 0 after 'shutdown complete'"
  fi
  say "$binary starts with wsproxy.env's settings and exits 0 on SIGTERM"
fi

# --- 3. systemd's own checks of the unit ---------------------------------
if ! command -v systemd-analyze >/dev/null; then
  say "systemd-analyze is not installed (Debian package systemd): unit check skipped"
  exit 0
fi
exec_start=${binary:-/usr/local/bin/wsproxy}
[[ -x "$exec_start" ]] ||
  fail "$exec_start does not exist, and systemd-analyze verify needs it: pass the built binary, e.g. bash deploy/check.sh target/debug/wsproxy"
grep -qx 'ExecStart=/usr/local/bin/wsproxy' "$unit" || fail "wsproxy.service has no line ExecStart=/usr/local/bin/wsproxy"
grep -qx 'EnvironmentFile=/etc/wsproxy/wsproxy.env' "$unit" ||
  fail "wsproxy.service has no line EnvironmentFile=/etc/wsproxy/wsproxy.env"
# The copy keeps the name: systemd derives the unit's name from the file's.
mkdir "$work/unit"
copy="$work/unit/wsproxy.service"
escape() { printf '%s' "$1" | sed 's/[&#\\]/\\&/g'; }
sed -e "s#^ExecStart=/usr/local/bin/wsproxy\$#ExecStart=$(escape "$exec_start")#" \
  -e "s#^EnvironmentFile=/etc/wsproxy/wsproxy.env\$#EnvironmentFile=$(escape "$envfile")#" "$unit" >"$copy"

# verify exits 0 on most mistakes (an unknown option, a value it cannot
# parse), only warning: any line about this unit counts as a failure.
# Lines about other units (dependencies such as network-online.target, in
# whatever state this machine has them) are shown but do not count.
verify=(systemd-analyze verify)
if systemd-analyze --help | grep -q -- '--recursive-errors'; then verify+=(--recursive-errors=no); fi
rc=0
out=$("${verify[@]}" "$copy" 2>&1) || rc=$?
ours=$(grep -F 'wsproxy.service' <<<"$out" || true)
others=$(grep -vF 'wsproxy.service' <<<"$out" || true)
if [[ -n "$others" ]]; then printf 'deploy/check: systemd-analyze verify, about other units (ignored):\n%s\n' "$others"; fi
if ((rc != 0)) || [[ -n "$ours" ]]; then
  printf '%s\n' "${ours:-$out}" >&2
  fail "systemd-analyze verify: wsproxy.service has errors (exit $rc)"
fi
say "systemd-analyze verify: wsproxy.service is clean"

if systemd-analyze security --help 2>/dev/null | grep -q -- '--offline'; then
  rc=0
  # The threshold is in tenths: 20 is an exposure level of 2.0 (0 is best,
  # 10 worst); this unit scores about 1.4.
  out=$(systemd-analyze security --offline=yes --threshold=20 "$copy" 2>&1) || rc=$?
  score=$(grep 'Overall exposure level' <<<"$out" | grep -Eo '[0-9]+\.[0-9]+' || true)
  if ((rc != 0)); then
    printf '%s\n' "$out" >&2
    fail "systemd-analyze security: wsproxy.service's exposure level is ${score:-not known}, above 2.0"
  fi
  say "systemd-analyze security: exposure level $score (2.0 allowed)"
fi
