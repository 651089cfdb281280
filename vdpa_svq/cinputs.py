"""The inputs of vdpa-svq's C extensions, built from the Python side's export records: one builder
per C parser, each naming the C function that parses what it builds.

The C relay (vdpa_svq._relay.CShadowVirtqueue, relay_impl.py) and the soft net device's C loopback
(vdpa_svq.softdev._netloop.NetLoop, softdev/net.py) take rings over from their Python twins. They
are given plain tuples, not Python objects: a ring's export_state() record, a memory's regions and
the IOVA map's table(), in the order and form the C's PyArg_ParseTuple formats name. This module
is the one place that knows those forms; it belongs to neither of its users.

What comes back (NetLoop.detach()'s states, under the export records' names) a device ring takes
through its import_state().
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from kernel_iface import uapi
from vdpa_svq.memory.guest import GuestMemory
from vdpa_svq.memory.iova import IovaMap, IovaMapping
from vdpa_svq.ring import DeviceRing, DriverRing, Layout, PackedDeviceExport, PackedDriverExport


def memory_regions(mem: GuestMemory) -> tuple[tuple[int, int, Any], ...]:
    """Guest memory as a region table: ((gpa, size, buffer), ...), sorted by gpa, the device allowed
    to read and write all of it. Parsed by _ring.h:mem_table_init."""
    return tuple((r.gpa, r.size, r.mm) for r in mem)


def ring_area_regions(ring: DeviceRing) -> tuple[tuple[int, int, memoryview, int], ...]:
    """A device ring's three areas as a region table: ((iova, size, view, perm), ...), sorted, the
    views the ring took when it started (export_state().areas), so the C reaches them as the Python
    ring does whatever an IOTLB says now; perm VHOST_ACCESS_RO for a read-only view, else RW.
    Parsed by _ring.h:mem_table_init (the `areas` table of device_side_setup)."""
    st = ring.export_state()
    addrs = (st.addrs.desc, st.addrs.driver, st.addrs.device)
    return tuple(
        sorted((addr, v.nbytes, v, uapi.VHOST_ACCESS_RO if v.readonly else uapi.VHOST_ACCESS_RW)
               for addr, v in zip(addrs, st.areas, strict=True))
    )


def iotlb_regions(mappings: Iterable[Any]) -> tuple[tuple[int, int, memoryview, int], ...]:
    """An IOTLB (softdev/iotlb.py's IotlbMemory.mappings, sorted by iova) as a region table:
    ((iova, size, view, perm), ...), perm the mapping's VHOST_ACCESS_*. Parsed by
    _ring.h:mem_table_init (NetLoop.attach's `regions`)."""
    return tuple((m.iova, m.size, m.view, m.perm) for m in mappings)


def iova_table(iova: IovaMap) -> tuple[IovaMapping, ...]:
    """The IOVA map as ((gpa, size, iova), ...), sorted by gpa: IovaMap.table(), a snapshot. Parsed
    by _relay.c:relay_init (its `iova`)."""
    return iova.table()


def device_ring_spec(ring: DeviceRing, regions: tuple = ()) -> tuple:
    """A device ring (the relay's guest ring, the soft net device's rings) from its export_state()
    record: (packed, num, desc, driver, device, event_idx, name, regions, state, in_flight), with
    state (next_avail_idx, avail_wrap_counter, next_used_idx, used_wrap_counter, used_since_signal)
    when packed, (last_avail_idx, used_idx, signalled_used, 0, 0) when split. `regions`: a region
    table, for callers that have the C map them from the spec (the relay: its guest memory; NetLoop:
    the ring's areas). Parsed by _ring.h:device_side_setup (through _relay.c:device_side_init and
    _netloop.c:netloop_attach, which read `regions` first)."""
    if ring.broken:
        raise ValueError(f"{ring.name}: ring is broken")
    st = ring.export_state()
    if isinstance(st, PackedDeviceExport):
        state = (st.next_avail_idx, st.avail_wrap_counter, st.next_used_idx, st.used_wrap_counter,
                 st.used_since_signal)
    else:
        state = (st.last_avail_idx, st.used_idx, st.signalled_used, 0, 0)
    a = st.addrs
    return (st.layout is Layout.PACKED, st.num, a.desc, a.driver, a.device, st.event_idx, st.name,
            regions, state, st.in_flight)


def shadow_ring_spec(ring: DriverRing) -> tuple:
    """The relay's shadow ring (a driver ring with nothing in flight) from its export_state() record
    and memory: (packed, num, desc, driver, device, event_idx, name, regions, indirect_area, state,
    links), with indirect_area (gpa, max_entries) or None, state (free_head, num_free, num_added,
    cb_enabled, next_avail_idx | avail_idx_shadow, avail_wrap_counter, last_used_idx,
    used_wrap_counter) (split: 0 for the wrap counters), links the free list (packed next_id, split
    next). Parsed by _relay.c:driver_side_init."""
    if ring.broken or ring.in_flight:
        raise ValueError(f"{ring.name}: the C relay takes over a shadow ring with nothing in flight")
    st = ring.export_state()
    if isinstance(st, PackedDriverExport):
        state = (st.free_head, st.num_free, st.num_added, st.cb_enabled, st.next_avail_idx,
                 st.avail_wrap_counter, st.last_used_idx, st.used_wrap_counter)
        links = st.next_id
    else:
        state = (st.free_head, st.num_free, st.num_added, st.cb_enabled, st.avail_idx_shadow, 0,
                 st.last_used_idx, 0)
        links = st.next
    a, area = st.addrs, st.indirect_area
    return (st.layout is Layout.PACKED, st.num, a.desc, a.driver, a.device, st.event_idx, st.name,
            memory_regions(ring.mem), None if area is None else (area.gpa, area.max_entries), state, links)
