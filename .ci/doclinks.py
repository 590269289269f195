#!/usr/bin/env python3
"""Checks the relative links of README.md and the manual (docs/src/*.md).

    python3 .ci/doclinks.py [FILE.md ...]

Every Markdown link or image whose target is not a URL (no scheme, not
mailto:) must name a file or directory of the repository, relative to the
page; a `#anchor` (on another Markdown page, or `#anchor` alone on the same
page) must be one of that page's headings, as GitHub makes them: lower
case, spaces to `-`, punctuation dropped (`-` and `_` kept), `-1`, `-2` ...
for repeated headings. Code (fenced blocks and `inline spans`) is skipped.
Python 3 standard library only. Exits 1 naming each broken link.
"""

import os
import re
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

FENCE = re.compile(r"^\s*(```|~~~)")
HEADING = re.compile(r"^(#{1,6})\s+(.*?)\s*#*\s*$")
# [text](target) or ![alt](target), the target up to a space or ")".
LINK = re.compile(r"!?\[(?:[^\]\[]|\[[^\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
INLINE_CODE = re.compile(r"(`+)(?:(?!\1).)+?\1")
SCHEME = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*:")


def prose_lines(text):
    """(line number, line) outside fenced code blocks."""
    fenced = False
    for number, line in enumerate(text.split("\n"), 1):
        if FENCE.match(line):
            fenced = not fenced
            continue
        if not fenced:
            yield number, line


def slug(heading):
    """GitHub's anchor for a heading's text."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link: its text
    text = text.lower()
    text = "".join(c for c in text if c.isalnum() or c in " -_")
    return text.replace(" ", "-")


def anchors(path, cache={}):
    if path not in cache:
        seen = {}
        found = set()
        with open(path, encoding="utf-8") as f:
            for _, line in prose_lines(f.read()):
                m = HEADING.match(line)
                if not m:
                    continue
                base = slug(m.group(2))
                n = seen.get(base, 0)
                seen[base] = n + 1
                found.add(base if n == 0 else f"{base}-{n}")
        cache[path] = found
    return cache[path]


def check(page):
    errors = []
    with open(page, encoding="utf-8") as f:
        text = f.read()
    for number, line in prose_lines(text):
        for target in LINK.findall(INLINE_CODE.sub("", line)):
            if SCHEME.match(target) or target.startswith("//"):
                continue
            where = f"{os.path.relpath(page, ROOT)}:{number}: {target}"
            path, _, anchor = target.partition("#")
            resolved = os.path.normpath(os.path.join(os.path.dirname(page), path)) if path else page
            if not os.path.exists(resolved):
                errors.append(f"{where}: no such file {os.path.relpath(resolved, ROOT)}")
                continue
            if os.path.relpath(resolved, ROOT).split(os.sep)[0] == "..":
                errors.append(f"{where}: points outside the repository")
                continue
            if anchor and resolved.endswith(".md"):
                if anchor not in anchors(resolved):
                    errors.append(f"{where}: no heading #{anchor} in {os.path.relpath(resolved, ROOT)}")
    return errors


def main(argv):
    if argv:
        pages = [os.path.abspath(p) for p in argv]
    else:
        docs = os.path.join(ROOT, "docs", "src")
        pages = [os.path.join(ROOT, "README.md")] + sorted(
            os.path.join(docs, n) for n in os.listdir(docs) if n.endswith(".md")
        )
    errors = [e for page in pages for e in check(page)]
    for e in errors:
        print(f"doclinks: {e}", file=sys.stderr)
    if errors:
        print(f"doclinks: {len(errors)} broken link(s)", file=sys.stderr)
        return 1
    print(f"doclinks: every relative link and anchor of {len(pages)} pages resolves")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
