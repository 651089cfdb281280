"""The soft device's IOTLB: the only way it reaches memory, as a vhost-vdpa device does.

`iotlb_update(iova, size, uaddr, perm)` maps [iova, iova+size) to this process's host virtual
address `uaddr`. `IotlbMemory` then offers the read interface of GuestMemory (view, contains,
read, write) in IOVA space, so the device rings of vdpa_svq.ring run over it unchanged.

Trust: the kernel pins the pages of a mapping; we cannot, so `update` checks /proc/self/maps that
[uaddr, uaddr+size) is mapped (and writable, for a writable mapping) and the owner must invalidate
before unmapping (a munmap under a live mapping would crash the device thread, not the guest).
Permissions are enforced on every device access: a write through a read-only mapping is a
device fault (IotlbFault), never a silent store.
"""

from __future__ import annotations

import bisect
import ctypes
import errno
from collections.abc import Callable
from dataclasses import dataclass, field

from kernel_iface import errors, uapi
from kernel_iface.device import IovaRange
from vdpa_svq.errors import GuestMemoryError, VdpaSvqError

_PERM_NAMES = {uapi.VHOST_ACCESS_RO: "RO", uapi.VHOST_ACCESS_WO: "WO", uapi.VHOST_ACCESS_RW: "RW"}


class IotlbFault(GuestMemoryError):
    """A device access the IOTLB does not allow: unmapped IOVA, or a write to a read-only mapping.

    A GuestMemoryError, so the ring code treats an unmapped indirect table like one outside guest
    memory; the datapath turns it into a broken queue with this message as the reason.
    """

    def __init__(self, iova: int, length: int, why: str) -> None:
        VdpaSvqError.__init__(self, f"iova [{iova:#x}, +{length:#x}): {why}")
        self.gpa = iova
        self.length = length


@dataclass(frozen=True)
class IotlbMapping:
    iova: int
    size: int
    uaddr: int
    perm: int
    view: memoryview = field(repr=False, compare=False)  # writable bytes of [uaddr, uaddr+size)
    _array: object = field(repr=False, compare=False)  # the ctypes array the view borrows from

    @property
    def last(self) -> int:
        return self.iova + self.size - 1

    @property
    def readable(self) -> bool:
        return bool(self.perm & uapi.VHOST_ACCESS_RO)

    @property
    def writable(self) -> bool:
        return bool(self.perm & uapi.VHOST_ACCESS_WO)

    def describe(self) -> str:
        return f"iova {self.iova:#x} size {self.size:#x} perm {_PERM_NAMES.get(self.perm, self.perm)}"


def _new_mapping(iova: int, size: int, uaddr: int, perm: int) -> IotlbMapping:
    array = (ctypes.c_ubyte * size).from_address(uaddr)
    return IotlbMapping(iova, size, uaddr, perm, memoryview(array).cast("B"), array)


def _process_maps() -> list[tuple[int, int, str]]:
    out = []
    with open("/proc/self/maps") as f:
        for line in f:
            span, perms = line.split()[:2]
            lo, hi = span.split("-")
            out.append((int(lo, 16), int(hi, 16), perms))
    return out


def host_range_mapped(uaddr: int, size: int, *, write: bool) -> bool:
    """Whether [uaddr, uaddr+size) is mapped in this process (readable, and writable if `write`)."""
    pos, end = uaddr, uaddr + size
    for lo, hi, perms in _process_maps():  # sorted by address
        if hi <= pos or lo > pos:
            continue
        if perms[0] != "r" or (write and perms[1] != "w"):
            return False
        pos = hi
        if pos >= end:
            return True
    return False


class IotlbMemory:
    """IOVA -> host mappings with permissions, and GuestMemory-style access through them.

    The datapath reads `_live`, one tuple replaced whole, so it never sees half an update. Inside
    a batch, updates go to a staged copy that BATCH_END publishes (as the kernel hands a batch to
    the parent device at once).
    """

    def __init__(self, path: str, iova_range: IovaRange) -> None:
        self.path = path
        self.iova_range = iova_range
        self._live: tuple[list[int], list[IotlbMapping]] = ([], [])
        self._staged: list[IotlbMapping] | None = None
        # Called after every change the device sees (not inside a batch): a datapath that keeps
        # its own copy of the mappings (the C one) drops it here.
        self.on_change: Callable[[], None] | None = None

    # -- updates (control plane) ---------------------------------------------------------------
    @property
    def mappings(self) -> tuple[IotlbMapping, ...]:
        """What the device currently translates with (a batch in progress is not visible yet)."""
        return tuple(self._live[1])

    def _current(self) -> list[IotlbMapping]:
        return self._staged if self._staged is not None else list(self._live[1])

    def _publish(self, maps: list[IotlbMapping]) -> None:
        maps = sorted(maps, key=lambda m: m.iova)
        if self._staged is not None:
            self._staged = maps
        else:
            self._live = ([m.iova for m in maps], maps)
            self._changed()

    def _changed(self) -> None:
        if self.on_change is not None:
            self.on_change()

    def update(self, iova: int, size: int, uaddr: int, perm: int) -> None:
        op = errors.IOTLB_UPDATE
        where = f"iova {iova:#x} size {size:#x}"
        if perm not in _PERM_NAMES:
            raise ValueError(f"perm {perm} is not VHOST_ACCESS_RO/WO/RW")
        if not self.iova_range.contains(iova, size):
            why = "is empty" if size <= 0 else f"is outside {self.iova_range.first:#x}..{self.iova_range.last:#x}"
            raise errors.error_from_errno(errno.EINVAL, op, self.path, f"{where} {why}")
        maps = self._current()
        for m in maps:
            if m.iova <= iova + size - 1 and iova <= m.last:
                raise errors.error_from_errno(errno.EEXIST, op, self.path, f"{where} overlaps {m.describe()} (asid 0)")
        # The kernel would fail to pin these pages: answer as it does, with EFAULT.
        if not host_range_mapped(uaddr, size, write=bool(perm & uapi.VHOST_ACCESS_WO)):
            raise errors.error_from_errno(
                errno.EFAULT, op, self.path, f"{where} uaddr {uaddr:#x} is not mapped with perm {_PERM_NAMES[perm]}"
            )
        self._publish([*maps, _new_mapping(iova, size, uaddr, perm)])

    def invalidate(self, iova: int, size: int) -> None:
        """Remove every mapping that intersects [iova, iova+size) (whole mappings, as the kernel)."""
        last = iova + size - 1
        self._publish([m for m in self._current() if not (m.iova <= last and iova <= m.last)])

    def begin_batch(self) -> None:
        if self._staged is None:
            self._staged = list(self._live[1])

    def end_batch(self) -> None:
        if self._staged is not None:
            staged, self._staged = self._staged, None
            self._publish(staged)

    def clear(self) -> None:
        self._staged = None
        self._live = ([], [])
        self._changed()

    # -- device access (datapath) --------------------------------------------------------------
    def _find(self, addr: int) -> IotlbMapping | None:
        starts, maps = self._live
        i = bisect.bisect_right(starts, addr) - 1
        if i >= 0 and addr <= maps[i].last:
            return maps[i]
        return None

    def _pieces(self, addr: int, length: int, *, write: bool) -> list[tuple[IotlbMapping, int, int]]:
        """(mapping, offset in it, length) covering [addr, addr+length), checking permissions."""
        pieces: list[tuple[IotlbMapping, int, int]] = []
        pos, end = addr, addr + length
        while True:
            m = self._find(pos)
            if m is None:
                raise IotlbFault(addr, length, f"iova {pos:#x} is not mapped in the device IOTLB")
            if write and not m.writable:
                raise IotlbFault(addr, length, f"device write to a read-only mapping ({m.describe()})")
            if not write and not m.readable:
                raise IotlbFault(addr, length, f"device read of a write-only mapping ({m.describe()})")
            n = min(end, m.last + 1) - pos
            pieces.append((m, pos - m.iova, n))
            pos += n
            if pos >= end:
                return pieces

    def contains(self, addr: int, length: int) -> bool:
        """Whether every byte of [addr, addr+length) is mapped (across adjacent mappings too)."""
        if length < 0 or addr < 0:
            return False
        pos, end = addr, addr + max(length, 1)
        while pos < end:
            m = self._find(pos)
            if m is None:
                return False
            pos = m.last + 1
        return True

    def view(self, addr: int, length: int) -> memoryview:
        """A view of [addr, addr+length) inside ONE mapping (ring areas, indirect tables).

        Read-only unless the mapping is writable, so a ring that writes a used element into a
        read-only device area fails (TypeError) instead of storing.
        """
        m = self._find(addr)
        if m is None or length < 0 or addr + length - 1 > m.last:
            raise IotlbFault(addr, length, "not inside one device IOTLB mapping")
        off = addr - m.iova
        v = m.view[off : off + length]
        return v if m.writable else v.toreadonly()

    def writable(self, addr: int, length: int) -> bool:
        """Whether the device may write all of [addr, addr+length)."""
        try:
            self._pieces(addr, length, write=True)
        except IotlbFault:
            return False
        return True

    def read(self, addr: int, length: int) -> bytes:
        if length == 0:
            return b""
        return b"".join(bytes(m.view[off : off + n]) for m, off, n in self._pieces(addr, length, write=False))

    def write(self, addr: int, data: bytes | bytearray | memoryview) -> None:
        if not data:
            return
        src = memoryview(data).cast("B")
        # Check the whole range first, so a faulting write stores nothing.
        pos = 0
        for m, off, n in self._pieces(addr, len(src), write=True):
            m.view[off : off + n] = src[pos : pos + n]
            pos += n
