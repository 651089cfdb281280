"""Where a guest's rings, indirect tables and buffers sit in guest-physical space: one plan, for
attach's in-process guest, the vhost-user test client, the fuzz seeds and the soft device tests.

Each queue gets its ring with the device area on a page of its own (it can be mapped with other
permissions than the rest: the device writes only the device area), then a page-aligned area for
its indirect tables; the buffer pools follow all the queues.
"""

from __future__ import annotations

from dataclasses import dataclass

from vdpa_svq.guest.buffers import BlockPool
from vdpa_svq.memory.guest import PAGE_SIZE, GuestMemory, page_align
from vdpa_svq.ring import DriverRing, IndirectArea, Layout, RingAddresses, driver_ring, place_ring

GUEST_BASE = 0x100000  # leave low memory unused: a zero address in a descriptor is then always a bug
GUEST_INDIRECT_MAX = 8


def _place(layout: Layout, num: int, base: int) -> tuple[RingAddresses, int]:
    return place_ring(layout, num, base, device_area_align=PAGE_SIZE)


@dataclass
class GuestLayout:
    """Where each queue's ring and each pool sits in guest-physical space."""

    rings: list[RingAddresses]
    indirect: list[IndirectArea]
    pools: list[BlockPool]
    size: int
    num: int

    def ring_as(self, index: int, layout: Layout) -> RingAddresses:
        """Queue `index`'s ring laid out as `layout` from where the plan put it: a driver that
        negotiates the other layout after a reset keeps the rest of its memory where it was."""
        addrs, end = _place(layout, self.num, self.rings[index].desc)
        if end > self.indirect[index].gpa:
            raise ValueError(f"queue {index}: a {layout.value} ring of {self.num} does not fit where the plan put it")
        return addrs

    def driver_ring(
        self, index: int, mem: GuestMemory, layout: Layout, *, event_idx: bool, indirect: bool, name: str
    ) -> DriverRing:
        """Queue `index`'s ring in `mem` from the driver's side, laid out as `layout` (ring_as), with
        the plan's indirect area when `indirect`."""
        area = self.indirect[index] if indirect else None
        addrs = self.ring_as(index, layout)
        return driver_ring(layout, mem, self.num, addrs, event_idx=event_idx, indirect_area=area, name=name)


def plan_layout(
    layout: Layout,
    num: int,
    nqueues: int,
    block_size: int,
    blocks_per_pool: int,
    *,
    pools: int | None = None,
    base: int = GUEST_BASE,
) -> GuestLayout:
    """`nqueues` rings of `num` entries from `base`, then `pools` pools (one per queue when None) of
    `blocks_per_pool` blocks of `block_size` bytes each."""
    cursor = base
    rings, indirect = [], []
    for _ in range(nqueues):
        addrs, end = _place(layout, num, cursor)
        rings.append(addrs)
        cursor = page_align(end)
        indirect.append(IndirectArea(cursor, GUEST_INDIRECT_MAX))
        cursor = page_align(cursor + IndirectArea.size(num, GUEST_INDIRECT_MAX))
    pool_list = []
    for _ in range(nqueues if pools is None else pools):
        pool_list.append(BlockPool(cursor, block_size, blocks_per_pool))
        cursor = page_align(cursor + block_size * blocks_per_pool)
    return GuestLayout(rings, indirect, pool_list, cursor, num)
