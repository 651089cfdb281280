"""Where the device side of a ring stands, in the form vhost's VRING_BASE carries it."""

from __future__ import annotations

from dataclasses import dataclass

from vdpa_svq.ring.layout import Layout


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
