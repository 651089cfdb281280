"""Virtqueue layouts, split and packed, each with a driver side and a device side.

The public API picks the layout once: `driver_ring(layout, ...)` / `device_ring(layout, ...)`.
Both driver classes and both device classes have the same methods.
"""

from __future__ import annotations

from vdpa_svq.memory.guest import GuestMemory
from vdpa_svq.ring.chain import Chain, IndirectArea
from vdpa_svq.ring.layout import Layout, RingAddresses, RingAreas, place_ring
from vdpa_svq.ring.packed import PackedDeviceExport, PackedDeviceRing, PackedDriverExport, PackedDriverRing
from vdpa_svq.ring.split import SplitDeviceExport, SplitDeviceRing, SplitDriverExport, SplitDriverRing
from vdpa_svq.ring.state import DeviceSideExport, DriverSideExport, RingExport, RingState

DriverRing = SplitDriverRing | PackedDriverRing
DeviceRing = SplitDeviceRing | PackedDeviceRing


def driver_ring(
    layout: Layout,
    mem: GuestMemory,
    num: int,
    addrs: RingAddresses,
    *,
    event_idx: bool = False,
    indirect_area: IndirectArea | None = None,
    name: str = "vq",
) -> DriverRing:
    cls = SplitDriverRing if layout is Layout.SPLIT else PackedDriverRing
    return cls(mem, num, addrs, event_idx=event_idx, indirect_area=indirect_area, name=name)


def device_ring(
    layout: Layout,
    mem: GuestMemory,
    num: int,
    addrs: RingAddresses,
    *,
    event_idx: bool = False,
    name: str = "vq",
    state: RingState | None = None,
) -> DeviceRing:
    """The device side of a ring, starting where `state` says (the initial state when None)."""
    st = state or RingState()
    if layout is Layout.SPLIT:
        return SplitDeviceRing(
            mem, num, addrs, event_idx=event_idx, name=name, last_avail_idx=st.avail_idx, used_idx=st.used_idx
        )
    return PackedDeviceRing(
        mem,
        num,
        addrs,
        event_idx=event_idx,
        name=name,
        next_avail_idx=st.avail_idx,
        avail_wrap_counter=st.avail_wrap,
        next_used_idx=st.used_idx,
        used_wrap_counter=st.used_wrap,
    )


__all__ = [
    "Chain",
    "DeviceRing",
    "DeviceSideExport",
    "DriverRing",
    "DriverSideExport",
    "IndirectArea",
    "Layout",
    "PackedDeviceExport",
    "PackedDeviceRing",
    "PackedDriverExport",
    "PackedDriverRing",
    "RingAddresses",
    "RingAreas",
    "RingExport",
    "RingState",
    "SplitDeviceExport",
    "SplitDeviceRing",
    "SplitDriverExport",
    "SplitDriverRing",
    "device_ring",
    "driver_ring",
    "place_ring",
]
