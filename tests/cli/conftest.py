"""Shared helpers for the CLI tests: dumps with known content."""

from __future__ import annotations

from pathlib import Path

from vdpa_svq.dump import PAGE_SIZE, DumpHeader, write_dump

NET_FEATURES = 1 << 32 | 1 << 33 | 1 << 5 | 1 << 16  # VERSION_1, ACCESS_PLATFORM, NET_F_MAC, NET_F_STATUS


def make_header(regions, **kw) -> DumpHeader:
    kw.setdefault("device_path", "/dev/vhost-vdpa-0")
    kw.setdefault("device_id", 1)
    kw.setdefault("features", NET_FEATURES)
    kw.setdefault("backend_features", 0x6)
    kw.setdefault("created", 1_700_000_000.0)
    return DumpHeader(regions=tuple(regions), **kw)


def bitmap_of(header: DumpHeader, pages) -> bytes:
    bits = bytearray(header.bitmap_bytes)
    for p in pages:
        bits[p // 8] |= 1 << (p % 8)
    return bytes(bits)


# Two regions with a hole: pages 0-63 and 128-191.
SAMPLE_REGIONS = [(0, 64 * PAGE_SIZE), (128 * PAGE_SIZE, 64 * PAGE_SIZE)]
SAMPLE_ROUNDS = [[0, 1, 2, 3, 130], [2, 3, 4, 191], []]


def sample_dump(path: Path, rounds=SAMPLE_ROUNDS, regions=SAMPLE_REGIONS, **kw) -> Path:
    header = make_header(regions, **kw)
    write_dump(path, header, [(bitmap_of(header, r), 1_700_000_000.0 + i) for i, r in enumerate(rounds, 1)])
    return path


def one_line_error(result) -> str:
    """The stderr of a failed command, checked to be one `vdpa-svq: ...` line and no traceback."""
    assert result.exit_code != 0, result.output
    assert isinstance(result.exception, SystemExit), f"not mapped: {result.exception!r}"
    assert "Traceback" not in result.output
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("vdpa-svq: "), result.stderr
    return lines[0]
