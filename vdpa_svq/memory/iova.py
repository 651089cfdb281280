"""Guest-physical -> IOVA translation for what the device sees, and IOVA space for the shadow rings.

Guest memory is mapped into the device at IOVA = GPA (simple, and what the dirty log is indexed
by); the shadow rings get IOVAs above the highest guest address, page aligned, inside the device's
IOVA range. A guest buffer that spans two regions is split into one piece per region.
"""

from __future__ import annotations

import bisect
from typing import NamedTuple

from vdpa_svq.errors import GuestMemoryError
from vdpa_svq.memory.guest import page_align


class IovaMapping(NamedTuple):
    """One range of guest memory mapped for the device: [gpa, gpa+size) at [iova, iova+size)."""

    gpa: int
    size: int
    iova: int


class IovaMap:
    def __init__(self, first: int = 0, last: int = (1 << 64) - 1) -> None:
        self.first, self.last = first, last
        self._starts: list[int] = []
        self._maps: list[IovaMapping] = []  # sorted by gpa
        self._next_free = first

    def table(self) -> tuple[IovaMapping, ...]:
        """The mappings as they stand, sorted by gpa: a snapshot (the C relay translates with it)."""
        return tuple(self._maps)

    def add(self, gpa: int, size: int, iova: int) -> None:
        if iova < self.first or iova + size - 1 > self.last:
            where = f"IOVA {iova:#x} outside the device range {self.first:#x}..{self.last:#x}"
            raise GuestMemoryError(gpa, size, where)
        i = bisect.bisect_right(self._starts, gpa)
        self._starts.insert(i, gpa)
        self._maps.insert(i, IovaMapping(gpa, size, iova))
        self._next_free = max(self._next_free, page_align(iova + size))

    def alloc(self, size: int) -> int:
        """Fresh page-aligned IOVA space (for memory vdpa-svq owns), above everything mapped."""
        iova = self._next_free
        if iova + size - 1 > self.last:
            raise GuestMemoryError(iova, size, "no IOVA space left in the device's range")
        self._next_free = page_align(iova + size)
        return iova

    def translate(self, gpa: int, length: int) -> list[tuple[int, int]]:
        """[(iova, length), ...] covering [gpa, gpa+length), one piece per mapping crossed."""
        pieces = []
        while True:
            i = bisect.bisect_right(self._starts, gpa) - 1
            if i < 0:
                raise GuestMemoryError(gpa, length, "not mapped for the device")
            start, size, iova = self._maps[i]
            if gpa >= start + size:
                raise GuestMemoryError(gpa, length, "not mapped for the device")
            n = min(length, start + size - gpa)
            pieces.append((iova + gpa - start, n))
            if n == length:
                return pieces
            gpa, length = gpa + n, length - n
