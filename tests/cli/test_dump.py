"""The dirty-log dump (docs/dirty-log-format.md): round trip, atomic writes, and that no damaged file
reads as good."""

from __future__ import annotations

import json
import os
import struct
import zlib

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vdpa_svq.dirty import DirtyBitmap, pages_of
from vdpa_svq.dump import (
    MAGIC,
    PAGE_SIZE,
    PREAMBLE,
    DumpError,
    DumpHeader,
    DumpWriter,
    read_dump,
    write_dump,
)

from .conftest import make_header, sample_dump


@st.composite
def headers(draw) -> DumpHeader:
    """1-3 page-aligned regions with holes between them, up to 300 pages of guest-physical space."""
    regions, gpa = [], 0
    for _ in range(draw(st.integers(1, 3))):
        gpa += draw(st.integers(0, 40)) * PAGE_SIZE
        size = draw(st.integers(1, 60)) * PAGE_SIZE
        regions.append((gpa, size))
        gpa += size
    return make_header(
        regions,
        features=draw(st.integers(0, 2**64 - 1)),
        backend_features=draw(st.integers(0, 2**64 - 1)),
        created=draw(st.floats(0, 2e9)),
    )


@st.composite
def dumps(draw) -> tuple[DumpHeader, list[tuple[bytes, float]]]:
    header = draw(headers())
    pages = st.lists(st.integers(0, header.pages - 1), max_size=40)
    rounds = []
    for _ in range(draw(st.integers(0, 6))):
        bm = DirtyBitmap(header.memory_end)
        for p in draw(pages):
            bm.mark(p * PAGE_SIZE, 1)
        rounds.append((bm.harvest(), draw(st.floats(0, 2e9))))
    return header, rounds


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(dumps())
def test_a_dump_reads_back_as_written(tmp_path, case):
    """Header, every round's bitmap, time and page list, and the union survive the round trip."""
    header, rounds = case
    path = tmp_path / "d.vdl"
    write_dump(path, header, rounds)
    dump = read_dump(path)
    assert dump.header == header
    assert [r.number for r in dump.rounds] == list(range(1, len(rounds) + 1))
    assert [(r.bitmap, r.when) for r in dump.rounds] == rounds
    assert [list(r.pages) for r in dump.rounds] == [pages_of(b) for b, _ in rounds]
    assert list(dump.union()) == sorted({p for b, _ in rounds for p in pages_of(b)})
    assert dump.dirty_total == sum(len(pages_of(b)) for b, _ in rounds)
    assert os.listdir(tmp_path) == ["d.vdl"], "the temporary file must be gone"


def test_every_truncation_is_a_dump_error(tmp_path):
    """A prefix of a dump never reads as good: the trailer is the writer's last word."""
    data = sample_dump(tmp_path / "good.vdl").read_bytes()
    cut = tmp_path / "cut.vdl"
    for length in range(len(data)):
        cut.write_bytes(data[:length])
        with pytest.raises(DumpError) as e:
            read_dump(cut)
        assert str(cut) in str(e.value) and "truncated" in str(e.value), (length, str(e.value))


def test_every_corrupted_byte_is_a_dump_error(tmp_path):
    """One damaged byte anywhere (preamble checked field by field, sections by CRC32) is caught."""
    data = sample_dump(tmp_path / "good.vdl").read_bytes()
    bad = tmp_path / "bad.vdl"
    for offset in range(len(data)):
        for flip in (0x01, 0xFF):
            damaged = bytearray(data)
            damaged[offset] ^= flip
            bad.write_bytes(damaged)
            with pytest.raises(DumpError, match=f"^{bad}: offset \\d+: "):
                read_dump(bad)


def test_crc_mismatch_names_the_section_and_offset(tmp_path):
    path = sample_dump(tmp_path / "d.vdl")
    data = bytearray(path.read_bytes())
    head_len = struct.unpack_from("<I", data, PREAMBLE.size + 4)[0]
    first_round = PREAMBLE.size + 8 + head_len + 4
    data[first_round + 8 + 2] ^= 0x10  # inside the first ROND payload (its time field)
    path.write_bytes(data)
    with pytest.raises(DumpError, match=f"offset {first_round}: CRC32 mismatch in the ROND section"):
        read_dump(path)


def test_trailing_bytes_after_the_trailer_are_rejected(tmp_path):
    path = sample_dump(tmp_path / "d.vdl")
    path.write_bytes(path.read_bytes() + b"\0")
    with pytest.raises(DumpError, match="1 bytes after the trailer"):
        read_dump(path)


def test_not_a_dump(tmp_path):
    path = tmp_path / "notes.txt"
    path.write_text("hello, this is not a dump\n")
    with pytest.raises(DumpError, match="offset 0: not a vdpa-svq dirty-log dump"):
        read_dump(path)


def test_a_newer_version_is_refused_by_name(tmp_path):
    path = sample_dump(tmp_path / "d.vdl")
    data = bytearray(path.read_bytes())
    struct.pack_into("<H", data, len(MAGIC), 2)
    path.write_bytes(data)
    with pytest.raises(DumpError, match="format version 2, this vdpa-svq reads version 1"):
        read_dump(path)


def _with_section(path, tag: bytes, payload: bytes, index: int) -> None:
    """Rewrite `path` with section number `index` replaced by a well-framed (valid CRC) one."""
    data = path.read_bytes()
    out, offset, i = bytearray(data[: PREAMBLE.size]), PREAMBLE.size, 0
    while offset < len(data):
        length = struct.unpack_from("<I", data, offset + 4)[0]
        end = offset + 8 + length + 4
        if i == index:
            head = struct.pack("<4sI", tag, len(payload))
            out += head + payload + struct.pack("<I", zlib.crc32(payload, zlib.crc32(head)))
        else:
            out += data[offset:end]
        offset, i = end, i + 1
    path.write_bytes(out)


def test_a_well_framed_but_wrong_round_is_still_caught(tmp_path):
    """Checks beyond the CRC: round numbering, bitmap size and the dirty-page count."""
    path = sample_dump(tmp_path / "d.vdl")
    header = read_dump(path).header
    bitmap = bytes([0x0F]) + bytes(header.bitmap_bytes - 1)
    cases = {
        "round 5 where round 1 should be": struct.pack("<IdII", 5, 0.0, len(bitmap), 4) + zlib.compress(bitmap),
        f"bitmap of 3 bytes, the guest memory layout needs {header.bitmap_bytes}": (
            struct.pack("<IdII", 1, 0.0, 3, 0) + zlib.compress(bytes(3))
        ),
        "4 pages set, the section says 9": struct.pack("<IdII", 1, 0.0, len(bitmap), 9) + zlib.compress(bitmap),
        "the bitmap does not decompress": struct.pack("<IdII", 1, 0.0, len(bitmap), 4) + b"garbage",
        "does not hold exactly": struct.pack("<IdII", 1, 0.0, len(bitmap), 4) + zlib.compress(bitmap + b"\0"),
    }
    for message, payload in cases.items():
        sample_dump(path)
        _with_section(path, b"ROND", payload, 1)
        with pytest.raises(DumpError) as e:
            read_dump(path)
        assert message in str(e.value)


def test_a_bad_header_is_named(tmp_path):
    path = sample_dump(tmp_path / "d.vdl")
    _with_section(path, b"HEAD", json.dumps({"page_size": 4096}).encode(), 0)
    with pytest.raises(DumpError, match="bad header: lacks backend_features, created, device"):
        read_dump(path)
    sample_dump(path)
    _with_section(path, b"HEAD", b"{not json", 0)
    with pytest.raises(DumpError, match="the header is not valid JSON"):
        read_dump(path)


def test_an_exception_in_the_writer_leaves_no_file(tmp_path):
    path = tmp_path / "d.vdl"
    header = make_header([(0, 16 * PAGE_SIZE)])
    with pytest.raises(RuntimeError), DumpWriter(path, header) as w:
        w.add_round(b"\x01\x00", 1.0)
        raise RuntimeError("relay died")
    assert os.listdir(tmp_path) == []


def test_a_crashed_writer_never_leaves_a_dump_under_the_target_name(tmp_path):
    """Until close() the target keeps its old content; the data lives in a .partial file."""
    path = sample_dump(tmp_path / "d.vdl")
    before = path.read_bytes()
    w = DumpWriter(path, make_header([(0, 16 * PAGE_SIZE)]))
    w.add_round(b"\xff\x00", 1.0)
    # "crash": the process dies here; nothing renames the partial file
    assert path.read_bytes() == before
    partial = [n for n in os.listdir(tmp_path) if n.endswith(".partial")]
    assert len(partial) == 1 and partial[0].startswith(".d.vdl.")
    with pytest.raises(DumpError, match="truncated"):
        read_dump(tmp_path / partial[0])
    w.abort()
    assert os.listdir(tmp_path) == ["d.vdl"]


def test_writer_rejects_a_bitmap_of_the_wrong_size_or_past_the_end(tmp_path):
    header = make_header([(0, 12 * PAGE_SIZE)])  # 12 pages: 2 bytes, bits 12-15 spare
    with DumpWriter(tmp_path / "d.vdl", header) as w:
        with pytest.raises(ValueError, match="has 3 bytes"):
            w.add_round(bytes(3), 0.0)
        with pytest.raises(ValueError, match="past the end of guest memory"):
            w.add_round(b"\x00\x10", 0.0)
        w.add_round(b"\x00\x08", 0.0)
    assert tuple(read_dump(tmp_path / "d.vdl").rounds[0].pages) == (11,)


@pytest.mark.parametrize(
    ("regions", "why"),
    [
        ([], "no guest memory regions"),
        ([(0, 100)], "not page-aligned"),
        ([(0, 2 * PAGE_SIZE), (PAGE_SIZE, PAGE_SIZE)], "overlaps"),
    ],
)
def test_header_rejects_impossible_layouts(regions, why):
    with pytest.raises(ValueError, match=why):
        make_header(regions)
