"""Where a ring stands: the device side in the form vhost's VRING_BASE carries it (RingState), and
either side whole, for a datapath that takes the ring over (the bases of the export_state() records).
"""

from __future__ import annotations

from dataclasses import dataclass

from vdpa_svq.ring.chain import IndirectArea
from vdpa_svq.ring.layout import Layout, RingAddresses, RingAreas


@dataclass(frozen=True)
class RingState:
    """Next available entry the device will take and next used entry it will write.

    Split: free-running 16-bit indexes (the wrap fields are unused). Packed: ring slots with the
    device's avail and used wrap counters (both start at 1).
    """

    avail_idx: int = 0
    used_idx: int = 0
    avail_wrap: int = 1
    used_wrap: int = 1

    def to_vring_base(self, layout: Layout) -> int:
        """vhost_vring_state.num for SET_VRING_BASE: split takes the avail index alone (the device
        starts used at the same place); packed packs both halves with their wrap counters in bit 15."""
        if layout is Layout.SPLIT:
            return self.avail_idx & 0xFFFF
        return (self.avail_idx | self.avail_wrap << 15) | (self.used_idx | self.used_wrap << 15) << 16

    @classmethod
    def from_vring_base(cls, layout: Layout, num: int) -> RingState:
        if layout is Layout.SPLIT:
            return cls(num & 0xFFFF, num & 0xFFFF)
        return cls(num & 0x7FFF, num >> 16 & 0x7FFF, num >> 15 & 1, num >> 31 & 1)


@dataclass(frozen=True, kw_only=True)
class RingExport:
    """What every ring's export_state() record starts with: the ring's configuration.

    The records (SplitDriverExport, PackedDriverExport, SplitDeviceExport, PackedDeviceExport, next
    to the fields they copy) add the side's state, under the names of the ring's own fields.
    """

    num: int
    addrs: RingAddresses
    event_idx: bool
    name: str


@dataclass(frozen=True, kw_only=True)
class DriverSideExport(RingExport):
    """What a driver side of either layout exports. Per-chain state (tokens, chain lengths) is not in
    it: a ring is handed over with nothing in flight, so its free list is all its links."""

    indirect_area: IndirectArea | None
    free_head: int  # first free descriptor (split) / buffer id (packed)
    num_free: int  # free ring descriptors
    num_added: int  # made available since the last kick decision (split: chains; packed: slots)
    cb_enabled: bool  # used buffer notifications wanted (disable_cb / enable_cb)


@dataclass(frozen=True, kw_only=True)
class DeviceSideExport(RingExport):
    """What a device side of either layout exports: also the views of its areas, and what is in flight."""

    areas: RingAreas
    in_flight: bytes  # per head (split) / buffer id (packed): 1 when popped and not yet used
