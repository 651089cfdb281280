"""Lay out an in-process guest (rings, indirect tables, buffer pools) and bring a device up under it.

Two ways to connect it:
- direct: the device reads the guest's own rings (no shadow) — how the ring code is proven
  against independent device implementations, and the passthrough baseline;
- shadow: the guest's rings are relayed by shadow virtqueues, and the device sees only rings
  vdpa-svq owns. The guest's layout (split/packed) is then independent of the device's.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from kernel_iface import uapi
from vdpa_svq.guest.blk import SECTOR, BlkDriver
from vdpa_svq.guest.buffers import BlockPool
from vdpa_svq.guest.net import RX_BUFFER, NetDriver
from vdpa_svq.memory.guest import PAGE_SIZE, GuestMemory
from vdpa_svq.ring import DriverRing, IndirectArea, Layout, RingAddresses, driver_ring, place_ring
from vdpa_svq.session import DeviceSession, SessionError, ShadowSession

GUEST_BASE = 0x100000  # leave low memory unused: a zero address in a descriptor is then always a bug
GUEST_INDIRECT_MAX = 8


def _page_align(x: int) -> int:
    return (x + PAGE_SIZE - 1) & ~(PAGE_SIZE - 1)


@dataclass
class GuestLayout:
    """Where each queue's ring and each pool sits in guest-physical space."""

    rings: list[RingAddresses]
    indirect: list[IndirectArea]
    pools: list[BlockPool]
    size: int


def plan_layout(layout: Layout, num: int, nqueues: int, block_size: int, blocks_per_queue: int) -> GuestLayout:
    cursor = GUEST_BASE
    rings, indirect, pools = [], [], []
    for _ in range(nqueues):
        addrs, end = place_ring(layout, num, cursor, device_area_align=PAGE_SIZE)
        rings.append(addrs)
        cursor = _page_align(end)
        indirect.append(IndirectArea(cursor, GUEST_INDIRECT_MAX))
        cursor = _page_align(cursor + IndirectArea.size(num, GUEST_INDIRECT_MAX))
    for _ in range(nqueues):
        pools.append(BlockPool(cursor, block_size, blocks_per_queue))
        cursor = _page_align(cursor + block_size * blocks_per_queue)
    return GuestLayout(rings, indirect, pools, cursor)


@dataclass
class InProcessGuest:
    """A running device, the guest memory, the guest's driver rings, and how to notify."""

    session: DeviceSession
    mem: GuestMemory
    rings: list[DriverRing]
    layout: GuestLayout
    guest_layout: Layout
    kick: Callable[[int], None]
    call_fds: list[int]
    shadow: ShadowSession | None = None
    _closed: bool = field(default=False, repr=False)

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


def bring_up(
    device: Any,
    nqueues: int,
    num: int,
    block_size: int,
    blocks: int,
    *,
    shadow: bool = False,
    guest_layout: Layout | None = None,
    guest_event_idx: bool = True,
    impl: str = "py",
    **opts: Any,
) -> InProcessGuest:
    """Negotiate, lay the guest out, map it, set up every queue, DRIVER_OK (and start the relay)."""
    session = DeviceSession(device, **opts)
    session.negotiate()
    if not shadow:
        if guest_layout is not None and guest_layout is not session.layout:
            raise SessionError(f"{device.path}: guest layout {guest_layout.value} needs the shadow relay")
        guest_layout = session.layout
        event_idx = session.has(uapi.VIRTIO_RING_F_EVENT_IDX)
        indirect = session.has(uapi.VIRTIO_RING_F_INDIRECT_DESC)
    else:
        guest_layout = guest_layout or session.layout
        event_idx, indirect = guest_event_idx, True  # the relay implements both for the guest
    layout = plan_layout(guest_layout, num, nqueues, block_size, blocks)
    mem = GuestMemory.create(layout.size, name="vdpa-svq-guest")
    rings = [
        driver_ring(
            guest_layout, mem, num, layout.rings[i], event_idx=event_idx,
            indirect_area=layout.indirect[i] if indirect else None, name=f"{device.path}:guest vq{i}",
        )
        for i in range(nqueues)
    ]
    guest = InProcessGuest(session, mem, rings, layout, guest_layout, lambda i: None, [])
    try:
        if shadow:
            guest.shadow = ShadowSession(session, mem, impl=impl)
            for i in range(nqueues):
                guest.shadow.add_queue(i, guest_layout, num, layout.rings[i], guest_event_idx=event_idx)
            qs = guest.shadow.queues
            guest.kick = lambda i: os.eventfd_write(qs[i].guest_kick_fd, 1)
            guest.call_fds = [qs[i].guest_call_fd for i in range(nqueues)]
            guest.shadow.start()
        else:
            session.map_memory(mem)
            for i in range(nqueues):
                session.setup_queue(i, num, layout.rings[i])
            guest.kick = lambda i: session.queues[i].kick()
            guest.call_fds = [session.queues[i].call_fd for i in range(nqueues)]
            session.start()
    except BaseException:
        guest.close()
        raise
    return guest


def net_guest(device: Any, *, num: int = 256, **opts: Any) -> tuple[InProcessGuest, NetDriver]:
    """A virtio-net device with the in-process guest on it: the guest and its driver (RX posted)."""
    if device.device_id() != uapi.VIRTIO_ID_NET:
        raise SessionError(f"{device.path}: not a network device (virtio id {device.device_id()})")
    g = bring_up(device, 2, num, RX_BUFFER, num, **opts)
    pools = g.layout.pools
    drv = NetDriver(g.mem, g.rings[0], g.rings[1], pools[0], pools[1], g.kick, (g.call_fds[0], g.call_fds[1]))
    drv.fill_rx()
    return g, drv


def blk_guest(device: Any, *, num: int = 64, max_io: int = 64 * 1024, **opts: Any) -> tuple[InProcessGuest, BlkDriver]:
    """A virtio-blk device with the in-process guest on it: the guest and its driver."""
    if device.device_id() != uapi.VIRTIO_ID_BLOCK:
        raise SessionError(f"{device.path}: not a block device (virtio id {device.device_id()})")
    block = _page_align(16 + max_io + SECTOR)
    g = bring_up(device, 1, num, block, 8, **opts)
    return g, BlkDriver(g.mem, g.rings[0], g.layout.pools[0], g.kick, g.call_fds[0])
