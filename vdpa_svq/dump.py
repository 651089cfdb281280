"""The dirty-log dump: every sync round of a migration's dirty log, in one self-checking file.

Specified in docs/dirty-log-format.md; the short form (integers little-endian):

    preamble  magic b"\\x89SVQ\\r\\n\\x1a\\n", le16 version (1), le16 reserved (0)          12 bytes
    section   tag[4] | le32 length | payload[length] | le32 CRC32(tag | length | payload)
    HEAD      first, once: the header as UTF-8 JSON (page size, guest memory regions, device,
              features, backend features, creation time, tool version)
    ROND      one per sync round: le32 round (1, 2, ...), f64 time, le32 bitmap bytes,
              le32 dirty pages, then the zlib stream of the vhost-format bitmap of the pages
              dirtied since the previous round
    TAIL      last, once: le32 rounds, le64 sum of the rounds' dirty pages; end of file

The bitmap is the vhost dirty log (VHOST_F_LOG_ALL): page p of guest-physical space is bit p % 8
of byte p // 8, one page being 4 KiB, covering [0, end of the highest region).

DumpWriter writes to a temporary file in the target's directory and renames it into place only
after the trailer is written and fsynced: at the target path there is either nothing, the previous
file, or a complete dump. read_dump checks everything it reads and raises DumpError naming the
file, the offset and what is wrong; it trusts nothing in the file. The header is bounded in size
and nesting before it is parsed, and every field is type- and range-checked; the bitmaps are
inflated a chunk at a time into PageSets, so a small file that claims terabytes of guest memory
costs the time to inflate it (about 2 s per 1 GiB of bitmap, i.e. per 32 TiB of guest claimed),
never the memory.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import stat
import struct
import tempfile
import time
import zlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from vdpa_svq import __version__
from vdpa_svq.errors import VdpaSvqError

if TYPE_CHECKING:  # imported where a dump is read: numpy stays out of serve's and attach's threads
    from vdpa_svq.pageset import PageSet

# 0x89 (high bit: caught by 7-bit channels), "\r\n" and "\n" (caught by newline translation), 0x1a
# (stops `type` on DOS): the PNG trick, so a dump mangled as text never reads as good.
MAGIC = b"\x89SVQ\r\n\x1a\n"
VERSION = 1
PAGE_SIZE = 4096  # the vhost log's page (VHOST_PAGE_SIZE); version 1 knows no other

PREAMBLE = struct.Struct("<8sHH")  # magic, version, reserved
SECTION_HEAD = struct.Struct("<4sI")  # tag, payload length
SECTION_CRC = struct.Struct("<I")  # CRC32 over tag, length and payload
ROUND = struct.Struct("<IdII")  # round number, time, bitmap bytes (uncompressed), dirty pages
TRAILER = struct.Struct("<IQ")  # rounds written, dirty pages summed over the rounds

TAG_HEAD = b"HEAD"
TAG_ROUND = b"ROND"
TAG_TAIL = b"TAIL"
TAGS = (TAG_HEAD, TAG_ROUND, TAG_TAIL)

# A section of this much or more would not fit the le32 length (a bitmap compresses far below it).
MAX_SECTION = 1 << 32
# Bounds on what a header may hold, checked before it is parsed: real headers are a few hundred
# bytes, nest three deep and list the handful of regions a VMM maps.
MAX_HEADER_BYTES = 1 << 20
MAX_HEADER_DEPTH = 32
MAX_REGIONS = 4096
MAX_INT_DIGITS = 20  # a u64 is at most 20 decimal digits
MAX_HEX_DIGITS = 16
# Times (creation, rounds) are seconds since the epoch that datetime can show: up to year 9999.
MAX_TIME = 253402300799.0


class DumpError(VdpaSvqError):
    """A dump that is not a complete, intact dirty-log dump: names the file, the offset, what is wrong."""

    def __init__(self, path: str | os.PathLike, offset: int, what: str) -> None:
        super().__init__(f"{os.fspath(path)}: offset {offset}: {what}")
        self.path = os.fspath(path)
        self.offset = offset
        self.what = what


@dataclass(frozen=True)
class DumpHeader:
    """What a dump is about: guest memory layout and the device whose writes were logged.

    `regions` are (gpa, size) pairs, page-aligned, non-overlapping; `extra` carries further JSON
    fields (kept on reading, so newer writers can add fields without a new version).
    """

    regions: tuple[tuple[int, int], ...]
    device_path: str
    device_id: int
    features: int
    backend_features: int
    created: float = field(default_factory=time.time)
    tool_version: str = __version__
    page_size: int = PAGE_SIZE
    extra: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        object.__setattr__(self, "regions", tuple((int(g), int(s)) for g, s in self.regions))
        problem = self.problem()
        if problem:
            raise ValueError(f"bad dump header: {problem}")

    def problem(self) -> str | None:
        """Why this header cannot describe a dump, or None."""
        if self.page_size != PAGE_SIZE:
            return f"page size {self.page_size}, version {VERSION} knows only {PAGE_SIZE}"
        if not self.regions:
            return "no guest memory regions"
        if len(self.regions) > MAX_REGIONS:
            return f"{len(self.regions)} regions, more than the {MAX_REGIONS} a dump may hold"
        end = 0
        for gpa, size in sorted(self.regions):
            if not (0 <= gpa < 1 << 64 and 0 <= size < 1 << 64):
                return f"region ({gpa:#x}, {size:#x}) does not fit 64-bit guest-physical space"
            if size <= 0 or gpa < 0:
                return f"region ({gpa:#x}, {size:#x}) is empty or negative"
            if gpa % self.page_size or size % self.page_size:
                return f"region ({gpa:#x}, {size:#x}) is not page-aligned"
            if gpa < end:
                return f"region ({gpa:#x}, {size:#x}) overlaps the one before it"
            end = gpa + size
        clash = sorted(set(self.extra) & set(self.to_json_fields))
        if clash:
            return f"extra fields {', '.join(clash)} shadow the header's own"
        for name in ("device_id", "features", "backend_features"):
            value = getattr(self, name)
            if not isinstance(value, int) or not 0 <= value < 1 << 64:
                return f"{name} {value!r} is not a u64"
        if not _is_time(self.created):
            return f"creation time {self.created!r} is not a time between 1970 and 9999"
        if self.bitmap_bytes >= MAX_SECTION - ROUND.size:
            return f"guest memory of {self.memory_end:#x} bytes needs a bitmap too large for a section"
        return None

    to_json_fields = ("page_size", "regions", "device", "features", "backend_features", "created", "tool_version")

    @property
    def memory_end(self) -> int:
        """One past the highest guest-physical address of any region."""
        return max(gpa + size for gpa, size in self.regions)

    @property
    def memory_size(self) -> int:
        return sum(size for _, size in self.regions)

    @property
    def pages(self) -> int:
        """Pages the bitmap covers: [0, memory_end), holes between regions included."""
        return -(-self.memory_end // self.page_size)

    @property
    def bitmap_bytes(self) -> int:
        return -(-self.pages // 8)

    def page_spans(self) -> list[tuple[int, int]]:
        """The regions as page numbers [first, end), in address order."""
        return [(gpa // self.page_size, (gpa + size) // self.page_size) for gpa, size in sorted(self.regions)]

    def to_json(self) -> dict[str, Any]:
        # Feature words as hex strings: bit 63 is in use, and JSON readers other than Python lose
        # integer precision above 2**53.
        return {
            **self.extra,
            "page_size": self.page_size,
            "regions": [{"gpa": gpa, "size": size} for gpa, size in self.regions],
            "device": {"path": self.device_path, "id": self.device_id},
            "features": f"{self.features:#018x}",
            "backend_features": f"{self.backend_features:#018x}",
            "created": self.created,
            "tool_version": self.tool_version,
        }

    @classmethod
    def from_json(cls, obj: Any) -> DumpHeader:
        """Raises ValueError (with the field's name) for a header that does not parse."""
        if not isinstance(obj, dict):
            raise ValueError("is not a JSON object")
        known = set(cls.to_json_fields)
        missing = sorted(known - obj.keys())
        if missing:
            raise ValueError(f"lacks {', '.join(missing)}")
        regions = obj["regions"]
        if not isinstance(regions, list) or not all(
            isinstance(r, dict) and _is_int(r.get("gpa")) and _is_int(r.get("size")) for r in regions
        ):
            raise ValueError("'regions' is not a list of {gpa, size} integers")
        device = obj["device"]
        if not isinstance(device, dict) or not isinstance(device.get("path"), str) or not _is_int(device.get("id")):
            raise ValueError("'device' is not {path: string, id: integer}")
        if not _is_int(obj["page_size"]):
            raise ValueError("'page_size' is not an integer")
        if not isinstance(obj["created"], int | float) or isinstance(obj["created"], bool):
            raise ValueError("'created' is not a number")
        if not _is_time(obj["created"]):
            raise ValueError(f"'created' ({obj['created']!r}) is not a time between 1970 and 9999")
        if len(regions) > MAX_REGIONS:
            raise ValueError(f"{len(regions)} regions, more than the {MAX_REGIONS} a dump may hold")
        if not isinstance(obj["tool_version"], str):
            raise ValueError("'tool_version' is not a string")
        return cls(
            regions=tuple((r["gpa"], r["size"]) for r in regions),
            device_path=device["path"],
            device_id=device["id"],
            features=_hex_field(obj, "features"),
            backend_features=_hex_field(obj, "backend_features"),
            created=float(obj["created"]),
            tool_version=obj["tool_version"],
            page_size=obj["page_size"],
            extra={k: v for k, v in obj.items() if k not in known},
        )


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_time(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and 0 <= value <= MAX_TIME


def _hex_field(obj: dict[str, Any], name: str) -> int:
    value = obj[name]
    if isinstance(value, str) and value.startswith("0x") and len(value) <= 2 + MAX_HEX_DIGITS:
        try:
            return int(value, 16)
        except ValueError:
            pass
    raise ValueError(f"{name!r} is not a hex string like \"0x0000000100000000\"")


@dataclass(frozen=True)
class Round:
    """One sync round: the pages dirtied since the previous round (since logging began, for round 1)."""

    number: int
    when: float
    pages: PageSet = field(repr=False)
    count: int  # len(pages), which the reader has checked against the section's count

    @property
    def bitmap(self) -> bytes:
        """The round's whole vhost-format bitmap: memory for all of guest memory, so small guests only."""
        return self.pages.to_bitmap()


@dataclass(frozen=True)
class Dump:
    path: str
    header: DumpHeader
    rounds: tuple[Round, ...]

    @property
    def dirty_total(self) -> int:
        """Dirty pages summed over the rounds (what pre-copy would resend)."""
        return sum(r.count for r in self.rounds)

    def union(self) -> PageSet:
        """Every page dirtied in any round."""
        from vdpa_svq.pageset import PageSet

        acc = PageSet(self.header.pages)
        for r in self.rounds:
            acc |= r.pages
        return acc


def _popcount(bitmap: bytes) -> int:
    return int.from_bytes(bitmap, "little").bit_count()


def _spare_bits_set(bitmap: bytes, pages: int) -> bool:
    """Whether a bit past the last page is set (the last byte's high bits)."""
    return bool(bitmap) and pages % 8 != 0 and bool(bitmap[-1] >> (pages % 8))


def _section(tag: bytes, payload: bytes) -> bytes:
    head = SECTION_HEAD.pack(tag, len(payload))
    return head + payload + SECTION_CRC.pack(zlib.crc32(payload, zlib.crc32(head)))


# --------------------------------------------------------------------------------------------------
# Writer
# --------------------------------------------------------------------------------------------------


class DumpWriter:
    """Write a dump round by round; the file appears at `path` only when closed without an error.

        with DumpWriter(path, header) as w:
            for ...:
                w.add_round(bitmap.harvest(), time.time())

    An exception inside the block (or abort()) discards the temporary file; a crash leaves only a
    ".<name>.*.partial" file beside the target, never a half dump under the target's name.
    """

    def __init__(self, path: str | os.PathLike, header: DumpHeader) -> None:
        self.path = os.fspath(path)
        self.header = header
        self.rounds = 0
        self.dirty_total = 0
        directory, name = os.path.split(os.path.abspath(self.path))
        # Same directory: os.replace is atomic only within a filesystem.
        fd, self.tmp_path = tempfile.mkstemp(dir=directory, prefix=f".{name}.", suffix=".partial")
        self._file = os.fdopen(fd, "wb")
        try:
            head = json.dumps(header.to_json(), sort_keys=True).encode()
            self._file.write(PREAMBLE.pack(MAGIC, VERSION, 0) + _section(TAG_HEAD, head))
        except BaseException:
            self.abort()
            raise

    @property
    def closed(self) -> bool:
        return self._file.closed

    def add_round(self, bitmap: bytes | bytearray | memoryview, when: float) -> int:
        """Append one sync round's bitmap (pages dirtied since the previous round); returns its number."""
        if self.closed:
            raise ValueError(f"{self.path}: dump writer is closed")
        bitmap = bytes(bitmap)
        if len(bitmap) != self.header.bitmap_bytes:
            raise ValueError(
                f"{self.path}: round bitmap has {len(bitmap)} bytes, the guest memory layout needs "
                f"{self.header.bitmap_bytes} ({self.header.pages} pages)"
            )
        if _spare_bits_set(bitmap, self.header.pages):
            raise ValueError(f"{self.path}: round bitmap marks pages past the end of guest memory")
        count = _popcount(bitmap)
        number = self.rounds + 1
        payload = ROUND.pack(number, float(when), len(bitmap), count) + zlib.compress(bitmap)
        self._file.write(_section(TAG_ROUND, payload))
        # Flushed per round so a long-running writer's progress is in the page cache, not our buffer.
        self._file.flush()
        self.rounds = number
        self.dirty_total += count
        return number

    def close(self) -> None:
        """Write the trailer, fsync, and rename the dump into place (then fsync the directory)."""
        if self.closed:
            return
        try:
            self._file.write(_section(TAG_TAIL, TRAILER.pack(self.rounds, self.dirty_total)))
            self._file.flush()
            os.fsync(self._file.fileno())
            self._file.close()
            # The data is durable before the name points at it: a crash between the two leaves
            # the old file (or none) at the target, never a dump whose blocks were not written.
            os.replace(self.tmp_path, self.path)
        except BaseException:
            self.abort()
            raise
        _fsync_dir(os.path.dirname(os.path.abspath(self.path)))

    def abort(self) -> None:
        """Discard everything written; the target path is left as it was."""
        if not self._file.closed:
            self._file.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.tmp_path)

    def __enter__(self) -> DumpWriter:
        return self

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


def _fsync_dir(directory: str) -> None:
    # Makes the rename itself durable. Some filesystems refuse fsync on a directory: the rename
    # has happened either way, so that is not worth failing the dump for.
    try:
        fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_dump(path: str | os.PathLike, header: DumpHeader, rounds: Sequence[tuple[bytes, float]]) -> None:
    """Write a whole dump at once: `rounds` are (bitmap, time) pairs."""
    with DumpWriter(path, header) as w:
        for bitmap, when in rounds:
            w.add_round(bitmap, when)


# --------------------------------------------------------------------------------------------------
# Reader
# --------------------------------------------------------------------------------------------------


Progress = Callable[[int, int], None]  # (bytes of the file read so far, its size)


def read_dump(path: str | os.PathLike, progress: Progress | None = None) -> Dump:
    """Read and check a whole dump. OSError for a file that cannot be read, DumpError for one that is
    not a complete, intact dump. `progress` is called after each section."""
    path = os.fspath(path)
    with open(path, "rb") as f:
        if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
            # A FIFO or a device (/dev/zero) would be read forever.
            raise DumpError(path, 0, "not a regular file")
        data = f.read()
    return _Reader(path, data, progress).read()


class _Reader:
    def __init__(self, path: str, data: bytes, progress: Progress | None = None) -> None:
        self.path = path
        self.data = data
        self.progress = progress
        self.chunks: dict[bytes, int] = {}  # equal bitmap chunks of all rounds share one int

    def fail(self, offset: int, what: str) -> DumpError:
        return DumpError(self.path, offset, what)

    def read(self) -> Dump:
        offset = self._preamble()
        header: DumpHeader | None = None
        rounds: list[Round] = []
        while True:
            if offset == len(self.data):
                where = f"after round {len(rounds)}" if header else "before the header"
                raise self.fail(offset, f"truncated: the file ends {where} without a trailer (incomplete copy?)")
            start = offset
            tag, payload, offset = self._section(offset)
            if self.progress:
                self.progress(offset, len(self.data))
            if header is None and tag != TAG_HEAD:
                raise self.fail(start, f"expected the HEAD section first, found {tag.decode()}")
            if tag == TAG_HEAD:
                if header is not None:
                    raise self.fail(start, "a second HEAD section (corrupt)")
                header = self._header(start, payload)
            elif tag == TAG_ROUND:
                rounds.append(self._round(start, payload, header, len(rounds) + 1))
            else:
                self._trailer(start, payload, rounds)
                if offset != len(self.data):
                    raise self.fail(offset, f"{len(self.data) - offset} bytes after the trailer (corrupt)")
                return Dump(self.path, header, tuple(rounds))

    def _preamble(self) -> int:
        data = self.data
        if not data:
            raise self.fail(0, "truncated: empty file")
        if not MAGIC.startswith(data[: len(MAGIC)]):
            raise self.fail(0, f"not a vdpa-svq dirty-log dump (magic {data[:len(MAGIC)]!r}, expected {MAGIC!r})")
        if len(data) < PREAMBLE.size:
            raise self.fail(len(data), f"truncated: the file ends inside the {PREAMBLE.size}-byte preamble")
        _, version, reserved = PREAMBLE.unpack_from(data)
        if version != VERSION:
            raise self.fail(len(MAGIC), f"format version {version}, this vdpa-svq reads version {VERSION}")
        if reserved:
            raise self.fail(len(MAGIC) + 2, f"reserved preamble field is {reserved:#x}, not 0 (corrupt)")
        return PREAMBLE.size

    def _section(self, offset: int) -> tuple[bytes, bytes, int]:
        data = self.data
        framing = SECTION_HEAD.size + SECTION_CRC.size
        if len(data) - offset < framing:
            raise self.fail(
                offset, f"truncated: a section needs at least {framing} bytes, {len(data) - offset} remain"
            )
        tag, length = SECTION_HEAD.unpack_from(data, offset)
        if tag not in TAGS:
            raise self.fail(offset, f"unknown section tag {tag!r} (corrupt)")
        name = tag.decode()
        end = offset + SECTION_HEAD.size + length
        if end + SECTION_CRC.size > len(data):
            raise self.fail(
                offset,
                f"truncated: the {name} section claims {length} bytes, only "
                f"{len(data) - offset - framing} remain",
            )
        (stored,) = SECTION_CRC.unpack_from(data, end)
        computed = zlib.crc32(data[offset:end])
        if stored != computed:
            raise self.fail(
                offset, f"CRC32 mismatch in the {name} section: stored {stored:#010x}, computed {computed:#010x} "
                "(corrupt)"
            )
        return tag, data[offset + SECTION_HEAD.size : end], end + SECTION_CRC.size

    def _header(self, offset: int, payload: bytes) -> DumpHeader:
        if len(payload) > MAX_HEADER_BYTES:
            raise self.fail(offset, f"a header of {len(payload)} bytes, more than the {MAX_HEADER_BYTES} allowed")
        depth = _json_depth(payload)
        if depth > MAX_HEADER_DEPTH:
            raise self.fail(offset, f"the header nests {depth} deep, more than the {MAX_HEADER_DEPTH} allowed")
        try:
            obj = json.loads(payload.decode(), parse_int=_bounded_int, parse_constant=_no_constant)
        except UnicodeDecodeError as e:
            raise self.fail(offset, f"the header is not UTF-8: {e}") from None
        except ValueError as e:  # JSONDecodeError, and what _bounded_int and _no_constant raise
            raise self.fail(offset, f"the header is not valid JSON: {e}") from None
        try:
            return DumpHeader.from_json(obj)
        except ValueError as e:
            raise self.fail(offset, f"bad header: {e}") from None

    def _round(self, offset: int, payload: bytes, header: DumpHeader, expect: int) -> Round:
        if len(payload) < ROUND.size:
            raise self.fail(offset, f"ROND section of {len(payload)} bytes, shorter than its {ROUND.size}-byte head")
        number, when, size, count = ROUND.unpack_from(payload)
        if number != expect:
            raise self.fail(offset, f"round {number} where round {expect} should be (rounds missing or reordered)")
        if size != header.bitmap_bytes:
            raise self.fail(
                offset,
                f"round {number}: bitmap of {size} bytes, the guest memory layout needs {header.bitmap_bytes}",
            )
        if not _is_time(when):
            raise self.fail(offset, f"round {number}: time {when!r} is not a time between 1970 and 9999")
        from vdpa_svq.pageset import PageSet

        try:
            pages = PageSet.from_zlib(memoryview(payload)[ROUND.size :], size, header.pages, self.chunks)
        except ValueError as e:
            raise self.fail(offset, f"round {number}: {e}") from None
        last = pages.max_page()
        if last is not None and last >= header.pages:
            raise self.fail(offset, f"round {number}: pages past the end of guest memory are marked dirty")
        actual = len(pages)
        if actual != count:
            raise self.fail(offset, f"round {number}: {actual} pages set, the section says {count}")
        return Round(number, when, pages, count)

    def _trailer(self, offset: int, payload: bytes, rounds: list[Round]) -> None:
        if len(payload) != TRAILER.size:
            raise self.fail(offset, f"TAIL section of {len(payload)} bytes, expected {TRAILER.size}")
        count, total = TRAILER.unpack(payload)
        if count != len(rounds):
            raise self.fail(offset, f"the trailer says {count} rounds, the file holds {len(rounds)}")
        actual = sum(r.count for r in rounds)
        if total != actual:
            raise self.fail(offset, f"the trailer says {total} dirty pages in all, the rounds hold {actual}")


def _json_depth(text: bytes) -> int:
    """How deep the JSON text's arrays and objects nest, strings skipped: checked before json.loads,
    whose recursion a crafted header would otherwise exhaust."""
    import numpy as np

    outside = np.frombuffer(_JSON_STRING.sub(b'""', text), dtype=np.uint8)
    steps = np.isin(outside, _OPENERS).astype(np.int64) - np.isin(outside, _CLOSERS)
    return int(np.cumsum(steps).max(initial=0))


_JSON_STRING = re.compile(rb'"(?:[^"\\]|\\.)*"', re.DOTALL)
_OPENERS = list(b"[{")
_CLOSERS = list(b"]}")


def _bounded_int(digits: str) -> int:
    # Python refuses ints over 4300 digits with a ValueError of its own; the header's are u64.
    if len(digits.lstrip("-")) > MAX_INT_DIGITS:
        raise ValueError(f"an integer of {len(digits)} digits")
    return int(digits)


def _no_constant(name: str) -> float:
    raise ValueError(f"{name} is not a JSON number")
