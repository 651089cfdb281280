"""Where a ring stands: the device side in the form vhost's VRING_BASE carries it (RingState), and
either side whole, for a datapath that takes the ring over (the bases of the export_state() records,
and the check of what a device side's import_state() takes back).
"""

from __future__ import annotations

from collections.abc import Mapping
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


def checked_import(name: str, state: Mapping[str, int], fields: Mapping[str, int | None]) -> dict[str, int]:
    """`state`, what a datapath that took ring `name` over hands back, checked for a device side's
    import_state(): exactly the keys of `fields`, each a non-negative int below its bound (None: no
    bound). ValueError otherwise, before the ring takes anything."""
    missing, unknown = fields.keys() - state.keys(), state.keys() - fields.keys()
    if missing or unknown:
        raise ValueError(
            f"{name}: import_state takes {', '.join(fields)}"
            + (f"; missing {', '.join(sorted(missing))}" if missing else "")
            + (f"; unknown {', '.join(sorted(unknown))}" if unknown else "")
        )
    for key, bound in fields.items():
        value = state[key]
        if not isinstance(value, int) or isinstance(value, bool) or value < 0 or (bound is not None and value >= bound):
            raise ValueError(f"{name}: import_state: {key} {value!r} out of range" + (f" (< {bound})" if bound else ""))
    return {key: state[key] for key in fields}
