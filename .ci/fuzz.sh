#!/usr/bin/env bash
# Fuzzes every parser of outside input for a bounded time:
#   bash .ci/fuzz.sh                       # every target, 20 s each
#   FUZZ_SECONDS=300 bash .ci/fuzz.sh      # longer
#   FUZZ_TARGETS="jwt origin" bash .ci/fuzz.sh
#   FUZZ_JOBS=1 bash .ci/fuzz.sh           # one target at a time
#   FUZZ_BUILD_ONLY=1 bash .ci/fuzz.sh     # build the targets, fuzz nothing
# The targets are fuzz/fuzz_targets/*.rs (a crate of its own, outside the
# main workspace). All are built once, then each runs, single-threaded, on a
# copy of its committed seeds (fuzz/corpus/<target>), so the committed
# corpus is never changed; FUZZ_JOBS targets (default: one per CPU) run at
# the same time, each for its full FUZZ_SECONDS. The copies and the logs go
# to target/fuzz/. Exits non-zero if any target crashes (a panic, a failed
# property, a sanitizer report, an input slower than FUZZ_TIMEOUT seconds),
# naming the artefact that reproduces it.
set -euo pipefail
cd "$(dirname "$0")/.."
step() { printf '\n==> %s\n' "$*"; }

seconds=${FUZZ_SECONDS:-20}
timeout=${FUZZ_TIMEOUT:-10}
jobs=${FUZZ_JOBS:-$(nproc 2>/dev/null || echo 1)}
work=target/fuzz

if ! command -v cargo-fuzz >/dev/null; then
  step "installing cargo-fuzz from crates.io"
  cargo install cargo-fuzz --locked
fi
# cargo-fuzz needs nightly flags (sanitizers, coverage instrumentation);
# this lets the stable toolchain take them.
export RUSTC_BOOTSTRAP=1

# The config target parses the command line, whose defaults these would
# change (as in .ci/run): every run should see the same.
for v in HOST PORT REDIS_URL AUTH_TIMEOUT_SECS AUTH_GRACE_PERIOD_SECS WS_PING_INTERVAL_SECS \
         WS_PING_TIMEOUT_SECS SHUTDOWN_GRACE_PERIOD_SECS WS_MAX_MESSAGE_BYTES WS_OUTBOUND_QUEUE WS_CLIENT_MESSAGE_RATE WS_CLIENT_MESSAGE_BURST \
         MAX_CONNECTIONS LOG_FORMAT PUBSUB_ALLOW_ANONYMOUS PUBSUB_MAX_SUBSCRIPTIONS \
         PUBSUB_MAX_PAYLOAD_BYTES JWT_SECRET JWT_ISSUER JWT_AUDIENCE JWT_TTL_SECS USERS_FILE \
         CORS_ALLOWED_ORIGINS ROUTES_FILE UPSTREAM_CA_FILE TLS_CERT_FILE TLS_KEY_FILE WORKERS \
         WS_ALLOWED_ORIGINS METRICS_TOKEN WS_TEST_ECHO; do
  unset "$v"
done

read -r -a targets <<<"${FUZZ_TARGETS:-$(cargo fuzz list | tr '\n' ' ')}"
((${#targets[@]})) || { echo "no fuzz targets found" >&2; exit 1; }

step "building ${#targets[@]} fuzz targets (release, debug assertions, AddressSanitizer)"
build_started=$SECONDS
cargo fuzz build
echo "fuzz targets built in $((SECONDS - build_started)) s"
if [[ -n "${FUZZ_BUILD_ONLY:-}" ]]; then exit 0; fi

mkdir -p "$work/corpus" "$work/logs"

# One target: its log in $work/logs/<t>.log, "ok" or "CRASH" in <t>.status.
fuzz_one() {
  local t=$1 corpus="$work/corpus/$1" log="$work/logs/$1.log"
  rm -rf "$corpus"
  mkdir -p "$corpus"
  [[ -d "fuzz/corpus/$t" ]] && cp -r "fuzz/corpus/$t/." "$corpus/"
  local args=(-max_total_time="$seconds" -rss_limit_mb=2048 -timeout="$timeout" -print_final_stats=1)
  [[ -f "fuzz/dict/$t.dict" ]] && args+=(-dict="fuzz/dict/$t.dict")
  if cargo fuzz run "$t" "$corpus" -- "${args[@]}" >"$log" 2>&1; then
    echo ok >"$work/logs/$t.status"
  else
    echo CRASH >"$work/logs/$t.status"
  fi
}

step "fuzzing ${#targets[@]} targets for ${seconds}s each, ${jobs} at a time"
fuzz_started=$SECONDS
running=0
for t in "${targets[@]}"; do
  if ((running >= jobs)); then
    wait -n || true
    running=$((running - 1))
  fi
  rm -f "$work/logs/$t.status"
  echo "fuzzing $t"
  fuzz_one "$t" &
  running=$((running + 1))
done
wait
echo "fuzzed in $((SECONDS - fuzz_started)) s"

failed=()
summary=()
for t in "${targets[@]}"; do
  log="$work/logs/$t.log"
  status=$(cat "$work/logs/$t.status" 2>/dev/null || echo CRASH)
  seeds=$(find "fuzz/corpus/$t" -type f 2>/dev/null | wc -l)
  if [[ "$status" != ok ]]; then
    failed+=("$t")
    step "$t crashed"
    tail -n 60 "$log"
    artefact=$(grep -oE "fuzz/artifacts/$t/[a-z]+-[0-9a-f]+" "$log" | tail -n 1 || true)
    printf '\n%s crashed; reproducer: %s\n  rerun: RUSTC_BOOTSTRAP=1 cargo fuzz run %s %s\n  full log: %s\n' \
      "$t" "${artefact:-see the log}" "$t" "${artefact:-<artefact>}" "$log" >&2
  fi
  # libFuzzer's last status line: "#<execs> DONE cov: <edges> ft: <features> corp: <n>/<size> ..."
  last=$(grep -E '^#[0-9]+' "$log" | tail -n 1 || true)
  execs=$(grep -oE '^stat::number_of_executed_units: *[0-9]+' "$log" | grep -oE '[0-9]+$' || true)
  summary+=("$(printf '%-16s %-5s execs=%-10s seeds=%-3s %s' "$t" "$status" "${execs:-?}" "$seeds" \
    "$(grep -oE 'cov: [0-9]+ ft: [0-9]+ corp: [0-9]+/[0-9]+[a-zA-Z]*' <<<"$last" || true)")")
done

step "fuzz summary (${seconds}s a target; corpora in $work/corpus, logs in $work/logs)"
printf '%s\n' "${summary[@]}"
if ((${#failed[@]})); then
  printf '\nFUZZ FAILED: %s (artefacts in fuzz/artifacts/<target>/)\n' "${failed[*]}" >&2
  exit 1
fi
echo "fuzz: ${#targets[@]} targets, no crash"
