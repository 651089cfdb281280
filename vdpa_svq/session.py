"""The device session: the one place that orders a vhost-vdpa device's lifecycle.

reset -> ACKNOWLEDGE|DRIVER -> features -> FEATURES_OK -> memory maps -> vrings -> DRIVER_OK, and
back to reset on close (which also removes every map and closes every eventfd it made), whatever
state the device was left in. Mid-life, the two moves of ring state between the guest's rings and
the shadow relay: DeviceSession.take_over (a device running on the guest's rings -> state to shadow
from) and ShadowSession.hand_back (a relay that stops -> where each guest ring restarts), with the
one rewind rule, rewound(). The in-process guest's live switch (attach.py) and each vhost-user
connection (vhost_user/backend.py) call them. The device is any vdpa_svq.device.Device: a kernel_iface.VhostVdpa,
a software device (vdpa_svq.softdev), a vhost-user backend (vdpa_svq.vhost_user.device).
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import select
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from kernel_iface import PACKED_VRING_BASE_INITIAL, NotSupported, VdpaError, uapi
from kernel_iface.uapi import bit
from vdpa_svq.control import CONTROL_RING_NUM, ControlQueue
from vdpa_svq.device import Device
from vdpa_svq.dirty import DirtyBitmap
from vdpa_svq.errors import DeviceRingError, VdpaSvqError
from vdpa_svq.guest.queue import GuestQueue
from vdpa_svq.loop import EventfdNotifier, Polling, RelayLoops
from vdpa_svq.memory.guest import PAGE_SIZE, GuestMemory, page_align
from vdpa_svq.memory.iova import IovaMap
from vdpa_svq.relay_impl import Relay, make_shadow_virtqueue
from vdpa_svq.ring import IndirectArea, RingState, device_ring, driver_ring
from vdpa_svq.ring.layout import (
    USED_IDX,
    Layout,
    RingAddresses,
    check_size,
    desc_area_size,
    device_area_size,
    driver_area_size,
)

log = logging.getLogger("vdpa_svq.session")

# Transport and ring features the project's rings implement, each for a reason:
RING_FEATURES = {
    uapi.VIRTIO_F_VERSION_1: "modern little-endian layout; the rings assume it",
    uapi.VIRTIO_F_ACCESS_PLATFORM: "vhost-vdpa translates every address through its IOTLB",
    uapi.VIRTIO_F_RING_PACKED: "packed layout (2.8)",
    uapi.VIRTIO_RING_F_EVENT_IDX: "notification suppression by event index",
    uapi.VIRTIO_RING_F_INDIRECT_DESC: "indirect descriptor tables",
}
# Backend features the session acks when offered; the others change semantics we don't handle.
BACKEND_FEATURES = (
    uapi.VHOST_BACKEND_F_IOTLB_MSG_V2,
    uapi.VHOST_BACKEND_F_IOTLB_BATCH,
    uapi.VHOST_BACKEND_F_SUSPEND,
    uapi.VHOST_BACKEND_F_RESUME,
)


SHADOW_INDIRECT_MAX = 64  # longest chain the shadow ring carries as one indirect table


class SessionError(VdpaSvqError):
    """A device that cannot be driven the way it was asked (not a kernel errno: a policy reason)."""


def device_fault(device: Device, index: int) -> str:
    """Why the device says queue `index` broke, as far as it keeps an account (Device.faults)."""
    unknown = "it signalled the queue's error eventfd"
    try:
        return device.faults().get(index, unknown)
    except NotSupported:
        return unknown


def _notifier(fd: int | None, owned: list[int]) -> int:
    """`fd`, a notifier someone else owns; when None, a new eventfd added to `owned` (closed by close())."""
    if fd is None:
        fd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        owned.append(fd)
    return fd


@dataclass
class Queue:
    """One virtqueue as the session set it up on the device."""

    index: int
    layout: Layout
    num: int
    addrs: RingAddresses
    kick_fd: int
    call_fd: int
    err_fd: int = -1  # the device signals it when the queue breaks (VHOST_SET_VRING_ERR)

    def kick(self) -> None:
        os.eventfd_write(self.kick_fd, 1)

    def wait_call(self, timeout: float) -> bool:
        """Wait for the device's used-buffer notification (its call); True if one came (consumed)."""
        ready, _, _ = select.select([self.call_fd], [], [], timeout)
        if not ready:
            return False
        os.eventfd_read(self.call_fd)
        return True


@dataclass
class DeviceSession:
    """Bring `device` up; guest memory is mapped 1:1 (IOVA = guest-physical address).

    `packed`: True/False to insist on a layout, None to take packed when the device offers it.
    `event_idx`: ask for EVENT_IDX when offered. `extra_features`: device-specific bits wanted.
    """

    device: Device
    packed: bool | None = None
    event_idx: bool = True
    indirect: bool = True
    extra_features: int = 0
    features: int = 0
    backend_features: int = 0
    queues: dict[int, Queue] = field(default_factory=dict)
    _mapped: list[tuple[int, int]] = field(default_factory=list)
    _fds: list[int] = field(default_factory=list)
    _started: bool = False
    _owned: bool = False

    # -- negotiation -------------------------------------------------------------------------
    def negotiate(self) -> int:
        """Features and backend features, then FEATURES_OK. Again after stop() to reconfigure."""
        dev = self.device
        if not self._owned:
            dev.set_owner()
            self._owned = True
        offered_backend = dev.get_backend_features()
        if not offered_backend & bit(uapi.VHOST_BACKEND_F_IOTLB_MSG_V2):
            raise SessionError(f"{dev.path}: device does not offer IOTLB v2 messages (VHOST_BACKEND_F_IOTLB_MSG_V2)")
        want_backend = sum(bit(b) for b in BACKEND_FEATURES)
        self.backend_features = offered_backend & want_backend
        dev.set_backend_features(self.backend_features)
        offered = dev.get_features()
        for must in (uapi.VIRTIO_F_VERSION_1, uapi.VIRTIO_F_ACCESS_PLATFORM):
            if not offered & bit(must):
                raise SessionError(f"{dev.path}: device lacks {uapi.decode_features(bit(must))[0]}, which vDPA needs")
        self.features = offered & self.wanted
        if self.packed and not self.features & bit(uapi.VIRTIO_F_RING_PACKED):
            raise SessionError(f"{dev.path}: packed layout asked for, but the device offers only split rings")
        dev.set_status(0)
        dev.set_status(uapi.VIRTIO_CONFIG_S_ACKNOWLEDGE | uapi.VIRTIO_CONFIG_S_DRIVER)
        dev.set_features(self.features)
        status = uapi.VIRTIO_CONFIG_S_ACKNOWLEDGE | uapi.VIRTIO_CONFIG_S_DRIVER | uapi.VIRTIO_CONFIG_S_FEATURES_OK
        dev.set_status(status)
        if not dev.get_status() & uapi.VIRTIO_CONFIG_S_FEATURES_OK:
            raise SessionError(f"{dev.path}: device refused features {self.features:#x} (FEATURES_OK cleared)")
        return self.features

    @property
    def wanted(self) -> int:
        """The features negotiate() takes when the device offers them."""
        want = bit(uapi.VIRTIO_F_VERSION_1) | bit(uapi.VIRTIO_F_ACCESS_PLATFORM) | self.extra_features
        if self.packed is not False:
            want |= bit(uapi.VIRTIO_F_RING_PACKED)
        if self.event_idx:
            want |= bit(uapi.VIRTIO_RING_F_EVENT_IDX)
        if self.indirect:
            want |= bit(uapi.VIRTIO_RING_F_INDIRECT_DESC)
        return want

    def has(self, feature_bit: int) -> bool:
        return bool(self.features & bit(feature_bit))

    @property
    def layout(self) -> Layout:
        return Layout.PACKED if self.has(uapi.VIRTIO_F_RING_PACKED) else Layout.SPLIT

    # -- memory ------------------------------------------------------------------------------
    def map(self, iova: int, size: int, hva: int, perm: int) -> None:
        """Map [iova, iova+size) to our address hva; close() removes it again."""
        self.device.iotlb_update(iova, size, hva, perm)
        self._mapped.append((iova, size))

    def map_memory(self, mem: GuestMemory) -> None:
        """Map every guest memory region into the device's IOVA space at its guest-physical address."""
        with self.device.iotlb_batch():
            for region in mem:
                self.map(region.gpa, region.size, region.hva, uapi.VHOST_ACCESS_RW)

    # -- queues ------------------------------------------------------------------------------
    def setup_queue(
        self,
        index: int,
        num: int,
        addrs: RingAddresses,
        *,
        base: int | None = None,
        kick_fd: int | None = None,
        call_fd: int | None = None,
    ) -> Queue:
        """Point queue `index` at a ring. `base` is the vring base (initial state when None);
        `kick_fd`/`call_fd` are notifiers someone else owns (a guest's), else the session makes them."""
        dev = self.device
        max_num = dev.vring_num()
        if num > max_num:
            raise SessionError(f"{dev.path}: queue {index} size {num} > device maximum {max_num}")
        dev.set_vring_num(index, num)
        dev.set_vring_addr(index, addrs.desc, addrs.driver, addrs.device)
        if base is None:
            base = PACKED_VRING_BASE_INITIAL.to_num() if self.layout is Layout.PACKED else 0
        dev.set_vring_base(index, base)
        kick, call = _notifier(kick_fd, self._fds), _notifier(call_fd, self._fds)
        err = _notifier(None, self._fds)
        dev.set_vring_kick(index, kick)
        dev.set_vring_call(index, call)
        dev.set_vring_err(index, err)
        dev.set_vring_enable(index, True)
        q = Queue(index, self.layout, num, addrs, kick, call, err)
        self.queues[index] = q
        return q

    def start(self) -> None:
        status = (
            uapi.VIRTIO_CONFIG_S_ACKNOWLEDGE
            | uapi.VIRTIO_CONFIG_S_DRIVER
            | uapi.VIRTIO_CONFIG_S_FEATURES_OK
            | uapi.VIRTIO_CONFIG_S_DRIVER_OK
        )
        self.device.set_status(status)
        if self.device.get_status() & uapi.VIRTIO_CONFIG_S_FAILED:
            raise SessionError(f"{self.device.path}: device set FAILED after DRIVER_OK")
        self._started = True

    # -- live state ----------------------------------------------------------------------------
    def suspend(self) -> None:
        """Stop the device's datapath keeping its state (VHOST_VDPA_SUSPEND), or say why not."""
        if not self.backend_features & bit(uapi.VHOST_BACKEND_F_SUSPEND):
            raise SessionError(
                f"{self.device.path}: device cannot suspend (no VHOST_BACKEND_F_SUSPEND): its ring state "
                "cannot be taken over while it runs; start it shadowed instead"
            )
        self.device.suspend()

    def vring_base(self, index: int) -> int:
        """The device's ring position (VHOST_GET_VRING_BASE): split avail index, or packed state."""
        return self.device.get_vring_base(index)

    def quiesce(self) -> None:
        """Stop the device's datapath: suspend it when it can (its ring state kept), else reset it."""
        if self.backend_features & bit(uapi.VHOST_BACKEND_F_SUSPEND):
            self.suspend()
        else:
            self.device.set_status(0)

    def take_over(self, guest_mem: GuestMemory) -> list[RingState]:
        """Passthrough -> shadowed: stop the device on the guest's rings, return where each ring stands.

        Suspend (SessionError when the device cannot: then nothing changed), read each ring's
        position (VHOST_GET_VRING_BASE), reset the device and negotiate again: the states are where
        a ShadowSession starts relaying the guest's rings (add_queue's `guest_state`), index by queue.

        A packed base carries both halves, avail and used, with their wrap counters. A split base
        carries only the avail index (vhost_vring_state.num is last_avail_idx); the used index is
        what the device last wrote in the guest's used ring (idx of struct virtq_used, VIRTIO 1.2
        2.7.8), in `guest_mem`. The two differ by the buffers the device took and has not used:
        those would be lost, so the take-over is refused.
        """
        self.suspend()
        states = []
        for i, q in sorted(self.queues.items()):
            st = RingState.from_vring_base(self.layout, self.vring_base(i))
            if self.layout is Layout.SPLIT:
                used = int.from_bytes(guest_mem.read(q.addrs.device + USED_IDX, 2), "little")
                in_flight = (st.avail_idx - used) & 0xFFFF
                if in_flight:
                    raise SessionError(f"{self.device.path}: queue {i} has {in_flight} buffers in flight in the device")
                st = RingState(st.avail_idx, used)
            states.append(st)
        self.close()
        self.negotiate()
        return states

    # -- teardown ----------------------------------------------------------------------------
    def close(self) -> None:
        """Reset the device, remove our maps, close our eventfds. Safe to call twice.

        The device stays owned by this process (the fd is the caller's): negotiate() may follow.
        """
        dev = self.device
        errors: list[BaseException] = []
        try:
            dev.set_status(0)
        except VdpaError as e:
            errors.append(e)
        for index in list(self.queues):
            for setter in (dev.set_vring_kick, dev.set_vring_call, dev.set_vring_err):
                try:
                    setter(index, -1)
                except VdpaError as e:
                    errors.append(e)
        self.queues.clear()
        for gpa, size in self._mapped:
            try:
                dev.iotlb_invalidate(gpa, size)
            except VdpaError as e:
                errors.append(e)
        self._mapped.clear()
        for fd in self._fds:
            os.close(fd)
        self._fds.clear()
        self._started = False
        if errors:
            raise errors[0]

    def __enter__(self) -> DeviceSession:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def rewound(guest: RingState) -> RingState:
    """Where a guest ring restarts once the relay stopped: at the first buffer not used yet.

    The guest's ring holds, in order, buffers the device used (behind the used index) and buffers
    still available to it (VIRTIO 1.2 2.7.13-2.7.14 split, 2.8.21 packed: a buffer is the driver's
    again only once used). Those the relay took but the device never used (chains in the shadow ring,
    RX buffers waiting for frames, a chain held for room) die with the shadow ring; the guest
    still owns them as available, untouched in its ring, so whoever runs the ring next (the device
    in passthrough, the next relay) reads them again from there. Hence avail = used, at the used
    wrap counter for packed rings (2.8.1; split rings have no wrap counters), which is the
    vhost_vring_state VHOST_SET_VRING_BASE takes and VHOST_GET_VRING_BASE returns for a stopped
    ring. It assumes the device used buffers in the order they were made available (as QEMU's
    vhost-vdpa rewind of its shadow virtqueues does); ShadowSession.hand_back says when it need not.
    """
    return RingState(guest.used_idx, guest.used_idx, guest.used_wrap, guest.used_wrap)


@dataclass
class HandBack:
    """What ShadowSession.hand_back leaves behind."""

    # Queue index -> where its guest ring restarts (rewound). A queue that stopped with an error
    # is left out: its ring state is not known.
    states: dict[int, RingState]
    # Why the device could not be stopped before the last used buffers were taken, if it could not.
    quiesce_error: BaseException | None = None


@dataclass
class ShadowQueue:
    """One relayed queue: the guest's notifiers on one side, the device queue on the other."""

    index: int
    svq: Relay
    device_queue: Queue
    guest_kick_fd: int  # the guest writes it when it made buffers available
    guest_call_fd: int  # the relay writes it when the guest should look at its used buffers
    guest_err_fd: int | None = None  # the relay writes it when the device broke the queue


class ShadowSession:
    """Shadow virtqueues over a negotiated DeviceSession: the device sees only rings we own.

    Guest memory is mapped at IOVA = GPA (read-write: the device writes guest buffers); each
    shadow ring lives in memory vdpa-svq owns, at IOVAs above guest memory, one area per page so
    that the device gets write access only where the spec lets it write: the used ring (split),
    the descriptor ring and device event area (packed).
    """

    def __init__(
        self,
        dev: DeviceSession,
        guest_mem: GuestMemory,
        *,
        impl: str = "auto",
        dirty: DirtyBitmap | bool | None = True,
        poll_us: Polling = 0,
        relay_cpus: Sequence[int] = (),
        relay_threads: int | None = None,
    ) -> None:
        """`dirty`: True logs into a fresh bitmap over guest memory; a DirtyBitmap logs into that one
        (a vhost-user frontend's shared log); None logs nothing (sparse guest-physical spaces whose
        bitmap would be huge, when nobody asked for a log). `poll_us`: busy-poll the rings for this
        long after each burst before sleeping again (0: notifications only), or "auto" for a window
        the relay loop learns (loop.check_polling says what is valid). Queue pairs (queues 2p and
        2p+1) are relayed by `relay_threads` threads (loop.default_relay_threads when None: one per
        CPU of `relay_cpus`, else half the CPUs), pair p by thread p % relay_threads, which
        `relay_cpus` pins to relay_cpus[thread % len] (empty: unpinned)."""
        self.dev = dev
        self.guest_mem = guest_mem
        self.impl = impl
        rng = dev.device.iova_range()
        self.iova = IovaMap(rng.first, rng.last)
        for region in guest_mem:
            self.iova.add(region.gpa, region.size, region.gpa)
        dev.map_memory(guest_mem)
        self.dirty: DirtyBitmap | None = (
            DirtyBitmap(max(r.end for r in guest_mem)) if dirty is True else dirty or None
        )
        self.shadow_mem = GuestMemory()
        self.loop = RelayLoops(poll_us=poll_us, cpus=relay_cpus, threads=relay_threads)
        self.queues: dict[int, ShadowQueue] = {}
        self.control: ControlQueue | None = None  # the device's control queue, driven by us
        self._fds: list[int] = []
        self._rings: list[Any] = []

    def add_control_queue(self, index: int) -> ControlQueue:
        """Drive the device's control queue `index` ourselves (control.py): its ring and a command
        page in our memory above guest memory, like a shadow ring; before start()."""
        dev = self.dev
        addrs, _ = self._place_shadow_ring(index, CONTROL_RING_NUM, False)
        ring = driver_ring(dev.layout, self.shadow_mem, CONTROL_RING_NUM, addrs,
                           event_idx=dev.has(uapi.VIRTIO_RING_F_EVENT_IDX), name=f"control vq{index}")
        buf = self.iova.alloc(PAGE_SIZE)
        self.shadow_mem.add_memfd_region(buf, PAGE_SIZE, name="vdpa-svq-control")
        dev.map(buf, PAGE_SIZE, self.shadow_mem.hva(buf), uapi.VHOST_ACCESS_RW)  # the device writes the ack
        queue = GuestQueue.open(index, ring)
        self.control = ControlQueue(queue, self.shadow_mem, buf)
        dev.setup_queue(index, CONTROL_RING_NUM, addrs, kick_fd=queue.kick_fd, call_fd=queue.call_fd)
        return self.control

    def add_queue(
        self,
        index: int,
        guest_layout: Layout,
        guest_num: int,
        guest_addrs: RingAddresses,
        *,
        guest_event_idx: bool,
        shadow_num: int | None = None,
        guest_kick_fd: int | None = None,
        guest_call_fd: int | None = None,
        guest_err_fd: int | None = None,
        guest_state: RingState | None = None,
    ) -> ShadowQueue:
        """Relay the guest ring at `guest_addrs` through a new shadow ring on device queue `index`.

        `guest_kick_fd`/`guest_call_fd` are the guest's notifiers (made here when None), and
        `guest_err_fd` the eventfd that tells the guest the queue broke (none when None);
        `guest_state` is where the guest ring stands when it was running elsewhere before.
        """
        dev = self.dev
        num = shadow_num or min(dev.device.vring_num(), 256)
        indirect = dev.has(uapi.VIRTIO_RING_F_INDIRECT_DESC)
        addrs, indirect_area = self._place_shadow_ring(index, num, indirect)
        guest_ring = device_ring(
            guest_layout,
            self.guest_mem,
            guest_num,
            guest_addrs,
            event_idx=guest_event_idx,
            name=f"guest vq{index}",
            state=guest_state,
        )
        shadow_ring = driver_ring(
            dev.layout,
            self.shadow_mem,
            num,
            addrs,
            event_idx=dev.has(uapi.VIRTIO_RING_F_EVENT_IDX),
            indirect_area=indirect_area,
            name=f"shadow vq{index}",
        )
        self._rings += [guest_ring, shadow_ring]
        dq = dev.setup_queue(index, num, addrs)
        guest_kick, guest_call = _notifier(guest_kick_fd, self._fds), _notifier(guest_call_fd, self._fds)
        # A device in this process (the soft net device) may serve our kick in the relay's own
        # thread: no eventfd write, no wake-up of its thread.
        device_kick = dev.device.inline_kick(index) or EventfdNotifier(dq.kick_fd)
        svq = make_shadow_virtqueue(
            guest_ring,
            shadow_ring,
            self.iova,
            self.dirty,
            device_kick=device_kick,
            guest_call=EventfdNotifier(guest_call),
            indirect=indirect,
            name=f"svq{index}",
            impl=self.impl,
        )
        try:
            self.loop.add_relay(guest_kick, svq, "kick", pair=index // 2)
            self.loop.add_relay(dq.call_fd, svq, "call", pair=index // 2)
        except BaseException:
            svq.close()  # it holds views of the shadow memory, which close() must unmap
            raise
        q = ShadowQueue(index, svq, dq, guest_kick, guest_call, guest_err_fd)
        self.queues[index] = q
        self.loop.add(dq.err_fd, functools.partial(self._device_broke, q), pair=index // 2)
        return q

    def _device_broke(self, q: ShadowQueue) -> None:
        """The device signalled queue q's error eventfd: it stopped using the queue (a software
        device breaks one for a ring error; VIRTIO 1.2 2.1.2). Relaying on would forward buffers it
        never uses, so the queue stops here, at once and with the device's reason, and the guest
        hears of it through its own error eventfd (QEMU logs "vhost vring error in virtqueue N")."""
        if q.svq.error is not None:
            return
        reason = device_fault(self.dev.device, q.index)
        q.svq.error = DeviceRingError(q.svq.name, f"the device stopped queue {q.index}: {reason}")
        log.error("%s", q.svq.error)
        if q.guest_err_fd is not None:
            with contextlib.suppress(OSError):  # a full counter has a signal pending; a bad fd is the guest's
                os.eventfd_write(q.guest_err_fd, 1)

    def _place_shadow_ring(self, index: int, num: int, indirect: bool) -> tuple[RingAddresses, IndirectArea | None]:
        """Memory of our own for queue `index`'s shadow ring, above guest memory, mapped for the device.

        One page-aligned area per part (descriptor ring, driver area, device area, and the indirect
        tables when negotiated), so that the device gets write access only where the spec lets it
        write: split's used ring; packed's descriptor ring and device event area (VIRTIO 1.2 2.7, 2.8).
        """
        dev = self.dev
        layout = dev.layout
        check_size(layout, num)
        sizes = [desc_area_size(num), driver_area_size(layout, num), device_area_size(layout, num)]
        if indirect:
            sizes.append(IndirectArea.size(num, SHADOW_INDIRECT_MAX))
        spans = [page_align(n) for n in sizes]
        base = self.iova.alloc(sum(spans))
        self.shadow_mem.add_memfd_region(base, sum(spans), name=f"vdpa-svq-shadow{index}")
        starts = [base + sum(spans[:i]) for i in range(len(spans))]
        writable = (False, False, True, False) if layout is Layout.SPLIT else (True, False, True, False)
        with dev.device.iotlb_batch():
            for start, span, w in zip(starts, spans, writable, strict=False):
                perm = uapi.VHOST_ACCESS_RW if w else uapi.VHOST_ACCESS_RO
                dev.map(start, span, self.shadow_mem.hva(start), perm)
        indirect_area = IndirectArea(starts[3], SHADOW_INDIRECT_MAX) if indirect else None
        return RingAddresses(starts[0], starts[1], starts[2]), indirect_area

    def start(self) -> None:
        self.dev.start()
        # What the guest made available while nobody relayed (a handover: TX frames and RX buffers
        # left in its rings) goes to the device queue by queue, in index order, before the loop
        # serves the kicks in whatever order they come: a net device's RX buffers are there before
        # its first TX frame, which a loopback (vdpa_sim) would otherwise drop for want of one.
        for index in sorted(self.queues):
            self.queues[index].svq.on_guest_kick()
        self.loop.start()

    def errors(self) -> dict[int, str]:
        """Queues that stopped, with the reason (the others go on)."""
        out = {i: str(q.svq.error) for i, q in self.queues.items() if q.svq.error is not None}
        if self.loop.error is not None:
            out[-1] = f"relay loop died: {self.loop.error!r}"
        return out

    def hand_back(self, *, assume_in_order: bool) -> HandBack:
        """Shadowed -> stopped: stop relaying, stop the device, return to the guest what the device
        finished, and say where each guest ring restarts (rewound()). close() comes after.

        `assume_in_order` says what the restart point may rest on:
        - True (a vhost-user connection that stops, serve): the device is stopped by suspend, or by
          reset when it cannot suspend (a failure is reported in quiesce_error, and the hand-back
          goes on). Buffers it took and had not used die with its reset and are read again from the
          guest ring: exact for a device that uses buffers in order, as a net device does.
        - False (the live switch back to passthrough, attach): exact whatever the order. The device
          must suspend (SessionError before anything stops, when it cannot), and after the last used
          buffers are returned it must hold none (its avail index, VHOST_GET_VRING_BASE, equals the
          shadow ring's used index), and what the relay took from the guest must be exactly what
          it gave back plus what the device never took; else SessionError. Split shadow rings only.
        """
        dev = self.dev
        if not assume_in_order:
            if dev.layout is not Layout.SPLIT:
                raise SessionError(f"{dev.device.path}: an exact hand-back is implemented for split shadow rings")
            dev.suspend()
        self.loop.stop()
        quiesce_error = None
        if assume_in_order:
            try:
                dev.quiesce()
            except (VdpaSvqError, OSError) as e:
                quiesce_error = e
        states = {}
        for i, q in self.queues.items():
            svq = q.svq
            if svq.error is not None:
                if not assume_in_order:
                    raise SessionError(f"{dev.device.path}: queue {i} stopped ({svq.error}): cannot hand it back")
                continue
            svq.forward_used()  # everything the device finished goes back to the guest first
            guest = svq.guest.state()
            if not assume_in_order:
                self._check_nothing_held(i, svq, guest)
            states[i] = rewound(guest)
        return HandBack(states, quiesce_error)

    def _check_nothing_held(self, index: int, svq: Relay, guest: RingState) -> None:
        """hand_back's exact case (split): the device holds nothing, every chain is accounted for."""
        path = self.dev.device.path
        dev_avail = RingState.from_vring_base(Layout.SPLIT, self.dev.vring_base(index)).avail_idx
        shadow_ring = svq.shadow
        if (dev_avail - shadow_ring.last_used_idx) & 0xFFFF:
            raise SessionError(f"{path}: queue {index}: the device still holds buffers")
        # Chains forwarded but never taken by the device, and one held for room, are given back.
        not_taken = (shadow_ring.avail_idx_shadow - dev_avail) & 0xFFFF
        not_taken += 1 if svq.held else 0
        if (guest.avail_idx - not_taken) & 0xFFFF != guest.used_idx:
            raise SessionError(f"{path}: queue {index}: buffers completed out of order, cannot hand back")

    def close(self) -> None:
        """Stop relaying, reset the device and unmap everything, free the shadow rings."""
        try:
            self.loop.close()
        finally:
            try:
                self.dev.close()
            finally:
                # The C relay holds views of guest and shadow memory: release them before the memory.
                for q in self.queues.values():
                    q.svq.close()
                if self.control is not None:
                    self.control.close()
                    self.control = None
                for ring in self._rings:
                    ring.close()
                self._rings.clear()
                self.shadow_mem.close()
                for fd in self._fds:
                    os.close(fd)
                self._fds.clear()
