"""PageSet, the dump reader's sparse bitmap, against the plain reading of a vhost bitmap (pages_of)
and Python sets: bitmaps spanning several chunks, runs that cross chunk boundaries, shared chunks."""

from __future__ import annotations

import zlib

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vdpa_svq.dirty import pages_of
from vdpa_svq.pageset import CHUNK_BYTES, PageSet


@st.composite
def bitmaps(draw) -> bytes:
    """Up to three chunks and a bit: a few set bytes, a few 0xff runs (often across a chunk edge)."""
    size = draw(st.sampled_from([1, 9, CHUNK_BYTES, CHUNK_BYTES + 3, 3 * CHUNK_BYTES + 5]))
    bits = bytearray(size)
    for at, value in draw(st.lists(st.tuples(st.integers(0, size - 1), st.integers(1, 255)), max_size=20)):
        bits[at] |= value
    edges = [CHUNK_BYTES * k for k in range(1, size // CHUNK_BYTES + 1)]
    for _ in range(draw(st.integers(0, 3))):
        centre = draw(st.sampled_from(edges)) if edges and draw(st.booleans()) else draw(st.integers(0, size - 1))
        lo = max(0, centre - draw(st.integers(0, 40)))
        hi = min(size, centre + draw(st.integers(0, 40)))
        bits[lo:hi] = b"\xff" * (hi - lo)
    return bytes(bits)


def runs(pages: list[int]) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    for p in pages:
        if out and p == out[-1][1] + 1:
            out[-1] = (out[-1][0], p)
        else:
            out.append((p, p))
    return out


@settings(max_examples=80, deadline=None)
@given(bitmaps(), st.data())
def test_a_pageset_reads_a_bitmap_as_pages_of_does(bitmap, data):
    expected = pages_of(bitmap)
    ps = PageSet.from_bitmap(bitmap)
    assert PageSet.from_zlib(zlib.compress(bitmap), len(bitmap), len(bitmap) * 8) == ps
    assert list(ps) == expected and len(ps) == len(expected) and bool(ps) == bool(expected)
    assert list(ps.ranges()) == runs(expected)
    assert ps.range_count() == len(runs(expected))
    assert ps.max_page() == (expected[-1] if expected else None)
    assert ps.to_bitmap() == bitmap
    probes = data.draw(st.lists(st.integers(0, len(bitmap) * 8), min_size=1, max_size=8))
    assert ps.counts_below(probes).tolist() == [sum(p < x for p in expected) for x in probes]
    assert [ps.count_below(x) for x in probes] == [sum(p < x for p in expected) for x in probes]


@settings(max_examples=60, deadline=None)
@given(bitmaps(), bitmaps())
def test_set_operations_agree_with_python_sets(a, b):
    size = max(len(a), len(b))
    a, b = a.ljust(size, b"\0"), b.ljust(size, b"\0")
    pa, pb = PageSet.from_bitmap(a), PageSet.from_bitmap(b)
    sa, sb = set(pages_of(a)), set(pages_of(b))
    assert list(pa | pb) == sorted(sa | sb)
    assert list(pa & pb) == sorted(sa & sb)
    assert list(pa - pb) == sorted(sa - sb)


def test_equal_chunks_are_shared_and_stay_shared():
    """Sixteen chunks of one pattern are one int; so is their union with itself."""
    bitmap = b"\x55" * (16 * CHUNK_BYTES)
    intern: dict[bytes, int] = {}
    ps = PageSet.from_zlib(zlib.compress(bitmap), len(bitmap), len(bitmap) * 8, intern)
    assert len(intern) == 1 and len({id(c) for c in ps._chunks.values()}) == 1
    union = ps | PageSet.from_zlib(zlib.compress(bitmap), len(bitmap), len(bitmap) * 8, intern)
    assert len({id(c) for c in union._chunks.values()}) == 1
    assert len(union) == len(bitmap) * 4 and union.range_count() == len(bitmap) * 4


@pytest.mark.parametrize(
    "stream, size, says",
    [
        (zlib.compress(bytes(100)), 99, "does not hold exactly 99 bytes (it holds more)"),
        (zlib.compress(bytes(100)), 101, "does not hold exactly 101 bytes"),
        (zlib.compress(bytes(100))[:-3], 100, "does not hold exactly 100 bytes"),
        (zlib.compress(bytes(100)) + b"junk", 100, "does not hold exactly 100 bytes"),
        (b"not zlib at all", 100, "the bitmap does not decompress"),
    ],
    ids=["longer", "shorter", "truncated", "trailing-bytes", "garbage"],
)
def test_a_stream_of_the_wrong_size_is_refused(stream, size, says):
    with pytest.raises(ValueError) as e:
        PageSet.from_zlib(stream, size, size * 8)
    assert says in str(e.value)


def test_counts_below_any_order():
    ps = PageSet.from_bitmap(bytes([0b1011]) + bytes(CHUNK_BYTES) + b"\x01")
    probes = np.array([CHUNK_BYTES * 8 + 9, 0, 4, 2, CHUNK_BYTES * 8 + 8])
    assert ps.counts_below(probes).tolist() == [4, 0, 3, 2, 3]
