"""Guest memory: one or more mmap'd regions addressed by guest-physical address (GPA).

Regions are memfd-backed so that they can be shared: mapped into a vhost-vdpa device's IOVA space
(by their host virtual address), or received from a vhost-user frontend as file descriptors.
Ring code never owns memory; it is handed a GuestMemory and reads and writes through it.
"""

from __future__ import annotations

import bisect
import ctypes
import mmap
import os
import weakref
from collections.abc import Iterator
from dataclasses import dataclass, field

from vdpa_svq.errors import GuestMemoryError

try:
    from vdpa_svq import _busguard
except ImportError:  # no C extension: memory that can shrink is refused (add_region)
    _busguard = None

PAGE_SIZE = 4096


def page_align(x: int) -> int:
    """`x` rounded up to a whole number of pages: mappings and ring areas are per page."""
    return (x + PAGE_SIZE - 1) & ~(PAGE_SIZE - 1)


@dataclass
class MemoryRegion:
    """[gpa, gpa+size) of guest-physical space, backed by `fd` from file offset `offset`."""

    gpa: int
    size: int
    fd: int
    offset: int
    mm: mmap.mmap = field(repr=False)
    hva: int = 0  # host virtual address of the first byte (for IOTLB updates)
    owns_fd: bool = True
    guard: int | None = None  # its _busguard slot, when the file can shrink under us

    def faults(self) -> tuple[int, int]:
        """(SIGBUS faults caught in this region, the first faulting host address)."""
        return _busguard.faults(self.guard) if self.guard is not None else (0, 0)

    @property
    def end(self) -> int:
        return self.gpa + self.size


def _mmap_address(mm: mmap.mmap) -> int:
    # from_buffer exports the mmap while the ctypes object lives; drop it at once so that the
    # mmap can still be closed later.
    probe = ctypes.c_char.from_buffer(mm)
    address = ctypes.addressof(probe)
    del probe
    return address


# Every live region of every GuestMemory in this process, by host virtual address: how a device
# that needs files rather than addresses (a vhost-user backend) finds what backs an IOTLB update.
_BY_HVA: weakref.WeakValueDictionary[int, MemoryRegion] = weakref.WeakValueDictionary()


def backing(hva: int, size: int) -> tuple[int, int]:
    """(fd, file offset) of the GuestMemory region holding [hva, hva+size), else GuestMemoryError."""
    for start, region in list(_BY_HVA.items()):
        if start <= hva and hva + size <= start + region.size:
            return region.fd, region.offset + (hva - start)
    raise GuestMemoryError(hva, size, "no guest memory region of this process is mapped at this host address")


class GuestMemory:
    """A set of non-overlapping regions; every access is checked to lie inside one region."""

    def __init__(self) -> None:
        self._regions: list[MemoryRegion] = []
        self._starts: list[int] = []
        self._views: list[memoryview] = []

    @classmethod
    def create(cls, size: int, *, gpa: int = 0, name: str = "vdpa-svq-guest") -> GuestMemory:
        """One fresh, zeroed, memfd-backed region of `size` bytes at `gpa`."""
        mem = cls()
        mem.add_memfd_region(gpa, size, name=name)
        return mem

    def add_memfd_region(self, gpa: int, size: int, *, name: str = "vdpa-svq-guest") -> MemoryRegion:
        size = page_align(size)
        fd = os.memfd_create(name, os.MFD_CLOEXEC)
        try:
            os.ftruncate(fd, size)
            return self.add_region(gpa, size, fd, 0, owns_fd=True)
        except BaseException:
            os.close(fd)
            raise

    def add_region(self, gpa: int, size: int, fd: int, offset: int = 0, *, owns_fd: bool = False,
                   shrinkable: bool = False, page_size: int = PAGE_SIZE) -> MemoryRegion:
        """Map `size` bytes of `fd` at file offset `offset` as guest memory [gpa, gpa+size).

        `shrinkable`: someone else can truncate the file (a peer's unsealed memory); an access
        past its new end then reads zeros instead of killing us, and faulted() names the region.
        """
        if shrinkable and _busguard is None:
            raise GuestMemoryError(gpa, size, "this file can shrink under us and the SIGBUS guard "
                                              "(the C extension vdpa_svq._busguard) is not built")
        if size <= 0 or gpa < 0:
            raise GuestMemoryError(gpa, size, "empty region or negative address")
        i = bisect.bisect_right(self._starts, gpa)
        if (i > 0 and self._regions[i - 1].end > gpa) or (i < len(self._regions) and self._starts[i] < gpa + size):
            raise GuestMemoryError(gpa, size, "overlaps an existing region")
        mm = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE, offset=offset)
        region = MemoryRegion(gpa, size, fd, offset, mm, _mmap_address(mm), owns_fd)
        if shrinkable:
            try:
                region.guard = _busguard.guard(region.hva, size, page_size)
            except BaseException:
                mm.close()
                raise
        self._regions.insert(i, region)
        self._starts.insert(i, gpa)
        self._views.insert(i, memoryview(mm))
        _BY_HVA[region.hva] = region
        return region

    @property
    def regions(self) -> tuple[MemoryRegion, ...]:
        return tuple(self._regions)

    def __iter__(self) -> Iterator[MemoryRegion]:
        return iter(self._regions)

    @property
    def size(self) -> int:
        return sum(r.size for r in self._regions)

    def faulted(self) -> list[MemoryRegion]:
        """Regions whose file shrank under an access (see add_region's `shrinkable`)."""
        return [r for r in self._regions if r.faults()[0]]

    def _locate(self, gpa: int, length: int) -> tuple[int, int]:
        i = bisect.bisect_right(self._starts, gpa) - 1
        if i < 0 or length < 0:
            raise GuestMemoryError(gpa, length)
        region = self._regions[i]
        if gpa + length > region.end:
            raise GuestMemoryError(gpa, length, "outside guest memory or across regions")
        return i, gpa - region.gpa

    def contains(self, gpa: int, length: int) -> bool:
        try:
            self._locate(gpa, length)
        except GuestMemoryError:
            return False
        return True

    def view(self, gpa: int, length: int) -> memoryview:
        """A writable view of [gpa, gpa+length); raises GuestMemoryError outside one region."""
        i, off = self._locate(gpa, length)
        return self._views[i][off : off + length]

    def read(self, gpa: int, length: int) -> bytes:
        return bytes(self.view(gpa, length))

    def write(self, gpa: int, data: bytes | bytearray | memoryview) -> None:
        self.view(gpa, len(data))[:] = data

    def hva(self, gpa: int) -> int:
        """Host virtual address of `gpa` in this process."""
        i, off = self._locate(gpa, 0)
        return self._regions[i].hva + off

    def close(self) -> None:
        for v in self._views:
            v.release()
        for r in self._regions:
            _BY_HVA.pop(r.hva, None)
            if r.guard is not None:
                _busguard.unguard(r.guard)  # before the range is unmapped and maybe reused
            r.mm.close()
            if r.owns_fd:
                os.close(r.fd)
        self._regions.clear()
        self._starts.clear()
        self._views.clear()

    def __enter__(self) -> GuestMemory:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
