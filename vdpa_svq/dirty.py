"""The dirty bitmap, in the vhost log format: one bit per 4 KiB page of guest-physical address.

Page p is bit p % 8 of byte p // 8 (VHOST_F_LOG_ALL; vhost-user's shared log uses the same
layout). A migration round's snapshot-and-clear never loses a bit set concurrently: it lands either
in this round or the next. Python marks and harvests share a lock; the C relay marks with atomic
ORs, and harvest() then exchanges each word with zero in C (vdpa_svq._relay.harvest).
"""

from __future__ import annotations

import threading

from vdpa_svq.memory.guest import PAGE_SIZE
from vdpa_svq.native import harvest as _atomic_harvest  # None: no C relay, so only Python marks (the lock)

PAGE_SHIFT = 12


class DirtyBitmap:
    """Pages dirtied in [0, size) of guest-physical space."""

    def __init__(self, size: int) -> None:
        self.pages = -(-size // PAGE_SIZE)
        self.bits = bytearray(-(-self.pages // 8))
        self._lock = threading.Lock()

    def mark(self, gpa: int, length: int) -> None:
        """Mark every page that [gpa, gpa+length) touches (nothing for length 0)."""
        if length <= 0:
            return
        first, last = gpa >> PAGE_SHIFT, (gpa + length - 1) >> PAGE_SHIFT
        if last >= self.pages:
            raise ValueError(f"dirty range [{gpa:#x}, +{length:#x}) beyond the log of {self.pages} pages")
        with self._lock:
            for page in range(first, last + 1):
                self.bits[page >> 3] |= 1 << (page & 7)

    def is_dirty(self, page: int) -> bool:
        return bool(self.bits[page >> 3] >> (page & 7) & 1)

    def dirty_pages(self) -> list[int]:
        with self._lock:
            snap = bytes(self.bits)
        return pages_of(snap)

    def harvest(self) -> bytes:
        """This round's bitmap; the bitmap starts the next round empty (atomic against mark())."""
        with self._lock:
            if _atomic_harvest is not None:
                return _atomic_harvest(self.bits)
            snap = bytes(self.bits)
            self.bits[:] = bytes(len(self.bits))
        return snap

    def write_into(self, log: memoryview | bytearray) -> None:
        """OR our bits into an external log of the same format (e.g. vhost-user's shared log)."""
        with self._lock:
            n = min(len(log), len(self.bits))
            for i in range(n):
                if self.bits[i]:
                    log[i] |= self.bits[i]

    def __len__(self) -> int:
        return len(self.dirty_pages())


def pages_of(bitmap: bytes) -> list[int]:
    """The page numbers set in a vhost-format bitmap."""
    return [i * 8 + b for i, byte in enumerate(bitmap) if byte for b in range(8) if byte >> b & 1]

