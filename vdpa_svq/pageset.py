"""A set of guest page numbers held as a sparse vhost-format bitmap.

A dirty-log dump may describe terabytes of guest memory in a few hundred kilobytes (a zlib stream of
a mostly empty, or mostly full, bitmap). PageSet keeps only the bitmap's non-zero chunks of
CHUNK_BYTES, as Python ints (bit i of chunk k is page k * CHUNK_PAGES + i, the vhost log's
little-endian bit order), and equal chunks share one int: memory follows what the file really
holds, not the guest size it claims. Set operations work chunk by chunk and reuse their results
for repeated pairs, so `a | b` of two deduplicated sets stays deduplicated.
"""

from __future__ import annotations

import bisect
import itertools
import zlib
from collections.abc import Callable, Iterator, Sequence

import numpy as np

CHUNK_BYTES = 1 << 16  # 512 Ki pages: 2 GiB of guest memory per chunk
CHUNK_PAGES = CHUNK_BYTES * 8
_ZERO_CHUNK = bytes(CHUNK_BYTES)
# How much inflated bitmap is held at once while reading a zlib stream.
_INFLATE_STEP = 16 * CHUNK_BYTES


class PageSet:
    """Page numbers in [0, pages): iterable (ascending), sized, and combinable with | & -."""

    __slots__ = ("pages", "_chunks", "_prefix")

    def __init__(self, pages: int, chunks: dict[int, int] | None = None) -> None:
        self.pages = pages
        self._chunks = {k: v for k, v in sorted((chunks or {}).items()) if v}
        self._prefix: tuple[list[int], list[int]] | None = None

    # -- building -----------------------------------------------------------------------------

    @classmethod
    def from_bitmap(cls, bitmap: bytes | bytearray | memoryview, pages: int | None = None) -> PageSet:
        """From a whole vhost-format bitmap (page p is bit p % 8 of byte p // 8)."""
        bitmap = memoryview(bitmap).cast("B")
        builder = _Builder()
        for start in range(0, len(bitmap), CHUNK_BYTES):
            builder.add(start // CHUNK_BYTES, bitmap[start : start + CHUNK_BYTES])
        return cls(len(bitmap) * 8 if pages is None else pages, builder.chunks)

    @classmethod
    def from_zlib(cls, stream: bytes | memoryview, size: int, pages: int, intern: dict | None = None) -> PageSet:
        """Inflate a zlib stream that must hold exactly `size` bitmap bytes, CHUNK_BYTES at a time.

        Raises ValueError if the stream is corrupt or holds more or less than `size` bytes. Equal
        chunks are shared through `intern` (pass one dict for every round of a dump).
        """
        builder = _Builder(intern)
        inflate = zlib.decompressobj()
        pending: bytes | memoryview = stream
        carry = bytearray()  # inflated bytes not yet a whole chunk
        done = 0  # bytes inflated so far
        try:
            while not inflate.eof:
                # Bounded: a stream that inflates past `size` is caught one step after the end.
                out = inflate.decompress(pending, min(_INFLATE_STEP, size - done + 1))
                pending = inflate.unconsumed_tail
                done += len(out)
                if done > size:
                    raise ValueError(f"the compressed bitmap does not hold exactly {size} bytes (it holds more)")
                carry += out
                whole = len(carry) - len(carry) % CHUNK_BYTES
                view = memoryview(carry)
                for start in range(0, whole, CHUNK_BYTES):
                    builder.add((done - len(carry) + start) // CHUNK_BYTES, view[start : start + CHUNK_BYTES])
                view.release()
                del carry[:whole]
                if not out and not pending:
                    break  # the stream ends before its end marker
            if carry:
                builder.add((done - len(carry)) // CHUNK_BYTES, memoryview(carry))
        except zlib.error as e:
            raise ValueError(f"the bitmap does not decompress: {e}") from None
        if done != size or not inflate.eof or inflate.unused_data:
            raise ValueError(f"the compressed bitmap does not hold exactly {size} bytes")
        return cls(pages, builder.chunks)

    # -- reading ------------------------------------------------------------------------------

    def __len__(self) -> int:
        return sum(c.bit_count() for c in self._chunks.values())

    def __bool__(self) -> bool:
        return bool(self._chunks)

    def __iter__(self) -> Iterator[int]:
        for k, chunk in self._chunks.items():
            yield from (k * CHUNK_PAGES + np.flatnonzero(_bits(chunk))).tolist()

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, PageSet):
            return NotImplemented
        return self.pages == other.pages and self._chunks == other._chunks

    __hash__ = None  # mutable-looking value type: compare, do not hash

    def __repr__(self) -> str:
        return f"PageSet({len(self)} of {self.pages} pages)"

    def max_page(self) -> int | None:
        """The highest page in the set, or None."""
        if not self._chunks:
            return None
        k = next(reversed(self._chunks))
        return k * CHUNK_PAGES + self._chunks[k].bit_length() - 1

    def ranges(self) -> Iterator[tuple[int, int]]:
        """The pages as inclusive (first, last) runs, ascending; runs continue across chunks."""
        run: tuple[int, int] | None = None
        for k, chunk in self._chunks.items():
            bits = _bits(chunk).astype(np.int8)
            edges = np.diff(bits, prepend=0, append=0)
            base = k * CHUNK_PAGES
            for first, last in zip(
                (base + np.flatnonzero(edges == 1)).tolist(),
                (base + np.flatnonzero(edges == -1) - 1).tolist(),
                strict=True,
            ):
                if run is not None and first == run[1] + 1:
                    run = (run[0], last)
                    continue
                if run is not None:
                    yield run
                run = (first, last)
        if run is not None:
            yield run

    def range_count(self) -> int:
        """How many runs ranges() yields, without building them."""
        mask = (1 << CHUNK_PAGES) - 1
        total, prev_key, prev_top = 0, None, False
        for k, chunk in self._chunks.items():
            total += (chunk & ~(chunk << 1) & mask).bit_count()  # pages whose lower neighbour is clear
            if chunk & 1 and prev_top and prev_key == k - 1:
                total -= 1  # the run began in the chunk before
            prev_key, prev_top = k, bool(chunk >> (CHUNK_PAGES - 1))
        return total

    def count_below(self, page: int) -> int:
        """How many pages of the set are < page."""
        keys, prefix = self._prefix_sums()
        k = page // CHUNK_PAGES
        i = bisect.bisect_left(keys, k)
        count = prefix[i]
        if i < len(keys) and keys[i] == k:
            count += (self._chunks[k] & ((1 << (page % CHUNK_PAGES)) - 1)).bit_count()
        return count

    def counts_below(self, pages: Sequence[int] | np.ndarray) -> np.ndarray:
        """count_below for many pages at once (an int64 array): one pass over the chunks they fall in."""
        pages = np.asarray(pages, dtype=np.int64)
        order = np.argsort(pages, kind="stable")
        ordered = pages[order]
        keys, prefix = self._prefix_sums()
        chunk_of = ordered // CHUNK_PAGES
        counts = np.asarray(prefix, dtype=np.int64)[np.searchsorted(np.asarray(keys, dtype=np.int64), chunk_of)]
        bounds = np.flatnonzero(np.diff(chunk_of, prepend=-1)).tolist() + [len(ordered)]
        for lo, hi in itertools.pairwise(bounds):
            chunk = self._chunks.get(int(chunk_of[lo]))
            if chunk is not None:  # pages inside a stored chunk: add the set pages below them in it
                within = np.concatenate(([0], np.cumsum(_bits(chunk), dtype=np.int64)))
                counts[lo:hi] += within[ordered[lo:hi] % CHUNK_PAGES]
        out = np.empty_like(counts)
        out[order] = counts
        return out

    def count_in(self, first: int, end: int) -> int:
        """How many pages of the set are in [first, end)."""
        return self.count_below(end) - self.count_below(first) if end > first else 0

    def to_bitmap(self) -> bytes:
        """The whole vhost-format bitmap (all of it: for small guests, tests and writers)."""
        out = bytearray(-(-self.pages // 8))
        for k, chunk in self._chunks.items():
            start = k * CHUNK_BYTES
            piece = chunk.to_bytes(CHUNK_BYTES, "little")[: len(out) - start]
            out[start : start + len(piece)] = piece
        return bytes(out)

    # -- combining ----------------------------------------------------------------------------

    def __or__(self, other: PageSet) -> PageSet:
        return self._combine(other, lambda a, b: a | b, keep_left=True, keep_right=True)

    def __and__(self, other: PageSet) -> PageSet:
        return self._combine(other, lambda a, b: a & b, keep_left=False, keep_right=False)

    def __sub__(self, other: PageSet) -> PageSet:
        return self._combine(other, lambda a, b: a & ~b, keep_left=True, keep_right=False)

    def _combine(self, other: PageSet, op: Callable[[int, int], int], keep_left: bool, keep_right: bool) -> PageSet:
        results: dict[tuple[int, int], int] = {}  # by the operands' identity: shared chunks stay shared
        out: dict[int, int] = {}
        for k in self._chunks.keys() | other._chunks.keys():
            a, b = self._chunks.get(k), other._chunks.get(k)
            if a is None or b is None:
                if (a is not None and keep_left) or (b is not None and keep_right):
                    out[k] = a if a is not None else b
                continue
            key = (id(a), id(b))
            if key not in results:
                results[key] = op(a, b)
            out[k] = results[key]
        return PageSet(max(self.pages, other.pages), out)

    def _prefix_sums(self) -> tuple[list[int], list[int]]:
        if self._prefix is None:
            keys = list(self._chunks)
            prefix = [0]
            for k in keys:
                prefix.append(prefix[-1] + self._chunks[k].bit_count())
            self._prefix = (keys, prefix)
        return self._prefix


class _Builder:
    """Collects non-zero chunks, sharing equal ones."""

    def __init__(self, intern: dict[bytes, int] | None = None) -> None:
        self.chunks: dict[int, int] = {}
        self.intern = {} if intern is None else intern

    def add(self, index: int, piece: memoryview) -> None:
        key = piece.tobytes()  # then a memcmp: comparing memoryviews goes byte by byte
        if key == _ZERO_CHUNK[: len(key)]:
            return
        chunk = self.intern.get(key)
        if chunk is None:
            chunk = self.intern[key] = int.from_bytes(key, "little")
        self.chunks[index] = chunk


def _bits(chunk: int) -> np.ndarray:
    """One chunk as an array of CHUNK_PAGES 0/1 bytes, page order."""
    raw = np.frombuffer(chunk.to_bytes(CHUNK_BYTES, "little"), dtype=np.uint8)
    return np.unpackbits(raw, bitorder="little")
