"""export_state() of the four rings and IovaMap.table(): what a datapath taking a ring over (the C
relay, the soft device's C loopback) is given must be where the ring stands, in its own memory; and
the device sides' import_state(), which takes back what such a datapath hands back.

The relay's and the soft device's tests check that the C datapath runs from these records; these
check the records against the rings' public behaviour: state(), the chains in flight, the ring bytes.
"""

from __future__ import annotations

import dataclasses

import pytest

from vdpa_svq.memory import GuestMemory
from vdpa_svq.memory.iova import IovaMap, IovaMapping
from vdpa_svq.ring import (
    IndirectArea,
    Layout,
    PackedDeviceExport,
    PackedDriverExport,
    SplitDeviceExport,
    SplitDriverExport,
    device_ring,
    driver_ring,
    place_ring,
)
from vdpa_svq.ring.layout import desc_area_size, device_area_size, driver_area_size

NUM = 8
DATA = 0x8000


def _pair(layout: Layout, event_idx: bool = False):
    mem = GuestMemory.create(0x10000)
    addrs, end = place_ring(layout, NUM, 0x1000)
    area = IndirectArea((end + 0xFFF) & ~0xFFF, 4)
    drv = driver_ring(layout, mem, NUM, addrs, event_idx=event_idx, indirect_area=area, name="q")
    dev = device_ring(layout, mem, NUM, addrs, event_idx=event_idx, name="q")
    return mem, addrs, drv, dev


@pytest.mark.parametrize("layout", [Layout.SPLIT, Layout.PACKED], ids=["split", "packed"])
def test_device_export_is_where_the_device_side_stands(layout):
    mem, addrs, drv, dev = _pair(layout, event_idx=True)
    for i in range(5):
        drv.add([(DATA + 0x100 * i, 16)], [(DATA + 0x100 * i + 16, 32)], indirect=i % 2 == 1)
    chains = [dev.pop() for _ in range(4)]
    dev.push_used(chains[1], 8)
    dev.push_used(chains[0], 0)

    st = dev.export_state()
    assert type(st) is (SplitDeviceExport if layout is Layout.SPLIT else PackedDeviceExport)
    assert st.layout is layout
    assert (st.num, st.addrs, st.event_idx, st.name) == (NUM, addrs, True, "q")
    in_flight = {i for i, v in enumerate(st.in_flight) if v}
    assert in_flight == {chains[2].id, chains[3].id}
    state = dev.state()
    if layout is Layout.SPLIT:
        assert (st.last_avail_idx, st.used_idx) == (state.avail_idx, state.used_idx) == (4, 2)
        assert st.signalled_used == 0  # no interrupt decision yet
    else:
        assert (st.next_avail_idx, st.avail_wrap_counter, st.next_used_idx, st.used_wrap_counter) == (
            state.avail_idx, state.avail_wrap, state.used_idx, state.used_wrap)
        assert st.used_since_signal == chains[0].ndescs + chains[1].ndescs
    # The areas are the ring's own memory, whole, in the order of the addresses.
    sizes = (desc_area_size(NUM), driver_area_size(layout, NUM), device_area_size(layout, NUM))
    for view, addr, size in zip(st.areas, (addrs.desc, addrs.driver, addrs.device), sizes, strict=True):
        assert view.nbytes == size
        assert bytes(view) == bytes(mem.view(addr, size))
    dev.need_notify()
    after = dev.export_state()
    assert (after.signalled_used if layout is Layout.SPLIT else after.used_since_signal) == (
        2 if layout is Layout.SPLIT else 0)
    with pytest.raises(dataclasses.FrozenInstanceError):
        st.num = 1  # type: ignore[misc]


@pytest.mark.parametrize("layout", [Layout.SPLIT, Layout.PACKED], ids=["split", "packed"])
def test_driver_export_is_where_the_driver_side_stands(layout):
    _, addrs, drv, dev = _pair(layout)
    tokens = [drv.add([(DATA + 0x100 * i, 16)], [(DATA + 0x100 * i + 16, 32)], token=i) for i in range(3)]
    st = drv.export_state()
    assert type(st) is (SplitDriverExport if layout is Layout.SPLIT else PackedDriverExport)
    assert (st.num, st.addrs, st.event_idx, st.name, st.indirect_area) == (NUM, addrs, False, "q", drv.indirect_area)
    assert (st.num_free, st.num_added, st.free_head) == (NUM - 6, 6 if layout is Layout.PACKED else 3, drv.free_head)
    assert st.cb_enabled
    drv.disable_cb()
    assert not drv.export_state().cb_enabled

    # Hand-over point: everything used and reaped. The free list then holds every descriptor
    # (split) / buffer id (packed) once, starting at free_head.
    for _ in tokens:
        dev.push_used(dev.pop(), 0)
    while drv.get_used() is not None:
        pass
    drv.kick_needed()
    st = drv.export_state()
    links = st.next if isinstance(st, SplitDriverExport) else st.next_id
    assert st.num_free == NUM and st.num_added == 0 and len(links) == NUM
    walk, i = [], st.free_head
    for _ in range(st.num_free):
        walk.append(i)
        i = links[i] if i < NUM else i
    assert sorted(walk) == list(range(NUM))
    if isinstance(st, SplitDriverExport):
        assert (st.avail_idx_shadow, st.last_used_idx) == (3, 3)
    else:
        assert (st.next_avail_idx, st.avail_wrap_counter, st.last_used_idx, st.used_wrap_counter) == (6, 1, 6, 1)


def test_iova_table_is_sorted_by_gpa_and_a_snapshot():
    iova = IovaMap()
    iova.add(0x4000, 0x1000, 0x4000)
    iova.add(0x0, 0x2000, 0x0)
    table = iova.table()
    assert table == (IovaMapping(0x0, 0x2000, 0x0), IovaMapping(0x4000, 0x1000, 0x4000))
    assert table[1].gpa == 0x4000 and table[1].size == 0x1000 and table[1].iova == 0x4000
    iova.add(0x2000, 0x1000, iova.alloc(0x1000))
    assert len(table) == 2 and len(iova.table()) == 3


_DEVICE_STATE = {
    Layout.SPLIT: ("last_avail_idx", "used_idx", "signalled_used"),
    Layout.PACKED: ("next_avail_idx", "avail_wrap_counter", "next_used_idx", "used_wrap_counter", "used_since_signal"),
}


def _mid_lap(layout: Layout):
    """A device side past a wrap (packed) with buffers used and no interrupt decided for them."""
    mem, addrs, drv, dev = _pair(layout, event_idx=True)
    for i in range(NUM + 3):
        drv.add([(DATA + 0x100 * (i % NUM), 16)], [(DATA + 0x100 * (i % NUM) + 16, 32)])
        dev.push_used(dev.pop(), 8)
        drv.get_used()
    dev.need_notify()
    for i in range(2):
        drv.add([(DATA + 0x100 * i, 16)], [], indirect=True)
        dev.push_used(dev.pop(), 0)
    return mem, addrs, drv, dev


@pytest.mark.parametrize("layout", [Layout.SPLIT, Layout.PACKED], ids=["split", "packed"])
def test_import_state_takes_back_what_export_state_gave(layout):
    """A ring handed over (export_state()) and back (import_state(), what NetLoop.detach() gives)
    stands where the datapath left it, and goes on as the ring the datapath ran would."""
    mem, addrs, drv, dev = _mid_lap(layout)
    st = dev.export_state()
    if layout is Layout.SPLIT:
        assert st.signalled_used != st.used_idx
    else:
        assert st.avail_wrap_counter == st.used_wrap_counter == 0 and st.used_since_signal == 2
    taken = device_ring(layout, mem, NUM, addrs, event_idx=True, name="q")
    taken.import_state({key: getattr(st, key) for key in _DEVICE_STATE[layout]})
    assert taken.export_state() == st
    # ... and the two decide and take alike from here.
    drv.enable_cb()
    assert taken.need_notify() == dev.need_notify()
    drv.add([(DATA, 16)], [])
    assert taken.pop().id == dev.pop().id
    assert taken.state() == dev.state()


@pytest.mark.parametrize("layout", [Layout.SPLIT, Layout.PACKED], ids=["split", "packed"])
def test_import_state_refuses_a_state_it_does_not_know_and_takes_nothing(layout):
    _, _, _, dev = _mid_lap(layout)
    before = dev.export_state()
    good = {key: getattr(before, key) for key in _DEVICE_STATE[layout]}
    first = _DEVICE_STATE[layout][0]
    bound = 1 << 16 if layout is Layout.SPLIT else NUM
    bad = [
        {k: v for k, v in good.items() if k != first},  # a key missing
        {**good, "in_flight": 0},  # a key it does not take
        {**{k: v for k, v in good.items() if k != _DEVICE_STATE[layout][-1]}, "_used_since_signal": 0},  # private
        {**good, first: bound},
        {**good, first: -1},
        {**good, first: True},
    ]
    if layout is Layout.PACKED:
        bad.append({**good, "used_wrap_counter": 2})
    for state in bad:
        with pytest.raises(ValueError, match="q: import_state"):
            dev.import_state(state)
        assert dev.export_state() == before
    dev.import_state(good)
    assert dev.export_state() == before
