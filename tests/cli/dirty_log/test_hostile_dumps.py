"""Crafted dumps (issue 12, case 8): every bad file is a one-line error with exit 1, and a small file
that claims a huge guest costs memory in proportion to what it holds, not to what it claims.

Memory is measured with tracemalloc (numpy, bytes and ints are all traced), not time: the old reader
needed 545 MB for a 312-byte file and 1 GB for a 522 KB one.
"""

from __future__ import annotations

import json
import os
import struct
import tracemalloc
import zlib

import pytest
from click.testing import CliRunner

from vdpa_svq.cli import main
from vdpa_svq.dump import MAGIC, MAX_HEADER_BYTES, PREAMBLE, ROUND, TRAILER, VERSION, DumpError, read_dump

from ..conftest import make_header, one_line_error

TiB = 1 << 40
PAGE = 4096


def section(tag: bytes, payload: bytes) -> bytes:
    head = struct.pack("<4sI", tag, len(payload))
    return head + payload + struct.pack("<I", zlib.crc32(payload, zlib.crc32(head)))


def craft(path, header: bytes | dict, rounds: list[tuple[int, bytes, int]] = (), when: float = 1.7e9) -> str:
    """A well-framed dump (valid CRCs, valid trailer) around whatever header and rounds are given:
    rounds are (bitmap bytes, zlib stream, dirty pages)."""
    head = header if isinstance(header, bytes) else json.dumps(header).encode()
    out = PREAMBLE.pack(MAGIC, VERSION, 0) + section(b"HEAD", head)
    for n, (size, stream, count) in enumerate(rounds, 1):
        out += section(b"ROND", ROUND.pack(n, when, size, count) + stream)
    out += section(b"TAIL", TRAILER.pack(len(rounds), sum(c for _, _, c in rounds)))
    path.write_bytes(out)
    return str(path)


def header_json(**overrides) -> dict:
    """A good header (one 1 MiB region) as JSON, with fields replaced: regions as {gpa, size} dicts."""
    obj = make_header([(0, 1 << 20)]).to_json()
    obj.update(overrides)
    return obj


def zeros_stream(nbytes: int, set_bytes: dict[int, int] | None = None) -> bytes:
    """zlib of an nbytes bitmap of zeros with a few bytes set, built without holding the bitmap."""
    z = zlib.compressobj(9)
    out, done, block = [], 0, bytes(64 << 20)
    marks = sorted((set_bytes or {}).items())
    for at, value in [*marks, (nbytes, None)]:
        while done < at:
            step = min(len(block), at - done)
            out.append(z.compress(block[:step]))
            done += step
        if value is not None:
            out.append(z.compress(bytes([value])))
            done += 1
    out.append(z.flush())
    return b"".join(out)


def run(*args: str):
    return CliRunner().invoke(main, ["dirty-log", *args])


# -- headers -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "header, says",
    [
        (b"[" * 100_000 + b"]" * 100_000, "the header nests 100000 deep, more than the 32 allowed"),
        (b'{"a": ' * 5000 + b"1" + b"}" * 5000, "the header nests 5000 deep"),
        (json.dumps(header_json(created=1.0)).replace("1.0", "1" * 5000, 1).encode(),
         "the header is not valid JSON: an integer of 5000 digits"),
        (json.dumps(header_json(regions=[{"gpa": 10**25, "size": 4096}])).encode(),
         "the header is not valid JSON: an integer of 26 digits"),
        (json.dumps(header_json(created=1e300)).encode(), "'created' (1e+300) is not a time between 1970 and 9999"),
        (json.dumps(header_json(created=-5)).encode(), "'created' (-5) is not a time"),
        (json.dumps(header_json(created=float("nan"))).encode(), "NaN is not a JSON number"),
        (json.dumps(header_json(created=float("inf"))).encode(), "Infinity is not a JSON number"),
        (json.dumps(header_json()).replace('"created": 1700000000.0', '"created": 1e400').encode(),
         "'created' (inf) is not a time"),
        (json.dumps(header_json(features="0x" + "f" * 40)).encode(), "'features' is not a hex string"),
        (json.dumps(header_json(regions=[{"gpa": i * PAGE, "size": PAGE} for i in range(5000)])).encode(),
         "5000 regions, more than the 4096 a dump may hold"),
        (json.dumps(header_json(regions=[{"gpa": 0, "size": 1 << 64}])).encode(),
         "does not fit 64-bit guest-physical space"),
        (json.dumps(header_json(regions=[{"gpa": 0, "size": 1 << 60}])).encode(),
         "needs a bitmap too large for a section"),
        (b" " * (MAX_HEADER_BYTES + 1), f"a header of {MAX_HEADER_BYTES + 1} bytes, more than the"),
        (b"\xff\xfe{}", "the header is not UTF-8"),
    ],
    ids=["nested-arrays", "nested-objects", "5000-digits", "26-digit-gpa", "created-1e300", "created-negative",
         "created-nan", "created-inf", "created-overflows", "long-hex", "too-many-regions", "region-past-2^64",
         "2^60-guest", "huge-header", "not-utf8"],
)
@pytest.mark.parametrize("command", ["show", "diff", "heatmap"])
def test_a_crafted_header_is_a_one_line_error(tmp_path, header, says, command):
    path = craft(tmp_path / "d.vdl", header)
    args = {"show": [path], "diff": [path, path], "heatmap": [path, "-o", str(tmp_path / "h.png")]}[command]
    line = one_line_error(run(command, *args))
    assert line.startswith(f"vdpa-svq: {path}: offset 12: ") and says in line, line


def test_a_crafted_round_time_is_a_one_line_error(tmp_path):
    stream = zlib.compress(bytes(32))
    for when, says in ((float("nan"), "time nan"), (1e300, "time 1e+300"), (-1.0, "time -1.0")):
        path = craft(tmp_path / "d.vdl", header_json(), [(32, stream, 0)], when=when)
        assert f"round 1: {says} is not a time between 1970 and 9999" in one_line_error(run("show", path))


@pytest.mark.parametrize("special", ["/dev/zero", "fifo"])
def test_a_file_that_never_ends_is_refused(tmp_path, special):
    """/dev/zero or a FIFO would be read forever (or until memory runs out)."""
    if special == "fifo":
        special = str(tmp_path / "fifo")
        os.mkfifo(special)
        os.open(special, os.O_RDWR | os.O_NONBLOCK)  # a writer that never writes, so open() returns
    assert one_line_error(run("show", special)) == f"vdpa-svq: {special}: offset 0: not a regular file"


# -- huge claims in small files ------------------------------------------------------------------


def peak_traced(fn):
    tracemalloc.start()
    try:
        result = fn()
        return result, tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_regions_at_0_and_2_to_the_44_in_a_few_hundred_bytes(tmp_path):
    """312 bytes describing 16 TiB of guest-physical space: the old reader built the whole union bitmap."""
    regions = [{"gpa": 0, "size": 1 << 30}, {"gpa": 1 << 44, "size": 1 << 30}]
    path = craft(tmp_path / "d.vdl", header_json(regions=regions))
    assert os.path.getsize(path) < 400
    result, peak = peak_traced(lambda: run("show", path, "--pages", "--json"))
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    assert out["totals"] == {"rounds": 0, "dirty_total": 0, "distinct": 0, "guest_pages": 2 * (1 << 18),
                             "page_ranges": []}
    assert peak < 16 << 20, f"{peak >> 20} MiB for a {os.path.getsize(path)}-byte file"


@pytest.fixture(scope="module")
def sixteen_tib_round():
    """One round of a 16 TiB guest: 512 MiB of bitmap, pages 0-3, 12345 and the last page dirty, as a
    ~500 KB zlib stream."""
    nbytes = (16 * TiB // PAGE) // 8
    return nbytes, zeros_stream(nbytes, {0: 0x0F, 12345 // 8: 1 << (12345 % 8), nbytes - 1: 0x80})


def test_a_16_tib_guest_in_half_a_megabyte(tmp_path, sixteen_tib_round):
    nbytes, stream = sixteen_tib_round
    last = nbytes * 8 - 1
    path = craft(tmp_path / "d.vdl", header_json(regions=[{"gpa": 0, "size": 16 * TiB}]), [(nbytes, stream, 6)] * 2)
    assert os.path.getsize(path) < 2 << 20
    result, peak = peak_traced(lambda: run("show", path, "--pages", "--json"))
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    assert out["totals"]["page_ranges"] == [[0, 3], [12345, 12345], [last, last]]
    assert [r["pages"] for r in out["rounds"]] == [6, 6]
    assert out["totals"]["dirty_total"] == 12 and out["totals"]["distinct"] == 6
    assert peak < 64 << 20, f"{peak >> 20} MiB to read {os.path.getsize(path)} bytes"

    diff, peak = peak_traced(lambda: run("diff", path, path, "--per-round", "--json"))
    assert json.loads(diff.stdout)["union"] == {"only_a": 0, "only_b": 0, "both": 6}
    assert peak < 64 << 20

    png = tmp_path / "h.png"
    heat, peak = peak_traced(lambda: run("heatmap", path, "-o", str(png), "--bins", "4096"))
    assert heat.exit_code == 0, heat.output
    assert peak < 128 << 20


def test_a_dense_pattern_is_held_once_and_too_many_runs_are_not_listed(tmp_path):
    """A 0x55 bitmap of 16 TiB compresses as well as an empty one but is 2**31 separate runs: the
    counts come out, --pages is refused with a reason."""
    nbytes = (16 * TiB // PAGE) // 8
    z = zlib.compressobj(9)
    block = b"\x55" * (64 << 20)
    stream = b"".join(z.compress(block) for _ in range(nbytes // len(block))) + z.flush()
    path = craft(tmp_path / "d.vdl", header_json(regions=[{"gpa": 0, "size": 16 * TiB}]),
                 [(nbytes, stream, nbytes * 4)])
    result, peak = peak_traced(lambda: run("show", path, "--json"))
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["totals"]["distinct"] == nbytes * 4
    assert peak < 64 << 20, "equal chunks are shared, not held 8192 times"
    line = one_line_error(run("show", path, "--pages"))
    listed = 2 * nbytes * 4  # the round's runs and the union's
    assert line == (f"vdpa-svq: {path}: {listed} runs of dirty pages, too many to list with --pages "
                    "(at most 1000000); leave out --pages for the counts")


def test_a_stream_that_inflates_past_its_size_stops_there(tmp_path):
    """A round whose stream holds 512 MiB where its section claims 1 MiB is caught after ~1 MiB."""
    claimed = 1 << 20
    stream = zeros_stream(512 << 20)
    regions = [{"gpa": 0, "size": claimed * 8 * PAGE}]
    path = craft(tmp_path / "d.vdl", header_json(regions=regions), [(claimed, stream, 0)])
    tracemalloc.start()
    try:
        with pytest.raises(DumpError) as e:
            read_dump(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert f"round 1: the compressed bitmap does not hold exactly {claimed} bytes (it holds more)" in str(e.value)
    assert peak < 16 << 20
