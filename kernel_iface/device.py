"""``VhostVdpa``: one open /dev/vhost-vdpa-N, one method per vhost / vhost-vdpa uapi operation.

No policy: the methods do what the kernel call does, in whatever order the caller chooses (only
vdpa_svq.session orders the device lifecycle). Two pieces of bookkeeping are kept, both because the
kernel does not let us ask: the backend features we acked (the kernel has no getter for them) and the
IOTLB mappings made through this fd (the kernel reports an overlapping or out-of-range update as EFAULT,
so telling IovaOverlap from IovaOutOfRange needs our own record).
"""

from __future__ import annotations

import ctypes
import errno
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import NamedTuple

from kernel_iface import errors, uapi
from kernel_iface._ioctl import IoctlArg, _ioctl


class IovaRange(NamedTuple):
    """VHOST_VDPA_GET_IOVA_RANGE: the IOVAs the device can map, both ends inclusive."""

    first: int
    last: int

    def contains(self, iova: int, size: int) -> bool:
        return size > 0 and self.first <= iova and iova + size - 1 <= self.last


class PackedVringBase(NamedTuple):
    """The packed-ring meaning of vhost_vring_state.num for SET/GET_VRING_BASE.

    vhost-vdpa encodes ``last_avail_idx | avail_wrap_counter << 15`` in the low half and the same for
    the used side in the high half. The initial state of a packed ring is avail 0 wrap 1, used 0 wrap 1
    (num 0x80008000), the only state vp_vdpa accepts.
    """

    last_avail_idx: int
    avail_wrap_counter: bool
    last_used_idx: int
    used_wrap_counter: bool

    def to_num(self) -> int:
        for name in ("last_avail_idx", "last_used_idx"):
            if not 0 <= getattr(self, name) < 1 << 15:
                raise ValueError(f"{name} {getattr(self, name)} does not fit in 15 bits")
        avail = self.last_avail_idx | int(self.avail_wrap_counter) << 15
        used = self.last_used_idx | int(self.used_wrap_counter) << 15
        return avail | used << 16

    @classmethod
    def from_num(cls, num: int) -> PackedVringBase:
        if not 0 <= num < 1 << 32:
            raise ValueError(f"vring base {num:#x} is not a u32")
        return cls(
            last_avail_idx=num & 0x7FFF,
            avail_wrap_counter=bool(num >> 15 & 1),
            last_used_idx=num >> 16 & 0x7FFF,
            used_wrap_counter=bool(num >> 31 & 1),
        )


PACKED_VRING_BASE_INITIAL = PackedVringBase(0, True, 0, True)


class VhostVdpa:
    """An open vhost-vdpa character device. Use ``VhostVdpa.open(path)``, as a context manager."""

    def __init__(self, fd: int, path: str) -> None:
        self._fd = fd
        self.path = path
        # Acked backend features: VHOST_GET_BACKEND_FEATURES returns what is offered, not what was acked.
        self.acked_backend_features = 0
        self._iova_range: IovaRange | None = None
        # asid -> {iova: size} of the mappings made through this fd (see module docstring).
        self._mappings: dict[int, dict[int, int]] = {}

    # -- lifetime ----------------------------------------------------------------------------------

    @classmethod
    def open(cls, path: str) -> VhostVdpa:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        except OSError as e:
            raise errors.error_from_errno(e.errno, errors.OPEN, path) from None
        return cls(fd, path)

    def fileno(self) -> int:
        if self._fd < 0:
            raise ValueError(f"{self.path}: device is closed")
        return self._fd

    @property
    def closed(self) -> bool:
        return self._fd < 0

    def close(self) -> None:
        # Closing the fd is what releases ownership, unpins the mapped pages and resets the device.
        if self._fd >= 0:
            fd, self._fd = self._fd, -1
            os.close(fd)

    def __enter__(self) -> VhostVdpa:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"VhostVdpa({self.path!r}, fd={self._fd})"

    def _call(self, name: str, arg: IoctlArg | None = None) -> None:
        _ioctl(self.fileno(), self.path, name, getattr(uapi, name), arg)

    def _get(self, name: str, ctype: type[ctypes._SimpleCData]) -> int:
        value = ctype()
        self._call(name, value)
        return value.value

    def _vring_state(self, name: str, index: int, num: int = 0) -> int:
        state = uapi.vhost_vring_state(index=index, num=num)
        self._call(name, state)
        return state.num

    def _vring_file(self, name: str, index: int, fd: int) -> None:
        self._call(name, uapi.vhost_vring_file(index=index, fd=fd))

    # -- ownership and features --------------------------------------------------------------------

    def set_owner(self) -> None:
        self._call("VHOST_SET_OWNER")

    def reset_owner(self) -> None:
        self._call("VHOST_RESET_OWNER")

    def get_features(self) -> int:
        return self._get("VHOST_GET_FEATURES", ctypes.c_uint64)

    def set_features(self, features: int) -> None:
        self._call("VHOST_SET_FEATURES", ctypes.c_uint64(_uint(features, 64, "features")))

    def get_backend_features(self) -> int:
        return self._get("VHOST_GET_BACKEND_FEATURES", ctypes.c_uint64)

    def set_backend_features(self, features: int) -> None:
        self._call("VHOST_SET_BACKEND_FEATURES", ctypes.c_uint64(_uint(features, 64, "backend features")))
        self.acked_backend_features = features

    def has_backend_feature(self, bit: int) -> bool:
        """Whether backend feature ``bit`` (a VHOST_BACKEND_F_* number) was acked on this fd."""
        return bool(self.acked_backend_features >> bit & 1)

    # -- device ------------------------------------------------------------------------------------

    def device_id(self) -> int:
        return self._get("VHOST_VDPA_GET_DEVICE_ID", ctypes.c_uint32)

    def get_status(self) -> int:
        return self._get("VHOST_VDPA_GET_STATUS", ctypes.c_uint8)

    def set_status(self, status: int) -> None:
        self._call("VHOST_VDPA_SET_STATUS", ctypes.c_uint8(_uint(status, 8, "status")))

    def config_size(self) -> int:
        return self._get("VHOST_VDPA_GET_CONFIG_SIZE", ctypes.c_uint32)

    def get_config(self, offset: int = 0, length: int | None = None) -> bytes:
        """Read ``length`` bytes of device config space at ``offset`` (default: to the end)."""
        if length is None:
            length = self.config_size() - offset
        if offset < 0 or length <= 0:
            raise ValueError(f"bad config range: offset {offset}, length {length}")
        header = uapi.vhost_vdpa_config(off=offset, len=length)
        hsize = ctypes.sizeof(header)
        # struct vhost_vdpa_config is a header followed by len payload bytes in the same buffer.
        buf = bytearray(bytes(header) + bytes(length))
        self._call("VHOST_VDPA_GET_CONFIG", buf)
        return bytes(buf[hsize:])

    def set_config(self, offset: int, data: bytes) -> None:
        if offset < 0 or not data:
            raise ValueError(f"bad config range: offset {offset}, length {len(data)}")
        header = uapi.vhost_vdpa_config(off=offset, len=len(data))
        self._call("VHOST_VDPA_SET_CONFIG", bytearray(bytes(header) + bytes(data)))

    def set_config_call(self, fd: int) -> None:
        """Eventfd signalled on config change; VHOST_FILE_UNBIND (-1) removes it."""
        self._call("VHOST_VDPA_SET_CONFIG_CALL", ctypes.c_int(fd))

    def vqs_count(self) -> int:
        return self._get("VHOST_VDPA_GET_VQS_COUNT", ctypes.c_uint32)

    def suspend(self) -> None:
        self._call("VHOST_VDPA_SUSPEND")

    def resume(self) -> None:
        self._call("VHOST_VDPA_RESUME")

    # -- virtqueues --------------------------------------------------------------------------------

    def vring_num(self) -> int:
        """VHOST_VDPA_GET_VRING_NUM: the maximum ring size, the same for every virtqueue."""
        return self._get("VHOST_VDPA_GET_VRING_NUM", ctypes.c_uint16)

    def vring_size(self, index: int) -> int:
        """VHOST_VDPA_GET_VRING_SIZE (6.9+): the maximum size of one virtqueue."""
        return self._vring_state("VHOST_VDPA_GET_VRING_SIZE", index)

    def set_vring_num(self, index: int, num: int) -> None:
        self._vring_state("VHOST_SET_VRING_NUM", index, num)

    def set_vring_addr(
        self, index: int, desc: int, avail: int, used: int, *, flags: int = 0, log: int = 0
    ) -> None:
        """Ring addresses, as IOVAs (vhost-vdpa) or user addresses (vhost). For packed rings ``desc``
        is the descriptor ring, ``avail`` the driver event area and ``used`` the device event area."""
        addr = uapi.vhost_vring_addr(
            index=index,
            flags=flags,
            desc_user_addr=desc,
            used_user_addr=used,
            avail_user_addr=avail,
            log_guest_addr=log,
        )
        self._call("VHOST_SET_VRING_ADDR", addr)

    def set_vring_base(self, index: int, num: int) -> None:
        """Split rings: ``num`` is last_avail_idx. Packed: ``PackedVringBase(...).to_num()``."""
        self._vring_state("VHOST_SET_VRING_BASE", index, num)

    def get_vring_base(self, index: int) -> int:
        """The raw u32; decode packed rings with ``PackedVringBase.from_num``."""
        return self._vring_state("VHOST_GET_VRING_BASE", index)

    def set_vring_kick(self, index: int, fd: int) -> None:
        self._vring_file("VHOST_SET_VRING_KICK", index, fd)

    def set_vring_call(self, index: int, fd: int) -> None:
        self._vring_file("VHOST_SET_VRING_CALL", index, fd)

    def set_vring_err(self, index: int, fd: int) -> None:
        self._vring_file("VHOST_SET_VRING_ERR", index, fd)

    def set_vring_enable(self, index: int, enable: bool = True) -> None:
        self._vring_state("VHOST_VDPA_SET_VRING_ENABLE", index, int(enable))

    # -- groups and address spaces -----------------------------------------------------------------

    def group_num(self) -> int:
        return self._get("VHOST_VDPA_GET_GROUP_NUM", ctypes.c_uint32)

    def as_num(self) -> int:
        return self._get("VHOST_VDPA_GET_AS_NUM", ctypes.c_uint)

    def vring_group(self, index: int) -> int:
        return self._vring_state("VHOST_VDPA_GET_VRING_GROUP", index)

    def vring_desc_group(self, index: int) -> int:
        """VHOST_VDPA_GET_VRING_DESC_GROUP (6.7+, needs VHOST_BACKEND_F_DESC_ASID acked)."""
        return self._vring_state("VHOST_VDPA_GET_VRING_DESC_GROUP", index)

    def set_group_asid(self, group: int, asid: int) -> None:
        self._vring_state("VHOST_VDPA_SET_GROUP_ASID", group, asid)

    # -- IOTLB -------------------------------------------------------------------------------------

    def iova_range(self) -> IovaRange:
        # Fixed for the life of the device, and iotlb_update checks against it on every call.
        if self._iova_range is None:
            r = uapi.vhost_vdpa_iova_range()
            self._call("VHOST_VDPA_GET_IOVA_RANGE", r)
            self._iova_range = IovaRange(r.first, r.last)
        return self._iova_range

    def write_iotlb_msg(self, msg: uapi.vhost_msg_v2, op: str) -> None:
        """write(2) one raw IOTLB message, ``op`` naming it in errors. No checks, no bookkeeping:
        the typed methods below are the normal way in."""
        data = bytes(msg)
        try:
            written = os.write(self.fileno(), data)
        except OSError as e:
            raise errors.error_from_errno(e.errno, op, self.path, _describe(msg)) from None
        if written != len(data):
            raise errors.short_write(self.path, op, written, len(data))

    def iotlb_update(
        self, iova: int, size: int, uaddr: int, perm: int = uapi.VHOST_ACCESS_RW, asid: int = 0
    ) -> None:
        """Map [iova, iova + size) to the user address ``uaddr`` in address space ``asid``."""
        self._check_asid(asid)
        rng = self.iova_range()
        op = errors.IOTLB_UPDATE
        where = f"iova {iova:#x} size {size:#x}"
        # Checked here because the kernel answers both of these with a bare EFAULT.
        if not rng.contains(iova, size):
            why = "is empty" if size <= 0 else f"is outside {rng.first:#x}..{rng.last:#x}"
            raise errors.error_from_errno(errno.EINVAL, op, self.path, f"{where} {why}")
        clash = self._overlapping(asid, iova, size)
        if clash is not None:
            raise errors.error_from_errno(
                errno.EEXIST,
                op,
                self.path,
                f"{where} overlaps iova {clash[0]:#x} size {clash[1]:#x} (asid {asid})",
            )
        self.write_iotlb_msg(_iotlb_msg(uapi.VHOST_IOTLB_UPDATE, asid, iova, size, uaddr, perm), op)
        self._mappings.setdefault(asid, {})[iova] = size

    def iotlb_invalidate(self, iova: int, size: int, asid: int = 0) -> None:
        """Unmap every mapping that intersects [iova, iova + size): the kernel removes whole mappings."""
        self._check_asid(asid)
        self.write_iotlb_msg(
            _iotlb_msg(uapi.VHOST_IOTLB_INVALIDATE, asid, iova, size), errors.IOTLB_INVALIDATE
        )
        maps = self._mappings.get(asid, {})
        for start in [s for s, n in maps.items() if _intersects(s, n, iova, size)]:
            del maps[start]

    @contextmanager
    def iotlb_batch(self, asid: int = 0) -> Iterator[None]:
        """Group updates/invalidates so the device applies them at once (at BATCH_END, for ``asid``).

        A no-op unless VHOST_BACKEND_F_IOTLB_BATCH was acked: without it the kernel applies each
        message as it comes, which is still correct.
        """
        if not self.has_backend_feature(uapi.VHOST_BACKEND_F_IOTLB_BATCH):
            yield
            return
        self._check_asid(asid)
        self.write_iotlb_msg(_iotlb_msg(uapi.VHOST_IOTLB_BATCH_BEGIN, asid), errors.IOTLB_BATCH_BEGIN)
        try:
            yield
        finally:
            # Always close the batch: the kernel otherwise keeps deferring map updates on this fd.
            if not self.closed:
                self.write_iotlb_msg(_iotlb_msg(uapi.VHOST_IOTLB_BATCH_END, asid), errors.IOTLB_BATCH_END)

    # -- what a device node does not have (vdpa_svq.device.Device asks every device) -----------------

    def inline_kick(self, index: int) -> Callable[[], None] | None:
        """None: the kernel learns of a kick through the queue's kick eventfd only."""
        return None

    def hangup_fd(self) -> int | None:
        """None: an open device node does not go away under its user (hot-unplug waits for close)."""
        return None

    def check_alive(self) -> None:
        """Nothing to check (hangup_fd() is None)."""

    def faults(self) -> dict[int, str]:
        """NotSupported: the kernel keeps no account a user can read; a queue's errors reach its error eventfd."""
        raise errors.NotSupported(errno.ENOTSUP, self.path, "faults", "the kernel keeps no account of faults")

    def activity(self) -> list[str]:
        """NotSupported: the kernel counts nothing per queue that vhost-vdpa exposes."""
        raise errors.NotSupported(errno.ENOTSUP, self.path, "activity", "vhost-vdpa exposes no per-queue counters")

    def _check_asid(self, asid: int) -> None:
        # Without IOTLB_ASID acked the kernel skips the asid field and silently uses address space 0.
        if asid and not self.has_backend_feature(uapi.VHOST_BACKEND_F_IOTLB_ASID):
            raise ValueError(f"asid {asid} needs VHOST_BACKEND_F_IOTLB_ASID acked first")

    def _overlapping(self, asid: int, iova: int, size: int) -> tuple[int, int] | None:
        for start, length in self._mappings.get(asid, {}).items():
            if _intersects(start, length, iova, size):
                return start, length
        return None


def _uint(value: int, bits: int, what: str) -> int:
    # ctypes wraps out-of-range values silently; a wrapped feature word or address would be obeyed.
    if not 0 <= value < 1 << bits:
        raise ValueError(f"{what} {value:#x} is not a u{bits}")
    return value


def _intersects(a: int, a_size: int, b: int, b_size: int) -> bool:
    return a < b + b_size and b < a + a_size


def _iotlb_msg(
    msg_type: int, asid: int, iova: int = 0, size: int = 0, uaddr: int = 0, perm: int = 0
) -> uapi.vhost_msg_v2:
    msg = uapi.vhost_msg_v2(type=uapi.VHOST_IOTLB_MSG_V2, asid=_uint(asid, 32, "asid"))
    msg.iotlb.iova = _uint(iova, 64, "iova")
    msg.iotlb.size = _uint(size, 64, "size")
    msg.iotlb.uaddr = _uint(uaddr, 64, "uaddr")
    msg.iotlb.perm, msg.iotlb.type = _uint(perm, 8, "perm"), msg_type
    return msg


def _describe(msg: uapi.vhost_msg_v2) -> str | None:
    t = msg.iotlb
    if t.type in (uapi.VHOST_IOTLB_BATCH_BEGIN, uapi.VHOST_IOTLB_BATCH_END):
        return f"asid {msg.asid}"
    return f"iova {t.iova:#x} size {t.size:#x} uaddr {t.uaddr:#x} perm {t.perm} asid {msg.asid}"
