"""SoftDevice: a software vDPA device that stands where an open /dev/vhost-vdpa-N stands.

It implements vdpa_svq.device.Device with kernel_iface.VhostVdpa's semantics, and
fails the way the kernel does, through kernel_iface.errors.error_from_errno. Where the kernel
answers misuse with a bare EFAULT or lets it through, this device is stricter on purpose, so that
session bugs show up in unit tests: DRIVER_OK without FEATURES_OK is EINVAL, and changing a
running ring (NUM/ADDR/BASE without suspend) is EBUSY. Subclasses give the device type: its id,
queues, feature bits, config space, and `process()` (the datapath work).

Access rules mirror vhost_vdpa_unlocked_ioctl: the vring ioctls and IOTLB messages need the owner
(else EPERM); features, status, config and suspend/resume do not.
"""

from __future__ import annotations

import errno
import os
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import ClassVar, TypeVar

from kernel_iface import errors, uapi
from kernel_iface.device import IovaRange, PackedVringBase
from vdpa_svq.errors import GuestMemoryError, RingError
from vdpa_svq.ring import Chain, Layout, PackedDeviceRing, RingAddresses, SplitDeviceRing
from vdpa_svq.ring.layout import desc_area_size, device_area_size
from vdpa_svq.softdev.datapath import Datapath
from vdpa_svq.softdev.iotlb import IotlbMemory
from vdpa_svq.softdev.queue import QueueStats, SoftQueue

DEFAULT_VRING_NUM = 1024
FULL_IOVA_RANGE = IovaRange(0, (1 << 64) - 1)

# What a device-side queue fault looks like: the driver broke a ring rule (RingError), or the
# device was sent where its IOTLB does not let it go (GuestMemoryError, incl. IotlbFault).
QUEUE_FAULTS = (RingError, GuestMemoryError)

T = TypeVar("T")


class DeviceLock:
    """The device lock, re-entrant. Whoever takes it gets the rings in Python's hands: a datapath
    that runs in C (SoftNetDevice's) hands them back first (`on_acquire`). The datapath thread
    takes `raw`, the same lock without the hand-back, since it is the one that hands them out."""

    def __init__(self, on_acquire: Callable[[], None]) -> None:
        self.raw = threading.RLock()
        self._on_acquire = on_acquire

    def __enter__(self) -> None:
        self.raw.acquire()
        try:
            self._on_acquire()
        except BaseException:
            self.raw.release()
            raise

    def __exit__(self, *exc_info: object) -> None:
        self.raw.release()


class SoftDevice:
    """Base of the soft devices. Not thread-safe for concurrent control calls (neither is an fd)."""

    DEVICE_ID: ClassVar[int] = 0
    KIND: ClassVar[str] = "soft"
    QUEUE_NAMES: ClassVar[tuple[str, ...]] = ()
    DEVICE_FEATURES: ClassVar[int] = 0  # device-type feature bits (VIRTIO_NET_F_*, VIRTIO_BLK_F_*)

    def __init__(
        self,
        *,
        packed: bool = True,
        event_idx: bool = True,
        indirect: bool = True,
        vring_num: int = DEFAULT_VRING_NUM,
        suspend: bool = True,
        iova_range: IovaRange = FULL_IOVA_RANGE,
        path: str | None = None,
    ) -> None:
        self.path = path or f"soft:{self.KIND}"
        features = uapi.bit(uapi.VIRTIO_F_VERSION_1) | uapi.bit(uapi.VIRTIO_F_ACCESS_PLATFORM) | self.DEVICE_FEATURES
        for on, bit in (
            (packed, uapi.VIRTIO_F_RING_PACKED),
            (event_idx, uapi.VIRTIO_RING_F_EVENT_IDX),
            (indirect, uapi.VIRTIO_RING_F_INDIRECT_DESC),
        ):
            if on:
                features |= uapi.bit(bit)
        self._offered = features
        backend = uapi.bit(uapi.VHOST_BACKEND_F_IOTLB_MSG_V2) | uapi.bit(uapi.VHOST_BACKEND_F_IOTLB_BATCH)
        if suspend:
            backend |= uapi.bit(uapi.VHOST_BACKEND_F_SUSPEND) | uapi.bit(uapi.VHOST_BACKEND_F_RESUME)
        self._offered_backend = backend
        self._vring_num = vring_num
        self._iova_range = iova_range
        self.acked_backend_features = 0
        self.mem = IotlbMemory(self.path, iova_range)
        self.queues = [SoftQueue(i, name) for i, name in enumerate(self.QUEUE_NAMES)]
        self.lock = DeviceLock(self.take_back_rings)
        self._owner = False
        self._closed = False
        self._features = 0
        self._status = 0
        self._suspended = False
        self._datapath: Datapath | None = None
        self.datapath_error: BaseException | None = None

    # -- helpers ---------------------------------------------------------------------------------
    def _fail(self, err: int, op: str, detail: str | None = None) -> errors.VdpaError:
        return errors.error_from_errno(err, op, self.path, detail)

    def _check_open(self) -> None:
        if self._closed:
            raise ValueError(f"{self.path}: device is closed")

    def _check_owner(self, op: str) -> None:
        self._check_open()
        if not self._owner:
            raise self._fail(errno.EPERM, op)

    def _queue(self, op: str, index: int) -> SoftQueue:
        self._check_owner(op)
        if not 0 <= index < len(self.queues):
            # vhost_vdpa_vring_ioctl: "if (idx >= v->nvqs) return -ENOBUFS;"
            raise self._fail(errno.ENOBUFS, op, f"vq {index} of {len(self.queues)}")
        return self.queues[index]

    def _has(self, bit: int) -> bool:
        return bool(self._features >> bit & 1)

    @property
    def running(self) -> bool:
        """DRIVER_OK and not suspended: the datapath may touch the rings."""
        return bool(self._status & uapi.VIRTIO_CONFIG_S_DRIVER_OK) and not self._suspended

    @staticmethod
    def _check_uint(value: int, bits: int, what: str) -> int:
        if not 0 <= value < 1 << bits:
            raise ValueError(f"{what} {value:#x} does not fit in {bits} bits")
        return value

    # -- lifetime --------------------------------------------------------------------------------
    @property
    def closed(self) -> bool:
        return self._closed

    def close(self) -> None:
        if self._closed:
            return
        self._reset()
        with self.lock:
            for q in self.queues:
                q.close()
            self._closed = True

    def __enter__(self) -> SoftDevice:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.path!r}, status={self._status:#x})"

    # -- ownership and features ------------------------------------------------------------------
    def set_owner(self) -> None:
        self._check_open()
        if self._owner:
            raise self._fail(errno.EBUSY, "VHOST_SET_OWNER")
        self._owner = True

    def get_features(self) -> int:
        self._check_open()
        return self._offered

    def set_features(self, features: int) -> None:
        self._check_open()
        self._check_uint(features, 64, "features")
        op = "VHOST_SET_FEATURES"
        if self._status & uapi.VIRTIO_CONFIG_S_FEATURES_OK:
            raise self._fail(errno.EBUSY, op, "features already negotiated (FEATURES_OK)")
        if features & ~self._offered:
            raise self._fail(errno.EINVAL, op, f"bits {features & ~self._offered:#x} not offered")
        self._features = features

    @property
    def acked_features(self) -> int:
        return self._features

    def get_backend_features(self) -> int:
        self._check_open()
        return self._offered_backend

    def set_backend_features(self, features: int) -> None:
        self._check_open()
        self._check_uint(features, 64, "backend features")
        if features & ~self._offered_backend:
            raise self._fail(
                errno.EOPNOTSUPP, "VHOST_SET_BACKEND_FEATURES", f"bits {features & ~self._offered_backend:#x}"
            )
        self.acked_backend_features = features

    def has_backend_feature(self, bit: int) -> bool:
        return bool(self.acked_backend_features >> bit & 1)

    # -- device ----------------------------------------------------------------------------------
    def device_id(self) -> int:
        self._check_open()
        return self.DEVICE_ID

    def get_status(self) -> int:
        self._check_open()
        return self._status

    def set_status(self, status: int) -> None:
        self._check_open()
        self._check_uint(status, 8, "status")
        op = "VHOST_VDPA_SET_STATUS"
        if status == 0:
            self._reset()
            return
        with self.lock:
            old = self._status
            # vhost_vdpa_set_status: bits can only be cleared by a reset.
            if old & ~status:
                raise self._fail(errno.EINVAL, op, f"{old:#x} -> {status:#x} clears bits without a reset")
            new = status & ~old
            if new & uapi.VIRTIO_CONFIG_S_DRIVER_OK and not status & uapi.VIRTIO_CONFIG_S_FEATURES_OK:
                raise self._fail(errno.EINVAL, op, "DRIVER_OK before FEATURES_OK")
            if new & uapi.VIRTIO_CONFIG_S_FEATURES_OK and not self._has(uapi.VIRTIO_F_VERSION_1):
                # A modern-only device refuses the features: FEATURES_OK does not stick (3.1.1).
                status &= ~uapi.VIRTIO_CONFIG_S_FEATURES_OK
            self._status = status
            if new & uapi.VIRTIO_CONFIG_S_DRIVER_OK:
                for q in self.queues:
                    self._start_ring(q)
                self._datapath = Datapath(self)
                self._datapath.start()

    def _reset(self) -> None:
        """Status 0: stop the datapath, forget rings, features and IOTLB (backend features and
        the vring eventfds stay, as they belong to the vhost fd, not the device)."""
        dp, self._datapath = self._datapath, None
        if dp is not None:
            with self.lock:
                self._status = 0  # the thread sees `running` false from here on
            dp.stop()  # outside the lock: the thread needs it to finish its pass
        with self.lock:
            self._status = 0
            self._features = 0
            self._suspended = False
            self.datapath_error = None
            for q in self.queues:
                q.forget()
            self.mem.clear()

    def datapath_died(self, exc: BaseException) -> None:
        """Called by the datapath thread on an unexpected exception: keep it, ask for a reset
        (DEVICE_NEEDS_RESET, 2.1.1), and break every queue so that err eventfds tell the driver."""
        with self.lock:
            self.datapath_error = exc
            self._status |= uapi.VIRTIO_CONFIG_S_NEEDS_RESET
            for q in self.queues:
                self.break_queue(q, exc, f"datapath thread died ({type(exc).__name__}): ")

    def config(self) -> bytes:
        """The device config space (subclasses)."""
        return b""

    def config_size(self) -> int:
        self._check_open()
        return len(self.config())

    def get_config(self, offset: int = 0, length: int | None = None) -> bytes:
        self._check_open()
        cfg = self.config()
        if length is None:
            length = len(cfg) - offset
        if offset < 0 or length <= 0:
            raise ValueError(f"bad config range: offset {offset}, length {length}")
        self._check_config_range("VHOST_VDPA_GET_CONFIG", offset, length, len(cfg))
        return cfg[offset : offset + length]

    def set_config(self, offset: int, data: bytes) -> None:
        self._check_open()
        if offset < 0 or not data:
            raise ValueError(f"bad config range: offset {offset}, length {len(data)}")
        self._check_config_range("VHOST_VDPA_SET_CONFIG", offset, len(data), len(self.config()))
        self.write_config(offset, data)

    def write_config(self, offset: int, data: bytes) -> None:
        """Driver writes to config space: ignored unless a device type has writable fields."""

    def _check_config_range(self, op: str, offset: int, length: int, size: int) -> None:
        # vhost_vdpa_config_validate
        if offset > size:
            raise self._fail(errno.EINVAL, op, f"offset {offset} > config size {size}")
        if length > size - offset:
            raise self._fail(errno.E2BIG, op, f"{length} bytes at {offset}, config size {size}")

    def vqs_count(self) -> int:
        self._check_open()
        return len(self.queues)

    def suspend(self) -> None:
        self._check_open()
        if not self._offered_backend & uapi.bit(uapi.VHOST_BACKEND_F_SUSPEND):
            raise self._fail(errno.EOPNOTSUPP, "VHOST_VDPA_SUSPEND")
        with self.lock:
            if not self._status & uapi.VIRTIO_CONFIG_S_DRIVER_OK:
                return  # as vhost_vdpa_suspend: nothing runs yet
            # Holding the lock: the datapath is between passes, and every used buffer was signalled.
            self._suspended = True
            for q in self.queues:
                q.stop_ring()

    def resume(self) -> None:
        self._check_open()
        if not self._offered_backend & uapi.bit(uapi.VHOST_BACKEND_F_RESUME):
            raise self._fail(errno.EOPNOTSUPP, "VHOST_VDPA_RESUME")
        with self.lock:
            if not self._status & uapi.VIRTIO_CONFIG_S_DRIVER_OK or not self._suspended:
                return
            self._suspended = False
            for q in self.queues:
                self._start_ring(q)
            if self._datapath is not None:
                self._datapath.poke()

    @property
    def suspended(self) -> bool:
        return self._suspended

    # -- virtqueues ------------------------------------------------------------------------------
    def vring_num(self) -> int:
        self._check_open()
        return self._vring_num

    def vring_size(self, index: int) -> int:
        self._queue("VHOST_VDPA_GET_VRING_SIZE", index)
        return self._vring_num

    # -- groups and address spaces: not modelled (one address space, as without the ioctls) ---------
    def as_num(self) -> int:
        self._check_open()
        raise self._fail(errno.EOPNOTSUPP, "VHOST_VDPA_GET_AS_NUM", "a software device has one address space")

    def group_num(self) -> int:
        self._check_open()
        raise self._fail(errno.EOPNOTSUPP, "VHOST_VDPA_GET_GROUP_NUM", "a software device has no queue groups")

    def vring_group(self, index: int) -> int:
        self._queue("VHOST_VDPA_GET_VRING_GROUP", index)
        raise self._fail(errno.EOPNOTSUPP, "VHOST_VDPA_GET_VRING_GROUP", "a software device has no queue groups")

    def _check_stopped(self, op: str, q: SoftQueue) -> None:
        if q.ring is not None:
            raise self._fail(errno.EBUSY, op, f"vq {q.index} is running (suspend the device first)")

    def set_vring_num(self, index: int, num: int) -> None:
        op = "VHOST_SET_VRING_NUM"
        q = self._queue(op, index)
        with self.lock:
            self._check_stopped(op, q)
            # vhost_vring_set_num: non-zero power of two; and no larger than the device allows.
            if not num or num > self._vring_num or num & (num - 1):
                raise self._fail(errno.EINVAL, op, f"num {num} (max {self._vring_num}, power of two)")
            q.num = num

    def set_vring_addr(self, index: int, desc: int, avail: int, used: int, *, flags: int = 0, log: int = 0) -> None:
        """IOVAs of the three areas; for packed rings avail/used are the driver/device event areas."""
        op = "VHOST_SET_VRING_ADDR"
        q = self._queue(op, index)
        for v, what in ((desc, "desc"), (avail, "avail"), (used, "used"), (log, "log")):
            self._check_uint(v, 64, what)
        with self.lock:
            self._check_stopped(op, q)
            # vhost_vring_set_addr's alignment checks.
            if (
                desc & (uapi.VRING_DESC_ALIGN_SIZE - 1)
                or avail & (uapi.VRING_AVAIL_ALIGN_SIZE - 1)
                or (used & (uapi.VRING_USED_ALIGN_SIZE - 1))
            ):
                raise self._fail(errno.EINVAL, op, f"misaligned desc {desc:#x} avail {avail:#x} used {used:#x}")
            q.addrs = RingAddresses(desc, avail, used)

    def set_vring_base(self, index: int, num: int) -> None:
        """Split: last_avail_idx. Packed: PackedVringBase(...).to_num() (needs RING_PACKED acked)."""
        op = "VHOST_SET_VRING_BASE"
        q = self._queue(op, index)
        self._check_uint(num, 32, "vring base")
        with self.lock:
            self._check_stopped(op, q)
            if self._has(uapi.VIRTIO_F_RING_PACKED):
                b = PackedVringBase.from_num(num)
                if q.num and max(b.last_avail_idx, b.last_used_idx) >= q.num:
                    raise self._fail(errno.EINVAL, op, f"{b} out of range for ring size {q.num}")
            elif num > 0xFFFF:
                raise self._fail(errno.EINVAL, op, f"split base {num:#x} > 0xffff")
            q.base = num

    def get_vring_base(self, index: int) -> int:
        """The raw u32; decode packed rings with PackedVringBase.from_num."""
        q = self._queue("VHOST_GET_VRING_BASE", index)
        with self.lock:
            return q.ring_base()

    def _eventfd(self, op: str, fd: int) -> int:
        """Our own reference to the caller's eventfd (-1 stays -1), as eventfd_ctx_fdget takes one."""
        if fd == -1:
            return -1
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            raise self._fail(errno.EBADF, op, f"fd {fd}") from None
        if target != "anon_inode:[eventfd]":
            raise self._fail(errno.EINVAL, op, f"fd {fd} is {target}, not an eventfd")
        return os.dup(fd)

    def set_vring_kick(self, index: int, fd: int) -> None:
        op = "VHOST_SET_VRING_KICK"
        q = self._queue(op, index)
        new = self._eventfd(op, fd)
        if new >= 0:
            # Shared file status flag: the kick side only ever writes, and we must never block.
            os.set_blocking(new, False)
        with self.lock:
            if self._datapath is not None:
                self._datapath.unwatch(q)
            q.set_fd("kick_fd", new)
            if self._datapath is not None:
                self._datapath.watch(q)
                self._datapath.poke()

    def set_vring_call(self, index: int, fd: int) -> None:
        op = "VHOST_SET_VRING_CALL"
        q = self._queue(op, index)
        new = self._eventfd(op, fd)
        with self.lock:
            q.set_fd("call_fd", new)

    def set_vring_err(self, index: int, fd: int) -> None:
        """Eventfd signalled when the queue breaks (the reason is in queue_errors())."""
        op = "VHOST_SET_VRING_ERR"
        q = self._queue(op, index)
        new = self._eventfd(op, fd)
        with self.lock:
            q.set_fd("err_fd", new)

    def set_vring_enable(self, index: int, enable: bool = True) -> None:
        q = self._queue("VHOST_VDPA_SET_VRING_ENABLE", index)
        with self.lock:
            q.enabled = bool(enable)
            if not self.running:
                return
            if enable:
                self._start_ring(q)
                if self._datapath is not None:
                    self._datapath.poke()
            else:
                q.stop_ring()

    def _start_ring(self, q: SoftQueue) -> None:
        """Build the device ring of an enabled, configured queue over the IOTLB (DRIVER_OK/resume).

        The ring areas are translated once, here (as hardware vDPA devices do at DRIVER_OK); a
        queue whose areas are unmapped, or whose device-written parts are read-only, breaks now.
        """
        if q.ring is not None or q.error is not None or not q.enabled or not q.num or q.addrs is None:
            return
        packed = self._has(uapi.VIRTIO_F_RING_PACKED)
        layout = Layout.PACKED if packed else Layout.SPLIT
        event_idx = self._has(uapi.VIRTIO_RING_F_EVENT_IDX)
        a = q.addrs
        # The device writes the used ring (split) / the descriptors and its event area (packed).
        written = (
            [(a.desc, desc_area_size(q.num)), (a.device, device_area_size(layout, q.num))]
            if packed
            else [(a.device, device_area_size(layout, q.num))]
        )
        try:
            for addr, size in written:
                if not self.mem.writable(addr, size):
                    raise GuestMemoryError(addr, size, "ring area the device writes is not writable in its IOTLB")
            if packed:
                b = PackedVringBase.from_num(q.base)
                q.ring = PackedDeviceRing(
                    self.mem,  # type: ignore[arg-type]  # duck-typed GuestMemory
                    q.num,
                    a,
                    event_idx=event_idx,
                    name=q.name,
                    next_avail_idx=b.last_avail_idx,
                    avail_wrap_counter=int(b.avail_wrap_counter),
                    next_used_idx=b.last_used_idx,
                    used_wrap_counter=int(b.used_wrap_counter),
                )
            else:
                # The device completes in order and holds nothing, so used idx = last avail idx
                # (as vdpa_sim sets last_used_idx in vdpasim_queue_ready).
                q.ring = SplitDeviceRing(
                    self.mem,  # type: ignore[arg-type]
                    q.num,
                    a,
                    event_idx=event_idx,
                    name=q.name,
                    last_avail_idx=q.base,
                    used_idx=q.base,
                )
        except (GuestMemoryError, ValueError) as e:
            self.break_queue(q, e, "cannot start ring: ")

    # -- datapath helpers for subclasses (called by the thread with the lock held) ----------------
    def process(self) -> bool:
        """Do all the work the queues allow now; True if anything moved (subclasses)."""
        return False

    def service_fast(self) -> bool:
        """A service pass by a datapath of the subclass's own (in C); False: do it in Python."""
        return False

    def take_back_rings(self) -> None:
        """Called with the lock just taken: make the Python rings and stats current (subclasses
        whose datapath keeps them elsewhere)."""

    def inline_kick(self, index: int) -> Callable[[], None] | None:
        """A kick of queue `index` that a driver in this process may call instead of writing the
        kick eventfd (served in the caller's thread), or None: use the eventfd."""
        return None

    def hangup_fd(self) -> int | None:
        """None: a device in this process cannot go away under its user."""
        return None

    def check_alive(self) -> None:
        """Nothing to check (hangup_fd() is None)."""

    def guard(self, q: SoftQueue, fn: Callable[[], T]) -> T | None:
        """fn() on queue q's behalf; a fault breaks q (recorded) and returns None."""
        try:
            return fn()
        except QUEUE_FAULTS as e:
            self.break_queue(q, e)
            return None

    def break_queue(self, q: SoftQueue, exc: BaseException, context: str = "") -> None:
        """Mark q broken for good (until reset) with the reason, and tell the driver on its err fd."""
        if q.error is None:
            # A RingError already names its queue; anything else gets the name in front.
            q.error = f"{context}{exc}" if isinstance(exc, RingError) else f"{q.name}: {context}{exc}"
            if q.err_fd >= 0:
                os.eventfd_write(q.err_fd, 1)
        if q.ring is not None:
            q.ring.broken = True

    def pop(self, q: SoftQueue) -> Chain | None:
        """The next available chain of q, or None (nothing there, or q just broke)."""
        if not q.usable:
            return None
        chain = self.guard(q, q.ring.pop)  # type: ignore[union-attr]
        if chain is not None and chain.indirect and not self._has(uapi.VIRTIO_RING_F_INDIRECT_DESC):
            self.break_queue(q, RingError(q.name, "indirect descriptor without VIRTIO_RING_F_INDIRECT_DESC"))
            return None
        return chain

    def push(self, q: SoftQueue, chain: Chain, written: int, *, read: int = 0) -> None:
        self.guard(q, lambda: q.ring.push_used(chain, written))  # type: ignore[union-attr]
        q.stats.chains += 1
        q.stats.read_bytes += read
        q.stats.written_bytes += written

    # -- status for tests and the CLI --------------------------------------------------------------
    def queue_errors(self) -> dict[int, str]:
        """Broken queues: index -> reason."""
        with self.lock:
            return {q.index: q.error for q in self.queues if q.error is not None}

    def stats(self) -> dict[str, QueueStats]:
        """A copy of each queue's counters, by queue name."""
        with self.lock:
            return {q.name: QueueStats(**vars(q.stats)) for q in self.queues}

    def faults(self) -> dict[int, str]:
        """Device.faults: the broken queues, index -> reason (a dead datapath broke them all)."""
        return self.queue_errors()

    def activity(self) -> list[str]:
        """A line per queue: what it moved."""
        return [f"{name}: {st.chains} chains, {st.kicks} kicks, {st.calls} calls, {st.dropped} dropped"
                for name, st in self.stats().items()]

    # -- IOTLB -----------------------------------------------------------------------------------
    def iova_range(self) -> IovaRange:
        self._check_open()
        return self._iova_range

    def _check_asid(self, asid: int) -> None:
        if asid:
            raise ValueError(f"asid {asid} needs VHOST_BACKEND_F_IOTLB_ASID, which {self.path} does not offer")

    def iotlb_update(self, iova: int, size: int, uaddr: int, perm: int = uapi.VHOST_ACCESS_RW, asid: int = 0) -> None:
        """Map [iova, iova + size) to this process's address `uaddr` (which must stay mapped)."""
        self._check_owner(errors.IOTLB_UPDATE)
        self._check_asid(asid)
        self.mem.update(iova, size, uaddr, perm)

    def iotlb_invalidate(self, iova: int, size: int, asid: int = 0) -> None:
        """Unmap every mapping that intersects [iova, iova + size)."""
        self._check_owner(errors.IOTLB_INVALIDATE)
        self._check_asid(asid)
        self.mem.invalidate(iova, size)

    @contextmanager
    def iotlb_batch(self, asid: int = 0) -> Iterator[None]:
        """Updates inside reach the device together at the end; a no-op without IOTLB_BATCH acked."""
        if not self.has_backend_feature(uapi.VHOST_BACKEND_F_IOTLB_BATCH):
            yield
            return
        self._check_owner(errors.IOTLB_BATCH_BEGIN)
        self._check_asid(asid)
        self.mem.begin_batch()
        try:
            yield
        finally:
            self.mem.end_batch()
