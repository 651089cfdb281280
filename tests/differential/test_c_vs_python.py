"""The C relay (vdpa_svq._relay) against the Python reference (vdpa_svq.relay), step by step.

The same Hypothesis-generated op sequences run through two RelayRigs that differ only in `impl`,
with the same seeds: after every step the guest memory (rings and buffers), the shadow memory
(ring and indirect tables), the dirty bitmap, the stats, the notifications and the used
(token, len) sequence must be identical, and so must any error (class, queue, reason, index).
"""

from __future__ import annotations

import importlib
import struct
from collections.abc import Callable

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.relay.harness import RelayRig
from vdpa_svq.errors import DeviceRingError, GuestRingError, RingBroken
from vdpa_svq.memory import PAGE_SIZE
from vdpa_svq.memory.iova import IovaMap
from vdpa_svq.ring import Chain, Layout
from vdpa_svq.ring.chain import VRING_DESC_F_INDIRECT, VRING_DESC_F_NEXT, VRING_DESC_F_WRITE

PAIRS = [(g, s) for g in Layout for s in Layout]


def test_c_relay_is_built():
    """The C extension must import here: a broken build may not pass as the Python fallback."""
    mod = importlib.import_module("vdpa_svq._relay")
    from vdpa_svq import relay_impl

    assert relay_impl.AVAILABLE_IMPLS == ("c", "py")
    assert relay_impl.describe().startswith("c ")
    assert hasattr(mod, "CShadowVirtqueue")


# -- the two rigs ---------------------------------------------------------------------------------
def make_pair(guest_layout, shadow_layout, guest_num, shadow_num, event_idx, indirect, seed, fragment=0):
    return [RelayRig(guest_layout, shadow_layout, guest_num, shadow_num, event_idx, seed=seed, indirect=indirect,
                     impl=impl, fragment=fragment) for impl in ("py", "c")]


def error_of(rig: RelayRig):
    e = rig.svq.error
    return None if e is None else (type(e), e.queue, e.reason, e.index)


def ring_state_of(rig: RelayRig) -> dict:
    """What the relay's users read of its rings (the attach engine's switch back to passthrough)."""
    g, s = rig.svq.guest, rig.svq.shadow
    names = ["last_used_idx", "num_free", "free_head", "in_flight", "broken"]
    names += ["avail_idx_shadow"] if rig.shadow_layout is Layout.SPLIT else [
        "next_avail_idx", "avail_wrap_counter", "used_wrap_counter"]
    return {"guest": g.state(), "guest broken": g.broken, "held": rig.svq.held,
            **{f"shadow {n}": getattr(s, n) for n in names}}


def snapshot(rig: RelayRig) -> dict:
    return {
        "ring state": ring_state_of(rig),
        "guest memory": bytes(rig.backing.regions[0].mm),
        "shadow memory": bytes(rig.shadow_mem.regions[0].mm),
        "dirty bitmap": bytes(rig.dirty.bits),
        "stats": rig.svq.stats,
        "used (token, len)": list(rig.used_log),
        "notifications": (rig.device_kicks, rig.guest_calls, rig.device_kicked, rig.guest_called),
        "error": error_of(rig),
        "broken": rig.svq.broken,
    }


def assert_same(py: RelayRig, c: RelayRig, where: str) -> None:
    a, b = snapshot(py), snapshot(c)
    for key in a:
        if a[key] != b[key]:
            detail = ""
            if isinstance(a[key], bytes):
                first = next(i for i, (x, y) in enumerate(zip(a[key], b[key], strict=True)) if x != y)
                detail = f" (first difference at byte {first:#x}: py {a[key][first]:#04x}, c {b[key][first]:#04x})"
            pytest.fail(f"{where}: {key} differs{detail}\n  py: {a[key]!r:.300}\n  c:  {b[key]!r:.300}")


def _add(rig: RelayRig, count: int) -> None:
    for _ in range(count):
        rig.guest_add()


# What each op of OPS below does: ("kind", *arguments).
STEPS: dict[str, Callable[..., object]] = {
    "add": _add,
    "kick": RelayRig.guest_kick,
    "pop": RelayRig.device_on_kick,
    "complete": RelayRig.device_complete,
    "reap": RelayRig.guest_on_call,
}


def apply(rig: RelayRig, op: tuple) -> None:
    kind, *args = op
    STEPS[kind](rig, *args)


def drain_both(py: RelayRig, c: RelayRig) -> None:
    """Run both to completion; only a queue stopped by a RingError may leave buffers behind."""
    outcome = []
    for rig in (py, c):
        try:
            rig.drain()
        except AssertionError:
            if rig.svq.error is None:
                raise  # a stall without an error: a lost notification
        outcome.append(error_of(rig))
    assert outcome[0] == outcome[1]
    assert_same(py, c, "after drain")
    if outcome[0] is None:
        assert py.reaped == py.next_token


OPS = st.lists(
    st.one_of(
        st.tuples(st.just("add"), st.integers(1, 4)),
        st.just(("kick",)),
        st.tuples(st.just("pop"), st.integers(1, 4)),
        st.tuples(st.just("complete"), st.integers(1, 4)),
        st.just(("reap",)),
    ),
    min_size=1,
    max_size=80,
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    pair=st.sampled_from(PAIRS),
    guest_num=st.sampled_from([1, 2, 4, 8]),
    shadow_num=st.sampled_from([1, 2, 3, 4, 5, 8, 16]),
    event_idx=st.booleans(),
    indirect=st.booleans(),
    seed=st.integers(0, 2**32),
    ops=OPS,
)
def test_c_relay_writes_the_same_bytes_as_the_python_relay(pair, guest_num, shadow_num, event_idx, indirect, seed,
                                                           ops):
    """Small rings (wrap-around every few chains), every layout pair, event_idx and indirect on and off.

    Shadow rings too small for the guest's chains are allowed on purpose: both relays must then
    stop with the same "can never fit" error, or hold the same chain for backpressure.
    """
    guest_layout, shadow_layout = pair
    if shadow_layout is Layout.SPLIT and shadow_num & (shadow_num - 1):
        shadow_num = 4
    py, c = make_pair(guest_layout, shadow_layout, guest_num, shadow_num, event_idx, indirect, seed)
    try:
        assert_same(py, c, "fresh")
        for step, op in enumerate(ops):
            for rig in (py, c):
                apply(rig, op)
            assert_same(py, c, f"after step {step} {op}")
        drain_both(py, c)
    finally:
        py.close()
        c.close()


@pytest.mark.parametrize(("guest_layout", "shadow_layout"), PAIRS)
@pytest.mark.parametrize("event_idx", [False, True])
@pytest.mark.parametrize("indirect", [False, True])
def test_c_relay_matches_over_many_laps(guest_layout, shadow_layout, event_idx, indirect):
    """Long runs wrap the 16-bit indexes' low bits and both wrap counters many times over."""
    shadow_num = 8 if indirect else 16
    run_laps(*make_pair(guest_layout, shadow_layout, 4, shadow_num, event_idx, indirect, 11), laps=12, ops=200)


def run_laps(py: RelayRig, c: RelayRig, *, laps: int, ops: int, check=None) -> None:
    """`laps` runs of `ops` random steps in both rigs, compared after each; then closes them."""
    from tests.relay.test_relay import run

    try:
        if check:
            check(c)
        for lap in range(laps):
            for rig in (py, c):
                run(rig, ops)
            assert_same(py, c, f"after lap {lap}")
        assert py.reaped == py.next_token > 100
    finally:
        py.close()
        c.close()


@pytest.mark.parametrize(("guest_layout", "shadow_layout"), PAIRS)
@pytest.mark.parametrize("fragment", [1, 2])
def test_c_relay_matches_with_guest_memory_in_many_regions(guest_layout, shadow_layout, fragment):
    """Guest memory in many regions, mapped at IOVAs in shuffled order: consecutive buffers are in
    different regions and mappings, so the C relay's lookups (which try the region and mapping
    found last first) must find the right one every time."""

    def many_regions(rig: RelayRig) -> None:
        assert len(rig.guest_mem.regions) > 4

    pair = make_pair(guest_layout, shadow_layout, 16, 16, True, False, 5, fragment=fragment)
    run_laps(*pair, laps=6, ops=150, check=many_regions)


@pytest.mark.parametrize(("guest_layout", "shadow_layout"), PAIRS)
def test_buffers_at_region_edges_give_the_same_outcome(guest_layout, shadow_layout):
    """A buffer that ends a region, then one that starts the next (found right after a lookup in
    the region before), then one across the cut (looked up right after one in the region it
    starts in): the first chain is relayed, the second is the guest's error ("outside guest
    memory"), the same in both relays."""
    py, c = make_pair(guest_layout, shadow_layout, 16, 16, False, False, 3, fragment=1)
    try:
        for rig in (py, c):
            cut = rig.data + PAGE_SIZE
            rig.drv.add([(cut - 16, 16)], [(cut, 16), (cut + PAGE_SIZE - 16, 16)], 0)
            rig.svq.on_guest_kick()
            assert rig.svq.error is None
            rig.drv.add([(cut - 32, 8), (cut - 8, 16)], [], 1)
            rig.svq.on_guest_kick()
        assert "outside guest memory" in py.svq.error.reason
        assert_same(py, c, "after the chains at the edges")
    finally:
        py.close()
        c.close()


# -- a guest that breaks its ring ----------------------------------------------------------------
U16, U32, U64 = struct.Struct("<H"), struct.Struct("<I"), struct.Struct("<Q")
FAR = 0x7FFF_0000_0000


def _desc(rig: RelayRig, i: int) -> int:
    return rig.g_addrs.desc + 16 * i


def _w(rig: RelayRig, fmt: struct.Struct, gpa: int, value: int) -> None:
    rig.guest_mem.write(gpa, fmt.pack(value))


def _flags_off(rig):
    return 12 if rig.guest_layout is Layout.SPLIT else 14


# Each corruption: (name, layouts it applies to, function(rig, head_desc_index)). The guest has
# just made one chain of two direct descriptors (readable, then writable) available at slot 0.
def bad_avail_idx(rig, _):
    _w(rig, U16, rig.g_addrs.driver + 2, rig.guest_num + 3)


def bad_head(rig, _):
    _w(rig, U16, rig.g_addrs.driver + 4, rig.guest_num + 1)


def buffer_outside(rig, d):
    _w(rig, U64, _desc(rig, d), FAR)


def writable_then_readable(rig, d):
    flags = U16.unpack(rig.guest_mem.read(_desc(rig, d) + _flags_off(rig), 2))[0]
    _w(rig, U16, _desc(rig, d) + _flags_off(rig), flags | VRING_DESC_F_WRITE)
    nxt = d + 1 if rig.guest_layout is Layout.PACKED else U16.unpack(rig.guest_mem.read(_desc(rig, d) + 14, 2))[0]
    flags = U16.unpack(rig.guest_mem.read(_desc(rig, nxt) + _flags_off(rig), 2))[0]
    _w(rig, U16, _desc(rig, nxt) + _flags_off(rig), flags & ~VRING_DESC_F_WRITE)


def next_out_of_range(rig, d):
    _w(rig, U16, _desc(rig, d) + 14, rig.guest_num + 2)


def descriptor_loop(rig, d):
    nxt = U16.unpack(rig.guest_mem.read(_desc(rig, d) + 14, 2))[0]
    _w(rig, U16, _desc(rig, nxt) + 12, VRING_DESC_F_NEXT)
    _w(rig, U16, _desc(rig, nxt) + 14, d)


def indirect_bad_length(rig, d):
    flags = U16.unpack(rig.guest_mem.read(_desc(rig, d) + _flags_off(rig), 2))[0]
    _w(rig, U16, _desc(rig, d) + _flags_off(rig), (flags & ~VRING_DESC_F_NEXT) | VRING_DESC_F_INDIRECT)
    _w(rig, U32, _desc(rig, d) + 8, 24)


def indirect_outside(rig, d):
    indirect_bad_length(rig, d)
    _w(rig, U32, _desc(rig, d) + 8, 32)
    _w(rig, U64, _desc(rig, d), FAR)


def indirect_chained(rig, d):
    flags = U16.unpack(rig.guest_mem.read(_desc(rig, d) + _flags_off(rig), 2))[0]
    _w(rig, U16, _desc(rig, d) + _flags_off(rig), flags | VRING_DESC_F_INDIRECT)


def indirect_nested(rig, d):
    """An indirect table whose only entry is itself indirect."""
    table = rig.g_indirect.gpa
    split = rig.guest_layout is Layout.SPLIT  # split: addr, len, flags, next; packed: addr, len, id, flags
    entry = (table, 16, VRING_DESC_F_INDIRECT, 0) if split else (table, 16, 0, VRING_DESC_F_INDIRECT)
    rig.guest_mem.write(table, struct.pack("<QIHH", *entry))
    indirect_bad_length(rig, d)
    _w(rig, U32, _desc(rig, d) + 8, 16)
    _w(rig, U64, _desc(rig, d), table)


def buffer_id_out_of_range(rig, d):
    _w(rig, U16, _desc(rig, d + 1) + 12, rig.guest_num + 4)


def chain_longer_than_ring(rig, d):
    """NEXT on every descriptor of the ring (the ones after the chain are writable, like its tail)."""
    flags = U16.unpack(rig.guest_mem.read(_desc(rig, d + 1) + 14, 2))[0]
    _w(rig, U16, _desc(rig, d + 1) + 14, flags | VRING_DESC_F_NEXT)
    for i in range(d + 2, rig.guest_num):
        _w(rig, U16, _desc(rig, i) + 14, VRING_DESC_F_NEXT | VRING_DESC_F_WRITE)


CORRUPTIONS = [
    (bad_avail_idx, {Layout.SPLIT}, "avail idx moved from 0 to"),
    (bad_head, {Layout.SPLIT}, "out of range"),
    (buffer_outside, set(Layout), "outside guest memory"),
    (writable_then_readable, set(Layout), "readable descriptor after a writable one"),
    (next_out_of_range, {Layout.SPLIT}, "next"),
    (descriptor_loop, {Layout.SPLIT}, "descriptor loop"),
    (indirect_bad_length, set(Layout), "is not a multiple of 16"),
    (indirect_outside, set(Layout), "indirect table"),
    (indirect_chained, set(Layout), "indirect descriptor chained with others"),
    (indirect_nested, set(Layout), "indirect descriptor inside an indirect table"),
    (buffer_id_out_of_range, {Layout.PACKED}, "buffer id"),
    (chain_longer_than_ring, {Layout.PACKED}, "chain longer than the ring"),
]


def _one_chain_then(rig: RelayRig, corrupt) -> None:
    base = rig.data
    rig.drv.add([(base, 64)], [(base + 256, 64)], 0)
    corrupt(rig, 0)
    rig.svq.on_guest_kick()


# Only the combinations a corruption can be written in (e.g. a buffer id exists only in packed rings).
MALFORMED_CASES = [
    pytest.param(g, s, corrupt, reason, id=f"{corrupt.__name__}-{g.value}-{s.value}")
    for corrupt, layouts, reason in CORRUPTIONS
    for g, s in PAIRS
    if g in layouts
]


@pytest.mark.parametrize(("guest_layout", "shadow_layout", "corrupt", "reason"), MALFORMED_CASES)
def test_malformed_guest_ring_gives_the_same_error(guest_layout, shadow_layout, corrupt, reason):
    """Never trust the guest (VIRTIO 1.2 2.7.5.3, 2.8.6): same GuestRingError, reason and index."""
    py, c = make_pair(guest_layout, shadow_layout, 4, 8, False, True, 0)
    try:
        for rig in (py, c):
            _one_chain_then(rig, corrupt)
        assert isinstance(py.svq.error, GuestRingError), py.svq.error
        assert reason in py.svq.error.reason
        assert error_of(py) == error_of(c)
        assert_same(py, c, "after the error")
        for rig in (py, c):  # a broken queue ignores further events
            rig.svq.on_guest_kick()
            rig.svq.on_device_call()
        assert_same(py, c, "after more events")
    finally:
        py.close()
        c.close()


@pytest.mark.parametrize("shadow_layout", list(Layout))
def test_avail_idx_broken_while_a_chain_is_held_gives_the_same_error(shadow_layout):
    """The C relay reads the guest's avail->idx once per burst, not per chain; a new burst reads it
    afresh, as the Python pop reads it every time. A driver that breaks avail->idx (2.7.13) while
    the shadow ring is full and a chain held: the next burst, when the device frees room, stops
    with the same error in both, rather than the C relay going on with the chains it saw earlier."""
    py, c = make_pair(Layout.SPLIT, shadow_layout, 8, 2, False, False, 0)
    try:
        for rig in (py, c):
            base = rig.data
            for i in range(4):
                rig.drv.add([(base + i * 256, 64)], [], i)
            rig.svq.on_guest_kick()
            assert rig.svq.held and rig.svq.stats.forwarded == 2  # two in the shadow ring, the third held
            _w(rig, U16, rig.g_addrs.driver + 2, 4 + rig.guest_num + 1)
            for chain in [rig.dev.pop(), rig.dev.pop()]:
                rig.dev.push_used(chain, 0)
            rig.svq.on_device_call()  # room: the held chain goes, then the next burst's pop
        assert isinstance(py.svq.error, GuestRingError), py.svq.error
        assert "avail idx moved from 3 to" in py.svq.error.reason
        assert error_of(py) == error_of(c)
        assert_same(py, c, "after the error")
    finally:
        py.close()
        c.close()


@pytest.mark.parametrize(("guest_layout", "shadow_layout"), PAIRS)
def test_chain_that_can_never_fit_the_shadow_ring_gives_the_same_error(guest_layout, shadow_layout):
    py, c = make_pair(guest_layout, shadow_layout, 8, 2, False, False, 0)
    try:
        for rig in (py, c):
            base = rig.data
            rig.drv.add([(base, 8), (base + 256, 8)], [(base + 512, 8)], 0)
            rig.svq.on_guest_kick()
        assert isinstance(py.svq.error, GuestRingError)
        assert py.svq.error.reason == "chain of 3 descriptors can never fit the shadow ring"
        assert error_of(py) == error_of(c)
    finally:
        py.close()
        c.close()


@pytest.mark.parametrize(("guest_layout", "shadow_layout"), PAIRS)
@pytest.mark.parametrize("zero_length", [False, True])
def test_buffer_the_device_cannot_reach_gives_the_same_error(guest_layout, shadow_layout, zero_length):
    """A guest buffer in a hole of the IOVA map: the translation error names the unmapped piece."""
    py, c = make_pair(guest_layout, shadow_layout, 4, 8, False, False, 0)
    try:
        for rig in (py, c):
            hole = IovaMap()
            region = rig.guest_mem.regions[0]
            hole.add(0, rig.data + 0x100, 0)  # the second block of the data area onwards is unmapped
            hole.add(rig.data + 0x200, region.size - rig.data - 0x200, rig.data + 0x200)
            if rig.impl == "c":
                rig.svq.close()
            rig.svq = rig.make_svq(hole)
            # [data+0xF0, +0x40) crosses into the hole; an empty buffer at the hole is still translated.
            rig.drv.add([(rig.data + 0x100, 0) if zero_length else (rig.data + 0xF0, 0x40)], [], 0)
            rig.svq.on_guest_kick()
        assert isinstance(py.svq.error, GuestRingError)
        assert "not mapped for the device" in py.svq.error.reason
        assert error_of(py) == error_of(c)
    finally:
        py.close()
        c.close()


@settings(max_examples=150, deadline=None)
@given(
    pair=st.sampled_from(PAIRS),
    seed=st.integers(0, 2**32),
    pokes=st.lists(st.tuples(st.integers(0, 0x3FF), st.integers(0, 255)), min_size=1, max_size=12),
    adds=st.integers(1, 4),
)
def test_random_guest_ring_corruption_gives_the_same_outcome(pair, seed, pokes, adds):
    """Random bytes written over the guest's descriptor and driver areas, then a kick: the relays
    must agree on everything (forwarding, or the same error)."""
    py, c = make_pair(*pair, 4, 8, True, True, seed)
    try:
        for rig in (py, c):
            for _ in range(adds):
                rig.guest_add()
            span = 16 * rig.guest_num + 0x40
            for off, value in pokes:
                rig.guest_mem.write(rig.g_addrs.desc + off % span, bytes([value]))
            rig.svq.on_guest_kick()
            rig.device_on_kick(8)
        assert_same(py, c, "after the corrupted kick")
    finally:
        py.close()
        c.close()


# -- a device that breaks the shadow ring ---------------------------------------------------------
def _device_returns(rig: RelayRig, how: str) -> None:
    rig.guest_add()
    rig.guest_add()
    rig.guest_kick()
    rig.device_on_kick(4)
    assert rig.at_device, "the device got nothing to break"
    good = rig.at_device[0]
    n = rig.shadow_num
    if how == "id out of range":
        bad = Chain(n + 3, good.segments, good.ndescs, good.indirect, good.writable_bytes)
        rig.dev._in_flight.extend(bytes(8))  # our device ring would refuse to write it otherwise
        rig.dev.push_used(bad, 0)
    elif how == "id not in use":
        free_id = next(i for i in range(n) if not rig.dev._in_flight[i])
        bad = Chain(free_id, good.segments, good.ndescs, good.indirect, good.writable_bytes)
        rig.dev.push_used(bad, 0)
    elif how == "length over writable":
        # Only a chain with writable bytes can be over them (a read-only one's length is read as 0).
        good = next((c for c in rig.at_device if c.writable_bytes), None)
        assert good is not None, "no writable chain reached the device (the seed decides)"
        rig.dev.push_used(good, good.writable_bytes + 1)
    elif how == "used idx jumped":
        rig.dev_mem.write(rig.s_addrs.device + 2, U16.pack(n + 2))
    rig.svq.on_device_call()


DEVICE_FAULTS = {
    "id out of range": "out of range",
    "id not in use": "is not",
    "length over writable": "used length",
    "used idx jumped": "used idx jumped",
}


DEVICE_CASES = [
    pytest.param(g, s, how, id=f"{how}-{g.value}-{s.value}")
    for how in DEVICE_FAULTS
    for g, s in PAIRS
    if not (how == "used idx jumped" and s is Layout.PACKED)  # packed rings have no used index
]


@pytest.mark.parametrize(("guest_layout", "shadow_layout", "how"), DEVICE_CASES)
def test_device_returning_a_bad_used_element_gives_the_same_error(guest_layout, shadow_layout, how):
    """Never trust the device (VIRTIO 1.2 2.7.8 used ring, 2.8.4 / 2.8.6 used descriptor length and buffer id):
    same DeviceRingError, reason and index."""
    py, c = make_pair(guest_layout, shadow_layout, 4, 8, False, False, 7)  # 7: a writable chain among the first
    try:
        for rig in (py, c):
            _device_returns(rig, how)
        assert isinstance(py.svq.error, DeviceRingError), py.svq.error
        assert DEVICE_FAULTS[how] in py.svq.error.reason
        assert error_of(py) == error_of(c)
        assert_same(py, c, "after the error")
        broken = []
        for rig in (py, c):  # called directly (not through the guarded handlers), the broken ring refuses
            with pytest.raises(RingBroken) as exc:
                rig.svq.forward_used()
            broken.append(str(exc.value))
        assert broken[0] == broken[1] == "shadow: queue is broken"
    finally:
        py.close()
        c.close()


@pytest.mark.parametrize(("guest_layout", "shadow_layout"), PAIRS)
def test_dirty_log_too_small_gives_the_same_error(guest_layout, shadow_layout):
    """A log that ends before the buffers: DirtyBitmap.mark's ValueError, same message, same moment."""
    from vdpa_svq.dirty import DirtyBitmap

    py, c = make_pair(guest_layout, shadow_layout, 4, 8, False, False, 3)
    errors = []
    try:
        for rig in (py, c):
            rig.dirty = DirtyBitmap(rig.data)  # the rings are logged, the data pages are beyond the log
            rig.svq = rig.make_svq(rig.iova)
            rig.drv.add([], [(rig.data + 0x10, 0x40)], 0)
            rig.guest_kick()
            rig.device_on_kick(4)
            (chain,) = rig.at_device
            rig.dev.push_used(chain, 0x40)
            with pytest.raises(ValueError) as exc:
                rig.svq.on_device_call()  # not a RingError: it goes up to the event loop, in both
            errors.append(str(exc.value))
        assert errors[0] == errors[1] and "beyond the log" in errors[0]
        assert_same(py, c, "after the error")
    finally:
        py.close()
        c.close()
