# Shared by bench/publish-cost.sh and bench/publish-instructions.sh (sourced,
# not run): the wsproxy library of a revision as wsproxy loads it, and the
# three ~200-byte messages both measure.

# library REV TTL_MS -> the library of REV with HISTORY_MAX_LEN 1000, the
# given TTL, and its renewal window (a hundredth of it, as wsproxy sets).
# The Lua is src/session/history.lua since it left history.rs' LIBRARY;
# WITH_PREV=true builds it as classic pub/sub on a cluster does.
library() {
  { git show "$1:src/session/history.lua" 2>/dev/null ||
    git show "$1:src/session/history.rs" 2>/dev/null || git show "$1:src/history.rs"; } |
    python3 -c '
import re, sys
ttl = int(sys.argv[1])
text = sys.stdin.read()
found = re.search(r"const LIBRARY: &str = r#\"(.*?)\"#;", text, re.S)
lib = found.group(1) if found else text
for key, value in (("__MAX_LEN__", "1000"), ("__TTL_MS__", str(ttl)),
                   ("__RENEW_MS__", str(ttl // 100)), ("__PUBLISH__", "PUBLISH"),
                   ("__WITH_PREV__", sys.argv[2])):
    lib = lib.replace(key, value)
print(lib)' "$2" "${WITH_PREV:-false}"
}

# payloads DIR -> DIR/ascii.json (compact ASCII, json.dumps' default),
# DIR/utf8.json (compact with 8 non-ASCII characters, what JSON.stringify
# and the Python library send for accented, CJK and emoji text) and
# DIR/pretty.json (pretty-printed).
payloads() {
  python3 - "$1" <<'PY'
import json, sys
m = {"type": "data", "payload": "The quick brown fox jumps over the lazy dog; streaming token 1234 of the reply",
     "seq": 4217, "meta": {"model": "m-1", "done": False, "usage": {"in": 512, "out": 77}}}
open(sys.argv[1] + "/ascii.json", "w").write(json.dumps(m, separators=(",", ":")))
open(sys.argv[1] + "/pretty.json", "w").write(json.dumps(m, indent=2))
m["payload"] = "Le renard brun rapide saute par-dessus le chien paresseux \u2014 \u901f\u3044\u8336\u8272\u306e\u72d0 \U0001F600 token 1234"
open(sys.argv[1] + "/utf8.json", "w").write(json.dumps(m, separators=(",", ":"), ensure_ascii=False))
PY
}
