"""BENCHMARKS.md is shared by every bench: each owns one section between markers and rewrites only that."""

from __future__ import annotations

import os
from pathlib import Path

TITLE = (
    "# Benchmarks\n\n"
    "Each section is written by one bench (`make bench` runs them all); the machine and its load are noted in each.\n"
)


def write_section(path: str, name: str, text: str) -> None:
    """Put `text` in `path` between markers for `name`: replaced where it is, else appended.
    Nothing outside the markers changes, so one bench never erases another's figures."""
    begin, end = f"<!-- bench:{name} -->", f"<!-- /bench:{name} -->"
    block = f"{begin}\n{text.rstrip()}\n{end}\n"
    old = Path(path).read_text() if os.path.exists(path) else TITLE
    if begin in old and end in old:
        head, rest = old.split(begin, 1)
        tail = rest.split(end, 1)[1].lstrip("\n")
        new = head + block + ("\n" + tail if tail else "")
    else:
        new = old.rstrip("\n") + "\n\n" + block
    Path(path).write_text(new)
