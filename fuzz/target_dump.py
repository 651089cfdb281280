"""Fuzz target: the dirty-log dump reader and the `dirty-log` commands over it.

Input: one flag byte, then a dump file. Flag bit 0 clear: the harness rewrites every section's CRC
so that mutations reach past the checksums (a fuzzer would rarely guess a CRC32); set: the file as
given. The file is then read by read_dump and run through `dirty-log show --pages`, `diff
--per-round` and `heatmap`.

A bug is: any exception but DumpError from the reader; a traceback (anything but a click exit) from a
command; a dump accepted whose pages disagree with themselves (counts, runs, union, bitmap round trip).
libFuzzer's -rss_limit_mb and -timeout catch work that does not follow the file's size.
"""

from __future__ import annotations

import os
import zlib

from fuzz._target import fuzz, instrumented

with instrumented():
    from click.testing import CliRunner

    from vdpa_svq.cli import main
    from vdpa_svq.dump import PREAMBLE, SECTION_CRC, SECTION_HEAD, DumpError, read_dump
    from vdpa_svq.pageset import PageSet

WORK = f"/dev/shm/vdpa-svq-fuzz-dump-{os.getpid()}"
PATH = WORK + ".svqlog"
OTHER = WORK + "-b.svqlog"
PNG = WORK + ".png"
MAX_LISTED = 10_000  # runs walked in the self-checks (the CLI itself refuses more than a million)
MAX_BITMAP_PAGES = 1 << 20  # round-trip through a whole bitmap only for guests up to 4 GiB


def repair_crcs(data: bytes) -> bytes:
    """Every section's CRC recomputed, as far as the sections' own lengths frame the file."""
    out = bytearray(data)
    offset = PREAMBLE.size
    while offset + SECTION_HEAD.size <= len(out):
        _, length = SECTION_HEAD.unpack_from(out, offset)
        end = offset + SECTION_HEAD.size + length
        if end + SECTION_CRC.size > len(out):
            break
        SECTION_CRC.pack_into(out, end, zlib.crc32(bytes(out[offset:end])))
        offset = end + SECTION_CRC.size
    return bytes(out)


def check_pages(p: PageSet, count: int | None = None) -> None:
    n = len(p)
    assert count is None or n == count, f"{n} pages, the round says {count}"
    assert (p.max_page() or 0) < max(p.pages, 1), f"page {p.max_page()} beyond the guest's {p.pages}"
    if p.range_count() <= MAX_LISTED:
        runs = list(p.ranges())
        assert sum(last - first + 1 for first, last in runs) == n, "runs do not add up to the count"
        assert all(a[1] + 1 < b[0] for a, b in zip(runs, runs[1:], strict=False)), "runs overlap or touch"
    if p.pages <= MAX_BITMAP_PAGES:
        assert PageSet.from_bitmap(p.to_bitmap(), p.pages) == p, "bitmap round trip changed the set"


def run_cli(*args: str) -> None:
    result = CliRunner().invoke(main, list(args))
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    assert result.exit_code in (0, 1), f"exit {result.exit_code}: {result.output}"
    if result.exit_code == 1:  # a bad file: one line on stderr, nothing on stdout
        lines = result.stderr.splitlines()
        assert len(lines) == 1 and lines[0].startswith("vdpa-svq: "), f"not a one-line error: {result.stderr!r}"


def test_one_input(data: bytes) -> None:
    if not data:
        return
    dump = data[1:] if data[0] & 1 else repair_crcs(data[1:])
    with open(PATH, "wb") as f:
        f.write(dump)
    try:
        d = read_dump(PATH)
    except DumpError:
        d = None
    if d is not None:
        for r in d.rounds:
            check_pages(r.pages, r.count)
        union = d.union()
        check_pages(union)
        assert len(union) <= d.dirty_total
    run_cli("dirty-log", "show", "--pages", PATH)
    with open(OTHER, "wb") as f:
        f.write(dump)
    run_cli("dirty-log", "diff", "--per-round", PATH, OTHER)
    run_cli("dirty-log", "heatmap", "--bins", "64", "-o", PNG, PATH)


def cleanup() -> None:
    for p in (PATH, OTHER, PNG):
        if os.path.exists(p):
            os.unlink(p)


if __name__ == "__main__":
    import atexit

    atexit.register(cleanup)
    fuzz(test_one_input)
