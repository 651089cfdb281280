"""Lay out a guest (rings, indirect tables, buffer pools) in one memory and bring a device up under it.

This is the direct path, with no shadow: the device reads the in-process driver's rings. It is how
the ring code is proven against independent device implementations, and the passthrough baseline.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from kernel_iface import uapi
from vdpa_svq.guest.blk import SECTOR, BlkDriver
from vdpa_svq.guest.buffers import BlockPool
from vdpa_svq.guest.net import RX_BUFFER, NetDriver
from vdpa_svq.memory.guest import PAGE_SIZE, GuestMemory
from vdpa_svq.ring import DriverRing, IndirectArea, RingAddresses, driver_ring, place_ring
from vdpa_svq.session import DeviceSession, SessionError

GUEST_BASE = 0x100000  # leave page 0 unused: a zero address in a descriptor is then always a bug


def _page_align(x: int) -> int:
    return (x + PAGE_SIZE - 1) & ~(PAGE_SIZE - 1)


@dataclass
class GuestLayout:
    """Where each queue's ring and each pool sits in guest-physical space."""

    rings: list[RingAddresses]
    indirect: list[IndirectArea]
    pools: list[BlockPool]
    size: int


def plan_layout(session_layout: Any, num: int, nqueues: int, block_size: int, blocks_per_queue: int) -> GuestLayout:
    cursor = GUEST_BASE
    rings, indirect, pools = [], [], []
    for _ in range(nqueues):
        addrs, end = place_ring(session_layout, num, cursor, device_area_align=PAGE_SIZE)
        rings.append(addrs)
        cursor = _page_align(end)
        indirect.append(IndirectArea(cursor, 8))
        cursor = _page_align(cursor + IndirectArea.size(num, 8))
    for _ in range(nqueues):
        pools.append(BlockPool(cursor, block_size, blocks_per_queue))
        cursor = _page_align(cursor + block_size * blocks_per_queue)
    return GuestLayout(rings, indirect, pools, cursor)


@dataclass
class DirectGuest:
    """A running device, the guest memory it was given, and the driver rings on it."""

    session: DeviceSession
    mem: GuestMemory
    rings: list[DriverRing]
    layout: GuestLayout

    def close(self) -> None:
        try:
            self.session.close()
        finally:
            for ring in self.rings:
                ring.close()
            self.mem.close()


def _bring_up(device: Any, nqueues: int, num: int, block_size: int, blocks: int, **opts: Any) -> DirectGuest:
    session = DeviceSession(device, **opts)
    session.negotiate()
    layout = plan_layout(session.layout, num, nqueues, block_size, blocks)
    mem = GuestMemory.create(layout.size)
    event_idx = session.has(uapi.VIRTIO_RING_F_EVENT_IDX)
    indirect = session.has(uapi.VIRTIO_RING_F_INDIRECT_DESC)
    rings: list[DriverRing] = []
    try:
        session.map_memory(mem)
        for i in range(nqueues):
            ring = driver_ring(
                session.layout,
                mem,
                num,
                layout.rings[i],
                event_idx=event_idx,
                indirect_area=layout.indirect[i] if indirect else None,
                name=f"{device.path}:vq{i}",
            )
            rings.append(ring)
            session.setup_queue(i, num, layout.rings[i])
        session.start()
    except BaseException:
        DirectGuest(session, mem, rings, layout).close()
        raise
    return DirectGuest(session, mem, rings, layout)


def kick_for(session: DeviceSession):
    return lambda index: session.queues[index].kick()


def net_guest(device: Any, *, num: int = 256, **opts: Any) -> tuple[DirectGuest, NetDriver]:
    """A virtio-net device driven directly: the running guest and its driver (RX buffers posted)."""
    if device.device_id() != uapi.VIRTIO_ID_NET:
        raise SessionError(f"{device.path}: not a network device (virtio id {device.device_id()})")
    g = _bring_up(device, 2, num, RX_BUFFER, num, **opts)
    q = g.session.queues
    drv = NetDriver(
        g.mem,
        g.rings[0],
        g.rings[1],
        g.layout.pools[0],
        g.layout.pools[1],
        kick_for(g.session),
        (q[0].call_fd, q[1].call_fd),
    )
    drv.fill_rx()
    return g, drv


def blk_guest(device: Any, *, num: int = 64, max_io: int = 64 * 1024, **opts: Any) -> tuple[DirectGuest, BlkDriver]:
    """A virtio-blk device driven directly: the running guest and its driver."""
    if device.device_id() != uapi.VIRTIO_ID_BLOCK:
        raise SessionError(f"{device.path}: not a block device (virtio id {device.device_id()})")
    block = _page_align(16 + max_io + SECTOR)
    g = _bring_up(device, 1, num, block, 8, **opts)
    return g, BlkDriver(g.mem, g.rings[0], g.layout.pools[0], kick_for(g.session), g.session.queues[0].call_fd)
