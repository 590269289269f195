"""Compare two kosoku (Autobahn) report directories case by case.

    python compare.py [--driver] DIRECT_DIR PROXIED_DIR [EXPECTED_CASES]

Each directory holds the `index.json` kosoku's CLI writes:
{agent: {case_id: {"behavior", "behaviorClose", "remoteCloseCode", ...}}}.
The agent key is the peer's `Server` header or, without one, host:port, so it
differs between the two targets; the cases of all agents in a file are merged.

A case's result is the pair (behavior, behaviorClose), e.g. ("OK", "OK") or
("NON-STRICT", "OK"). The proxied result of every case must equal the direct
one. Since the route under test is a byte tunnel, the close code the peer sent
(remoteCloseCode) must be the same too.

With --driver the second directory is wsproxy's own WebSocket stack (its
test echo endpoint), not a byte tunnel: verdicts must still be equal, and so
must close codes, except where the reference server broke the connection
off without a close frame (it does so on every protocol error). There RFC
6455 asks the server to send one first, so wsproxy must have closed with
1002 (protocol error) or 1007 (invalid UTF-8); dropping the connection as
the reference does is a difference.

Finer details from the per-case reports (the events received, the close
reason, who closed or dropped the connection, whether it was clean) are
compared as well but only reported as notes, not failures: a few of them can
depend on timing.

Exit status: 0 when every case matches; 1 on any difference; 2 when a report
is missing or unusable (kosoku did not really run): no cases, a case count
other than EXPECTED_CASES (when given), different case sets, or an ERROR verdict (a case that could not be run to a verdict).
"""

from __future__ import annotations

import json
import sys
from collections import Counter
from pathlib import Path

BEHAVIORS = ("OK", "NON-STRICT", "INFORMATIONAL", "UNIMPLEMENTED", "FAILED", "ERROR")


def sort_key(case_id: str) -> list[int]:
    return [int(p) for p in case_id.split(".")]


def load(outdir: str) -> dict[str, dict]:
    index = Path(outdir) / "index.json"
    try:
        agents = json.loads(index.read_text())
    except (OSError, ValueError) as e:
        print(f"autobahn: no usable report at {index}: {e}")
        sys.exit(2)
    cases: dict[str, dict] = {}
    for per_agent in agents.values():
        cases.update(per_agent)
    return cases


DETAILS = (
    "received",
    "remoteCloseReason",
    "closedByMe",
    "failedByMe",
    "droppedByMe",
    "wasClean",
    "wasNotCleanReason",
    "wasServerConnectionDropTimeout",
    "wasCloseHandshakeTimeout",
)


def detail_notes(
    dirs: tuple[str, str], entries: tuple[dict, dict], case_id: str
) -> list[str] | None:
    """The details that differ, or None without both per-case reports."""
    reports = []
    for outdir, entry in zip(dirs, entries):
        try:
            reports.append(json.loads((Path(outdir) / entry["reportfile"]).read_text()))
        except (OSError, ValueError, KeyError):
            return None
    return [
        f"  {case_id}: {key} direct {str(reports[0].get(key))[:80]}, "
        f"proxied {str(reports[1].get(key))[:80]}"
        for key in DETAILS
        if reports[0].get(key) != reports[1].get(key)
    ]


def verdict(entry: dict) -> str:
    return f"{entry['behavior']}/{entry['behaviorClose']}"


def summary(name: str, cases: dict[str, dict]) -> str:
    counts = Counter(e["behavior"] for e in cases.values())
    close_bad = sum(
        e["behaviorClose"] not in ("OK", "INFORMATIONAL") for e in cases.values()
    )
    parts = [f"{b} {counts[b]}" for b in BEHAVIORS if counts[b]]
    parts += [f"{b} {n}" for b, n in counts.items() if b not in BEHAVIORS]
    return (
        f"{name:>8}: {len(cases)} cases: {', '.join(parts)}; close not OK: {close_bad}"
    )


def report(outdir: str, entry: dict) -> dict:
    try:
        return json.loads((Path(outdir) / entry["reportfile"]).read_text())
    except (OSError, ValueError, KeyError):
        return {}


def main() -> int:
    args = sys.argv[1:]
    driver = bool(args) and args[0] == "--driver"
    if driver:
        args = args[1:]
    if len(args) not in (2, 3):
        sys.exit(__doc__)
    sys.argv = [sys.argv[0], *args]
    direct, proxied = load(sys.argv[1]), load(sys.argv[2])
    expected = int(sys.argv[3]) if len(sys.argv) == 4 else None
    rfc_closes = 0

    print(summary("direct", direct))
    print(summary("proxied", proxied))

    unusable = []
    if not direct:
        unusable.append("the direct run produced no cases")
    elif expected is not None and len(direct) != expected:
        unusable.append(f"the direct run has {len(direct)} cases, not {expected}")
    only_d = sorted(direct.keys() - proxied.keys(), key=sort_key)
    only_p = sorted(proxied.keys() - direct.keys(), key=sort_key)
    if only_d:
        unusable.append(f"cases missing from the proxied report: {' '.join(only_d)}")
    if only_p:
        unusable.append(f"cases missing from the direct report: {' '.join(only_p)}")
    for name, cases in (("direct", direct), ("proxied", proxied)):
        errors = sorted(
            (c for c, e in cases.items() if e["behavior"] == "ERROR"), key=sort_key
        )
        if errors:
            unusable.append(f"{name}: kosoku could not run {' '.join(errors)}")

    diffs, notes, no_detail = [], [], []
    for case_id in sorted(direct.keys() & proxied.keys(), key=sort_key):
        d, p = direct[case_id], proxied[case_id]
        dropped = (
            driver
            and d.get("remoteCloseCode") is None
            and report(sys.argv[1], d).get("wasClean") is False
        )
        if verdict(d) != verdict(p):
            diffs.append(f"  {case_id}: direct {verdict(d)}, proxied {verdict(p)}")
        elif dropped:
            if p.get("remoteCloseCode") in (1002, 1007):
                rfc_closes += 1
            else:
                diffs.append(
                    f"  {case_id}: the reference dropped the connection; wsproxy "
                    f"must close with 1002 or 1007 first, it sent {p.get('remoteCloseCode')}"
                )
        elif d.get("remoteCloseCode") != p.get("remoteCloseCode"):
            diffs.append(
                f"  {case_id}: both {verdict(d)} but close code direct "
                f"{d.get('remoteCloseCode')}, proxied {p.get('remoteCloseCode')}"
            )
        else:
            found = detail_notes((sys.argv[1], sys.argv[2]), (d, p), case_id)
            if found is None:
                no_detail.append(case_id)
            else:
                notes += found

    if no_detail:
        notes.append(f"  {len(no_detail)} case(s) without both per-case reports")
    if notes:
        print("note: details that differ in cases with the same verdict:")
        print("\n".join(notes[:40]))
        if len(notes) > 40:
            print(f"  ... and {len(notes) - 40} more")
    if diffs:
        print(f"{len(diffs)} case(s) differ through the proxy:")
        print("\n".join(diffs))
    for problem in unusable:
        print(f"autobahn: {problem}")
    if unusable:
        return 2
    if diffs:
        return 1
    if driver:
        print(
            f"{rfc_closes} case(s) where the reference drops the connection: "
            "wsproxy closed with 1002/1007 first, as RFC 6455 asks"
        )
    details = "" if notes else "; details (events, close, cleanness) too"
    print(
        f"all {len(direct)} cases match (verdict and close code) through the proxy{details}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
