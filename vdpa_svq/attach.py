"""An in-process guest attached to a device, in passthrough or shadowed, with the live switch between.

The guest owns its notifiers, one kick and one call eventfd per queue, as a VMM owns a VM's
ioeventfds and irqfds. In passthrough they go straight to the device, which reads the guest's own
rings. Shadowed, the relay reads the kicks and writes the calls, and the device sees only rings
vdpa-svq owns. Switching moves the ring state across (VHOST_VDPA_SUSPEND, GET_VRING_BASE) without
losing or repeating a buffer, as QEMU does when a migration starts (and when it is cancelled).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

from kernel_iface import uapi
from vdpa_svq.device import Device
from vdpa_svq.guest.blk import SECTOR, BlkDriver
from vdpa_svq.guest.net import RX_BUFFER, NetDriver
from vdpa_svq.guest.notify import new_eventfd
from vdpa_svq.guest.plan import GuestLayout, plan_layout
from vdpa_svq.loop import Polling
from vdpa_svq.memory.guest import GuestMemory, page_align
from vdpa_svq.ring import DriverRing, Layout, RingState
from vdpa_svq.session import DeviceSession, SessionError, ShadowSession

PASSTHROUGH, SHADOW = "passthrough", "shadow"


@dataclass
class InProcessGuest:
    """The guest's memory, rings and notifiers, and the device session under them."""

    session: DeviceSession
    mem: GuestMemory
    rings: list[DriverRing]
    layout: GuestLayout
    guest_layout: Layout
    event_idx: bool
    indirect: bool
    num: int
    kick_fds: list[int]
    call_fds: list[int]
    shadow: ShadowSession | None = None
    mode: str = ""
    switches: list[tuple[str, str]] = field(default_factory=list)  # (from, to)
    _closed: bool = field(default=False, repr=False)

    @property
    def device(self) -> Device:
        return self.session.device

    def kick(self, index: int) -> None:
        os.eventfd_write(self.kick_fds[index], 1)

    # -- connecting ------------------------------------------------------------------------
    def connect_passthrough(self, states: list[RingState] | None = None) -> None:
        s = self.session
        if self.guest_layout is not s.layout:
            raise SessionError(
                f"{s.device.path}: the guest's {self.guest_layout.value} rings cannot be given to a device "
                f"running {s.layout.value} rings: only the shadow relay can bridge them"
            )
        for feature, wanted in (
            (uapi.VIRTIO_RING_F_EVENT_IDX, self.event_idx),
            (uapi.VIRTIO_RING_F_INDIRECT_DESC, self.indirect),
        ):
            if wanted and not s.has(feature):
                name = uapi.decode_features(1 << feature)[0]
                raise SessionError(f"{s.device.path}: the guest uses {name}, which the device did not negotiate")
        s.map_memory(self.mem)
        for i, addrs in enumerate(self.layout.rings):
            base = states[i].to_vring_base(s.layout) if states else None
            s.setup_queue(i, self.num, addrs, base=base, kick_fd=self.kick_fds[i], call_fd=self.call_fds[i])
        s.start()
        self.mode = PASSTHROUGH

    def connect_shadow(self, states: list[RingState] | None = None, *, impl: str = "auto",
                       poll_us: Polling = 0) -> None:
        self.shadow = ShadowSession(self.session, self.mem, impl=impl, poll_us=poll_us)
        for i, addrs in enumerate(self.layout.rings):
            self.shadow.add_queue(
                i,
                self.guest_layout,
                self.num,
                addrs,
                guest_event_idx=self.event_idx,
                guest_kick_fd=self.kick_fds[i],
                guest_call_fd=self.call_fds[i],
                guest_state=states[i] if states else None,
            )
        self.shadow.start()
        self.mode = SHADOW

    # -- the live switch -------------------------------------------------------------------
    def switch_to_shadow(self, *, impl: str = "auto", poll_us: Polling = 0) -> list[RingState]:
        """Passthrough -> shadowed, mid-traffic: suspend, take the ring state, relay from there."""
        if self.mode != PASSTHROUGH:
            raise SessionError(f"{self.device.path}: not in passthrough (mode {self.mode or 'down'})")
        states = self.session.take_over(self.mem)
        self.connect_shadow(states, impl=impl, poll_us=poll_us)
        for i in range(len(self.rings)):
            self.kick(i)  # buffers the guest made available during the switch
        self.switches.append((PASSTHROUGH, SHADOW))
        return states

    def switch_to_passthrough(self) -> list[RingState]:
        """Shadowed -> passthrough (a cancelled migration): the device takes the guest's rings back."""
        if self.mode != SHADOW or self.shadow is None:
            raise SessionError(f"{self.device.path}: not shadowed (mode {self.mode or 'down'})")
        if self.guest_layout is not Layout.SPLIT or self.session.layout is not Layout.SPLIT:
            raise SessionError(
                f"{self.device.path}: switching back to passthrough is implemented for split rings on both sides"
            )
        # The device will run the guest's rings itself: the restart point must be exact.
        handed = self.shadow.hand_back(assume_in_order=False)
        states = [handed.states[i] for i in range(len(self.rings))]
        self.shadow.close()
        self.shadow = None
        self.session.negotiate()
        self.connect_passthrough(states)
        for i in range(len(self.rings)):
            self.kick(i)
        self.switches.append((SHADOW, PASSTHROUGH))
        return states

    def errors(self) -> dict[int, str]:
        return self.shadow.errors() if self.shadow is not None else {}

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            if self.shadow is not None:
                self.shadow.close()
            else:
                self.session.close()
        finally:
            for ring in self.rings:
                ring.close()
            self.mem.close()
            for fd in self.kick_fds + self.call_fds:
                os.close(fd)


def bring_up(
    device: Device,
    nqueues: int,
    num: int,
    block_size: int,
    blocks: int,
    *,
    shadow: bool = False,
    guest_layout: Layout | None = None,
    guest_event_idx: bool = True,
    impl: str = "auto",
    poll_us: Polling = 0,
    **opts: Any,
) -> InProcessGuest:
    """Negotiate, lay the guest out, connect it (passthrough or shadowed), DRIVER_OK."""
    session = DeviceSession(device, **opts)
    session.negotiate()
    if shadow:
        guest_layout = guest_layout or session.layout
        # The relay implements both for the guest whatever the device offers.
        event_idx, indirect = guest_event_idx, True
    else:
        guest_layout = guest_layout or session.layout
        event_idx = session.has(uapi.VIRTIO_RING_F_EVENT_IDX) and guest_event_idx
        indirect = session.has(uapi.VIRTIO_RING_F_INDIRECT_DESC)
    layout = plan_layout(guest_layout, num, nqueues, block_size, blocks)
    mem = GuestMemory.create(layout.size, name="vdpa-svq-guest")
    rings = [
        layout.driver_ring(
            i, mem, guest_layout, event_idx=event_idx, indirect=indirect, name=f"{device.path}:guest vq{i}"
        )
        for i in range(nqueues)
    ]
    fds = [new_eventfd() for _ in range(2 * nqueues)]
    guest = InProcessGuest(
        session, mem, rings, layout, guest_layout, event_idx, indirect, num, fds[:nqueues], fds[nqueues:]
    )
    try:
        if shadow:
            guest.connect_shadow(impl=impl, poll_us=poll_us)
        else:
            guest.connect_passthrough()
    except BaseException:
        guest.close()
        raise
    return guest


def net_guest(device: Device, *, num: int = 256, **opts: Any) -> tuple[InProcessGuest, NetDriver]:
    """A virtio-net device with the in-process guest on it: the guest and its driver (RX posted)."""
    if device.device_id() != uapi.VIRTIO_ID_NET:
        raise SessionError(f"{device.path}: not a network device (virtio id {device.device_id()})")
    g = bring_up(device, 2, num, RX_BUFFER, num, **opts)
    pools = g.layout.pools
    drv = NetDriver(g.mem, g.rings[0], g.rings[1], pools[0], pools[1], g.kick, (g.call_fds[0], g.call_fds[1]))
    drv.fill_rx()
    return g, drv


def blk_guest(
    device: Device, *, num: int = 64, max_io: int = 64 * 1024, **opts: Any
) -> tuple[InProcessGuest, BlkDriver]:
    """A virtio-blk device with the in-process guest on it: the guest and its driver."""
    if device.device_id() != uapi.VIRTIO_ID_BLOCK:
        raise SessionError(f"{device.path}: not a block device (virtio id {device.device_id()})")
    block = page_align(16 + max_io + SECTOR)
    g = bring_up(device, 1, num, block, 8, **opts)
    return g, BlkDriver(g.mem, g.rings[0], g.layout.pools[0], g.kick, g.call_fds[0])
