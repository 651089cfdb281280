"""Malformed rings from the other side (VIRTIO 1.2, 2.7 split and 2.8 packed).

Our device side reads a driver's ring: a violation must raise GuestRingError. Our driver side reads
what a device wrote back: a violation must raise DeviceRingError. Either way the error names the
offending index (split device: the head descriptor, or the avail slot / avail idx when no chain can
be read; packed device: the head's ring slot; driver side: the used slot, or the used idx) and the
problem, and the queue is marked broken: the next call raises RingBroken. Nothing else may come
out (IndexError, struct.error, ValueError, GuestMemoryError), and no access may leave guest memory.

The bad bytes are written by hand straight into guest memory at the addresses place_ring() gives.
Each test changes one field of an otherwise well-formed ring; test_*_well_formed_* check that the
same helpers, with the bad field fixed, build rings the code accepts.
"""

from __future__ import annotations

import contextlib
import random
import signal
import struct
from collections.abc import Callable, Iterator

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from tests.spec.harness import MAX_SEGS, RingPair, random_ops, run_ops
from vdpa_svq.errors import DeviceRingError, GuestRingError, RingBroken, RingError
from vdpa_svq.memory import GuestMemory
from vdpa_svq.ring import Chain, IndirectArea, Layout, device_ring, driver_ring, place_ring
from vdpa_svq.ring.chain import (
    MAX_CHAIN_BYTES,
    VRING_DESC_F_INDIRECT,
    VRING_DESC_F_NEXT,
    VRING_DESC_F_WRITE,
    VRING_PACKED_DESC_F_AVAIL,
    VRING_PACKED_DESC_F_USED,
)
from vdpa_svq.ring.layout import (
    AVAIL_IDX,
    AVAIL_RING,
    DESC,
    DESC_SIZE,
    USED_ELEM,
    USED_IDX,
    USED_RING,
    desc_area_size,
    device_area_size,
    driver_area_size,
)

NEXT, WRITE, INDIRECT = VRING_DESC_F_NEXT, VRING_DESC_F_WRITE, VRING_DESC_F_INDIRECT
AVAIL, USED = VRING_PACKED_DESC_F_AVAIL, VRING_PACKED_DESC_F_USED
SPLIT, PACKED = Layout.SPLIT, Layout.PACKED

NUM = 4
MEM_SIZE = 0x10000
RING_BASE = 0x1000
TABLE = 0x4000  # hand-written indirect tables
TABLE2 = 0x5000
DATA = 0x8000  # data buffers
BIG_MEM_SIZE = 1 << 32  # sparse: only the ring pages are ever touched
U16 = struct.Struct("<H")
PACKED_USED_TAIL = struct.Struct("<IHH")  # len, id, flags of a packed descriptor

# Ranges that do not lie inside MEM_SIZE bytes of guest memory at gpa 0.
OUTSIDE = {
    "past-the-end": (MEM_SIZE, 1),
    "across-the-end": (MEM_SIZE - 8, 16),
    "far-away": (1 << 40, 16),
    "wraps-64-bits": ((1 << 64) - 8, 16),
    "huge-length": (DATA, 0xFFFFFFFF),
}


# -- checking one failure ----------------------------------------------------------------------
@contextlib.contextmanager
def watchdog(seconds: float = 2.0) -> Iterator[None]:
    """Turn a hang (say, a descriptor loop nobody detects) into a failure instead of a stuck run."""

    def on_alarm(signum, frame):
        raise AssertionError(f"the ring code did not answer within {seconds} s (a loop it does not detect?)")

    previous = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def broke_with(ring, error: type[RingError], index: int, *words: str) -> None:
    """The ring's next pop()/get_used() raises exactly `error` naming `index` and `words`; then it is broken.

    The exception is not kept (its traceback holds views of guest memory).
    """
    call: Callable = ring.pop if hasattr(ring, "pop") else ring.get_used
    try:
        with watchdog():
            got = call()
    except RingError as e:
        kind, idx, reason, text = type(e), e.index, e.reason, str(e)
    else:
        pytest.fail(f"{call.__qualname__} accepted the malformed ring and returned {got!r}")
    assert kind is error, f"{kind.__name__} ({reason}), expected {error.__name__}"
    assert idx == index, f"error names index {idx}, expected {index} ({reason})"
    for word in words:
        assert word in reason, f"reason {reason!r} does not say {word!r}"
    assert f"index {index}" in text and ring.name in text
    assert ring.broken
    with pytest.raises(RingBroken):
        call()
    assert not (ring.has_avail() if hasattr(ring, "has_avail") else ring.has_used())


# -- a misbehaving driver, written by hand, in front of our device side -------------------------
class BadDriver:
    """Writes descriptors, indirect tables and the avail ring by hand; `dev` is the ring under test."""

    def __init__(self, layout: Layout, num: int = NUM, mem: GuestMemory | None = None) -> None:
        self.layout, self.num = layout, num
        self.owns_mem = mem is None
        self.mem = GuestMemory.create(MEM_SIZE) if mem is None else mem
        self.addrs, _ = place_ring(layout, num, RING_BASE)
        self.mem.write(self.addrs.desc, bytes(desc_area_size(num)))
        self.mem.write(self.addrs.driver, bytes(driver_area_size(layout, num)))
        self.mem.write(self.addrs.device, bytes(device_area_size(layout, num)))
        self.dev = device_ring(layout, self.mem, num, self.addrs, name="q7")

    def close(self) -> None:
        self.dev.close()
        if self.owns_mem:
            self.mem.close()

    def _pack(self, gpa: int, addr: int, length: int, flags: int, extra: int) -> None:
        """extra: split `next`, packed buffer id."""
        if self.layout is SPLIT:
            DESC.pack_into(self.mem.view(gpa, DESC_SIZE), 0, addr, length, flags, extra)
        else:
            DESC.pack_into(self.mem.view(gpa, DESC_SIZE), 0, addr, length, extra, flags)

    def desc(self, i: int, addr: int, length: int, flags: int = 0, extra: int = 0, *, wrap: int = 1) -> None:
        """Ring descriptor `i`; a packed one is made available under driver wrap counter `wrap`."""
        if self.layout is PACKED:
            flags |= AVAIL if wrap else USED
        self._pack(self.addrs.desc + i * DESC_SIZE, addr, length, flags, extra)

    def table(self, gpa: int, *entries: tuple[int, ...]) -> None:
        """An indirect table: (addr, len, flags[, next]) per entry."""
        for i, (addr, length, flags, *nxt) in enumerate(entries):
            self._pack(gpa + i * DESC_SIZE, addr, length, flags, nxt[0] if nxt else 0)

    def avail(self, *heads: int, idx: int | None = None, start: int = 0) -> None:
        """Split: heads into avail ring slots start.., then avail->idx (default: just after them)."""
        view = self.mem.view(self.addrs.driver, driver_area_size(SPLIT, self.num))
        for k, head in enumerate(heads):
            U16.pack_into(view, AVAIL_RING + 2 * ((start + k) % self.num), head)
        U16.pack_into(view, AVAIL_IDX, (start + len(heads) if idx is None else idx) & 0xFFFF)


def put_chain(g: BadDriver, where: str, last: tuple[int, int, int], first=(DATA, 16, 0)) -> int:
    """Make one chain available whose last buffer is `last` (addr, len, flags).

    where: "alone" (one descriptor), "chained" (`first` -NEXT-> `last` in the ring) or "indirect"
    (both in an indirect table). Returns the index the error must name: split, the head
    descriptor; packed, the head's slot (slot 1: a well-formed chain is taken from slot 0 first).
    """
    fa, fl, ff = first
    if g.layout is SPLIT:
        head = {"alone": 3, "chained": 1, "indirect": 2}[where]
        if where == "alone":
            g.desc(3, *last)
        elif where == "chained":
            g.desc(1, fa, fl, ff | NEXT, 2)
            g.desc(2, *last)
        else:
            g.desc(2, TABLE, 2 * DESC_SIZE, INDIRECT)
            g.table(TABLE, (fa, fl, ff | NEXT, 1), last)
        g.avail(head)
        return head
    g.desc(0, DATA, 16, 0, NUM - 1)
    assert g.dev.pop().id == NUM - 1
    if where == "alone":
        g.desc(1, *last)
    elif where == "chained":
        g.desc(2, *last)
        g.desc(1, fa, fl, ff | NEXT)
    else:
        g.table(TABLE, first, last)
        g.desc(1, TABLE, 2 * DESC_SIZE, INDIRECT)
    return 1


@pytest.fixture
def make_driver() -> Iterator[Callable[..., BadDriver]]:
    made: list[BadDriver] = []

    def make(layout: Layout, num: int = NUM, mem: GuestMemory | None = None) -> BadDriver:
        made.append(BadDriver(layout, num, mem))
        return made[-1]

    yield make
    for g in made:
        with contextlib.suppress(BufferError):  # a failed test's traceback may hold a view
            g.close()


@pytest.fixture(scope="module")
def big_mem() -> Iterator[GuestMemory]:
    """4 GiB of guest memory, so that a single 0xFFFFFFFF-byte buffer fits."""
    mem = GuestMemory.create(BIG_MEM_SIZE)
    yield mem
    mem.close()


def assert_chain_sane(chain: Chain, mem: GuestMemory, num: int) -> None:
    assert 0 <= chain.id < num
    assert 1 <= chain.ndescs <= num
    assert chain.segments or chain.indirect
    seen_write = False
    for addr, length, write in chain.segments:
        assert mem.contains(addr, length), f"segment [{addr:#x}, +{length:#x}) outside guest memory"
        assert not (seen_write and not write), "readable segment after a writable one"
        seen_write |= write
    assert sum(n for _, n, _ in chain.segments) <= MAX_CHAIN_BYTES
    assert chain.writable_bytes == sum(n for _, n, w in chain.segments if w)


layouts = pytest.mark.parametrize("layout", list(Layout), ids=lambda lay: lay.value)


# -- the helpers build rings the code accepts (so every failure below is the bad field's) -------
def test_split_well_formed_hand_built_rings_are_accepted(make_driver):
    """2.7.5, 2.7.5.3, 2.7.6: full-table chain, indirect table, avail idx exactly num ahead, head reuse."""
    g = make_driver(SPLIT)
    for i in range(NUM):
        g.desc(i, DATA + 64 * i, 16 + i, (WRITE if i >= 2 else 0) | (NEXT if i < NUM - 1 else 0), i + 1)
    g.avail(0)
    chain = g.dev.pop()
    assert chain.id == 0 and chain.ndescs == NUM and chain.writable_bytes == 18 + 19
    assert g.dev.pop() is None
    g.dev.push_used(chain, 0)
    g.desc(0, TABLE, NUM * DESC_SIZE, INDIRECT)
    g.table(TABLE, *[(DATA, 16, (WRITE if i else 0) | (NEXT if i < NUM - 1 else 0), i + 1) for i in range(NUM)])
    for i in range(1, NUM):
        g.desc(i, DATA, MEM_SIZE - DATA, WRITE)  # up to the last byte of guest memory
    g.avail(0, 1, 2, 3, start=1)  # idx 5: exactly num ahead of last_avail_idx 1
    chains = [g.dev.pop() for _ in range(NUM)]
    assert [c.id for c in chains] == [0, 1, 2, 3]
    assert chains[0].indirect and len(chains[0].segments) == NUM and chains[0].ndescs == 1
    assert g.dev.pop() is None


def test_packed_well_formed_hand_built_rings_are_accepted(make_driver):
    """2.8.6, 2.8.7, 2.8.17: full-ring chain, wrap, id on the last descriptor, indirect table, id reuse."""
    g = make_driver(PACKED)
    for i in range(NUM):
        g.desc(i, DATA + 64 * i, 16, (WRITE if i >= 2 else 0) | (NEXT if i < NUM - 1 else 0), 3 if i == NUM - 1 else 0)
    chain = g.dev.pop()
    assert chain.id == 3 and chain.ndescs == NUM and chain.writable_bytes == 32
    assert g.dev.pop() is None
    g.dev.push_used(chain, 0)
    # Second lap: driver wrap counter 0.
    g.table(TABLE, *[(DATA, 16, WRITE if i else 0) for i in range(NUM)])
    g.desc(0, TABLE, NUM * DESC_SIZE, INDIRECT, 3, wrap=0)
    for i in range(1, NUM):
        g.desc(i, DATA, 16, 0, i - 1, wrap=0)
    chains = [g.dev.pop() for _ in range(NUM)]
    assert [c.id for c in chains] == [3, 0, 1, 2]
    assert chains[0].indirect and len(chains[0].segments) == NUM
    assert g.dev.pop() is None


@layouts
def test_chain_of_exactly_4_gib_minus_1_is_accepted(make_driver, big_mem, layout):
    """2.7.5.2 / 2.8.13: used lengths are le32, so a chain of 0xFFFFFFFF bytes is the longest there is."""
    g = make_driver(layout, mem=big_mem)
    put_chain(g, "chained", (0, 0, WRITE), first=(0, 0xFFFFFFFF, 0))
    chain = g.dev.pop()
    assert sum(n for _, n, _ in chain.segments) == MAX_CHAIN_BYTES


# -- device side, both layouts ------------------------------------------------------------------
@layouts
@pytest.mark.parametrize("where", ["alone", "chained", "indirect"])
@pytest.mark.parametrize("bad", list(OUTSIDE), ids=str)
def test_buffer_outside_guest_memory_is_rejected(make_driver, layout, where, bad):
    """2.7.5 / 2.8.4: every buffer [addr, addr+len) must be guest memory; never read or write past it."""
    g = make_driver(layout)
    addr, length = OUTSIDE[bad]
    index = put_chain(g, where, (addr, length, WRITE))
    broke_with(g.dev, GuestRingError, index, "buffer", "outside guest memory")


@layouts
@pytest.mark.parametrize("where", ["chained", "indirect"])
def test_readable_descriptor_after_a_writable_one_is_rejected(make_driver, layout, where):
    """2.7.4.2 / 2.8.17: the driver MUST place device-writable descriptors after device-readable ones."""
    g = make_driver(layout)
    index = put_chain(g, where, (DATA + 0x100, 16, 0), first=(DATA, 16, WRITE))
    broke_with(g.dev, GuestRingError, index, "readable descriptor after a writable")


@layouts
@pytest.mark.parametrize("where", ["chained", "indirect"])
def test_chain_longer_than_4_gib_is_rejected(make_driver, big_mem, layout, where):
    """2.7.5.2: no chain longer than 2^32 bytes (and used lengths are le32: 2.7.8, 2.8.13); two 0xFFFFFFFF buffers."""
    g = make_driver(layout, mem=big_mem)
    index = put_chain(g, where, (0, 0xFFFFFFFF, WRITE), first=(0, 0xFFFFFFFF, 0))
    broke_with(g.dev, GuestRingError, index, "4 GiB")


@layouts
def test_indirect_descriptor_inside_an_indirect_table_is_rejected(make_driver, layout):
    """2.7.5.3.1: the driver MUST NOT set INDIRECT within an indirect table; 2.8.19: no flag but WRITE there."""
    g = make_driver(layout)
    g.table(TABLE2, (DATA, 16, 0))
    index = put_chain(g, "indirect", (TABLE2, DESC_SIZE, INDIRECT))
    broke_with(g.dev, GuestRingError, index, "indirect descriptor inside an indirect table")


@pytest.mark.parametrize(
    "layout,how",
    [(SPLIT, "with-NEXT"), (PACKED, "with-NEXT"), (PACKED, "after-other-descriptors")],
    ids=["split-with-NEXT", "packed-with-NEXT", "packed-after-other-descriptors"],
)
def test_indirect_descriptor_chained_with_others_is_rejected(make_driver, layout, how):
    """2.7.5.3.1: the driver MUST NOT set both INDIRECT and NEXT; 2.8.19: it MUST NOT write direct
    descriptors with INDIRECT set in a list linked by NEXT. (A split chain of normal descriptors
    ending in one INDIRECT one is valid: see the xfail test below.)"""
    g = make_driver(layout)
    g.table(TABLE, (DATA, 16, 0))
    if how == "with-NEXT":
        if layout is SPLIT:
            g.desc(1, TABLE, DESC_SIZE, INDIRECT | NEXT, 2)
            g.desc(2, DATA, 16, WRITE)
            g.avail(1)
            index = 1
        else:
            g.desc(1, DATA, 16, WRITE)
            g.desc(0, TABLE, DESC_SIZE, INDIRECT | NEXT)
            index = 0
    else:
        index = put_chain(g, "chained", (TABLE, DESC_SIZE, INDIRECT))
    broke_with(g.dev, GuestRingError, index, "indirect descriptor chained with others")


def test_split_normal_descriptors_then_one_indirect_are_accepted(make_driver):
    """2.7.5.3.2: the device MUST handle zero or more normal chained descriptors followed by a single
    INDIRECT descriptor ("while unusual ... such a layout is valid")."""
    g = make_driver(SPLIT)
    g.table(TABLE, (DATA + 0x100, 16, NEXT, 1), (DATA + 0x200, 32, WRITE))
    put_chain(g, "chained", (TABLE, 2 * DESC_SIZE, INDIRECT), first=(DATA, 8, 0))
    with watchdog():
        chain = g.dev.pop()
    assert chain.segments == [(DATA, 8, False), (DATA + 0x100, 16, False), (DATA + 0x200, 32, True)]
    assert chain.id == 1 and chain.writable_bytes == 32


@layouts
@pytest.mark.parametrize("length", [0, 8, 17, 24, 0xFFFFFFFF])
def test_indirect_table_length_not_a_positive_multiple_of_16_is_rejected(make_driver, layout, length):
    """2.7.5.3 / 2.8.7: an indirect table is len/16 whole descriptors, at least one."""
    g = make_driver(layout)
    g.table(TABLE, (DATA, 16, 0), (DATA, 16, 0))
    index = put_chain(g, "alone", (TABLE, length, INDIRECT))
    broke_with(g.dev, GuestRingError, index, f"indirect table length {length}", "multiple of 16")


@layouts
@pytest.mark.parametrize(
    "addr,length",
    [(MEM_SIZE, 16), (MEM_SIZE - 16, 32), (1 << 40, 16), ((1 << 64) - 16, 32)],
    ids=["past-the-end", "across-the-end", "far-away", "wraps-64-bits"],
)
def test_indirect_table_outside_guest_memory_is_rejected(make_driver, layout, addr, length):
    """2.7.5.3 / 2.8.7: the indirect table itself must be guest memory."""
    g = make_driver(layout)
    index = put_chain(g, "alone", (addr, length, INDIRECT))
    broke_with(g.dev, GuestRingError, index, "indirect table", "outside guest memory")


@layouts
def test_indirect_table_longer_than_the_queue_size_is_rejected(make_driver, layout):
    """2.7.5.3: the queue size "is the maximum possible descriptor chain length", indirect tables
    included (2.7.5.3.1: the driver MUST NOT create a chain longer than the Queue Size); packed
    2.8.5: "if not limited, the maximum number of descriptors in a list is the virt queue size"."""
    g = make_driver(layout)
    n = NUM + 1
    g.table(TABLE, *[(DATA + 16 * i, 16, NEXT if i < n - 1 else 0, i + 1) for i in range(n)])
    index = put_chain(g, "alone", (TABLE, n * DESC_SIZE, INDIRECT))
    broke_with(g.dev, GuestRingError, index, "long")


# -- device side, split -------------------------------------------------------------------------
@pytest.mark.parametrize("idx", [NUM + 1, 0x8000, 0xFFFF])
def test_split_avail_idx_more_than_num_ahead_is_rejected(make_driver, idx):
    """2.7.6: at most Queue Size buffers can be available, so avail->idx never runs > num ahead."""
    g = make_driver(SPLIT)
    g.desc(0, DATA, 16)
    g.avail(0, 0, 0, 0, idx=idx)
    broke_with(g.dev, GuestRingError, idx, "avail idx moved from 0 to")


@pytest.mark.parametrize("head", [NUM, 0xFFFF])
def test_split_head_index_out_of_range_is_rejected(make_driver, head):
    """2.7.6: avail ring entries are heads of descriptor chains, indexes into a table of num entries."""
    g = make_driver(SPLIT)
    g.desc(0, DATA, 16)
    g.avail(0, head)
    assert g.dev.pop().id == 0
    broke_with(g.dev, GuestRingError, 1, f"head {head} out of range")


@pytest.mark.parametrize("shape", ["self", "a-b-a", "whole-table", "indirect-table"])
def test_split_descriptor_loop_is_rejected(make_driver, shape):
    """2.7.5.2 / 2.7.5.3.1: a chain is at most num (table: len/16) long, so a NEXT cycle must stop."""
    g = make_driver(SPLIT)
    if shape == "self":
        head = 1
        g.desc(1, DATA, 16, NEXT, 1)
    elif shape == "a-b-a":
        head = 2
        g.desc(2, DATA, 16, NEXT, 3)
        g.desc(3, DATA, 16, NEXT, 2)
    elif shape == "whole-table":  # longer than the table: every descriptor has NEXT
        head = 0
        for i in range(NUM):
            g.desc(i, DATA, 16, NEXT, (i + 1) % NUM)
    else:
        head = 3
        g.desc(3, TABLE, 3 * DESC_SIZE, INDIRECT)
        g.table(TABLE, (DATA, 16, NEXT, 1), (DATA, 16, NEXT, 2), (DATA, 16, NEXT, 0))
    g.avail(head)
    broke_with(g.dev, GuestRingError, head, "loop")


@pytest.mark.parametrize("where,nxt", [("ring", NUM), ("ring", 0xFFFF), ("indirect-table", 2)])
def test_split_next_out_of_range_is_rejected(make_driver, where, nxt):
    """2.7.5: `next` indexes the descriptor table (or the indirect table) it is in."""
    g = make_driver(SPLIT)
    if where == "ring":
        g.desc(2, DATA, 16, NEXT, nxt)
    else:
        g.desc(2, TABLE, 2 * DESC_SIZE, INDIRECT)
        g.table(TABLE, (DATA, 16, NEXT, 1), (DATA, 16, NEXT, nxt))
    g.avail(2)
    broke_with(g.dev, GuestRingError, 2, f"next {nxt} out of range")


def test_split_head_made_available_twice_while_in_flight_is_rejected(make_driver):
    """2.7.13: a descriptor is the driver's again only once used; the same head twice is a reuse."""
    g = make_driver(SPLIT)
    g.desc(0, DATA, 16)
    g.desc(1, DATA, 16)
    g.avail(0, 1, 0)
    assert [g.dev.pop().id, g.dev.pop().id] == [0, 1]
    broke_with(g.dev, GuestRingError, 2, "head 0", "in flight")


# -- device side, packed ------------------------------------------------------------------------
@pytest.mark.parametrize("where", ["alone", "chained", "indirect"])
@pytest.mark.parametrize("buf_id", [NUM, 0xFFFF])
def test_packed_buffer_id_out_of_range_is_rejected(make_driver, where, buf_id):
    """2.8.6 / 2.8.13: buffer ids (the last descriptor's, or the indirect one's) are < Queue Size."""
    g = make_driver(PACKED)
    g.desc(0, DATA, 16, 0, 1)
    assert g.dev.pop().id == 1
    if where == "alone":
        g.desc(1, DATA, 16, 0, buf_id)
    elif where == "chained":  # only the last descriptor's id counts: the head's is fine
        g.desc(2, DATA, 16, WRITE, buf_id)
        g.desc(1, DATA, 16, NEXT, 0)
    else:
        g.table(TABLE, (DATA, 16, 0), (DATA, 16, WRITE))
        g.desc(1, TABLE, 2 * DESC_SIZE, INDIRECT, buf_id)
    broke_with(g.dev, GuestRingError, 1, f"buffer id {buf_id} out of range")


@pytest.mark.parametrize("num,start", [(1, 0), (NUM, 0), (NUM, 2)])
def test_packed_chain_longer_than_the_ring_is_rejected(make_driver, num, start):
    """2.8.17: no list longer than the Queue Size (no loops); every descriptor with NEXT, all available."""
    g = make_driver(PACKED, num)
    if start:
        g.desc(0, DATA, 16, NEXT, 1)
        g.desc(1, DATA, 16, 0, 1)
        assert g.dev.pop().id == 1
    for k in range(num):
        slot = (start + k) % num
        g.desc(slot, DATA, 16, NEXT, 0, wrap=int(start + k < num))
    broke_with(g.dev, GuestRingError, start, "chain longer than the ring")


@pytest.mark.parametrize("second", ["alone", "chained", "indirect"])
def test_packed_buffer_id_reused_while_in_flight_is_rejected(make_driver, second):
    """2.8.6: a buffer id stays the driver's until the device uses it; no second buffer with it."""
    g = make_driver(PACKED)
    g.desc(0, DATA, 16, 0, 2)
    if second == "alone":
        g.desc(1, DATA, 16, 0, 2)
    elif second == "chained":
        g.desc(1, DATA, 16, NEXT, 0)
        g.desc(2, DATA, 16, WRITE, 2)
    else:
        g.table(TABLE, (DATA, 16, 0))
        g.desc(1, TABLE, DESC_SIZE, INDIRECT, 2)
    assert g.dev.pop().id == 2
    broke_with(g.dev, GuestRingError, 1, "buffer id 2", "in flight")


# -- driver side: what a bad device writes back -------------------------------------------------
class BadDevice:
    """Our driver ring under test; the device's used entries are written by hand."""

    def __init__(self, layout: Layout, num: int = NUM) -> None:
        self.layout, self.num = layout, num
        self.mem = GuestMemory.create(MEM_SIZE)
        self.addrs, _ = place_ring(layout, num, RING_BASE)
        self.drv = driver_ring(layout, self.mem, num, self.addrs, indirect_area=IndirectArea(TABLE, 8), name="q3")

    def close(self) -> None:
        self.drv.close()
        self.mem.close()

    def add(self, n_out: int = 1, n_in: int = 1, length: int = 64, *, indirect: bool = False, token=None) -> int:
        out = [(DATA + 0x100 * i, length) for i in range(n_out)]
        in_ = [(DATA + 0x1000 + 0x100 * i, length) for i in range(n_in)]
        return self.drv.add(out, in_, token if token is not None else ("tok", n_out, n_in), indirect=indirect)

    def used(
        self, slot: int, buf_id: int, length: int, *, idx: int | None = None, wrap: int = 1, write: bool | None = None
    ) -> None:
        """Split: used ring slot `slot`, then used->idx (default slot + 1). Packed: descriptor `slot`,
        with WRITE ("the device wrote into the buffer", 2.8.3) when `write`, by default when length > 0."""
        if self.layout is SPLIT:
            area = self.mem.view(self.addrs.device, device_area_size(SPLIT, self.num))
            USED_ELEM.pack_into(area, USED_RING + 8 * (slot % self.num), buf_id, length)
            U16.pack_into(area, USED_IDX, (slot + 1 if idx is None else idx) & 0xFFFF)
        else:
            flags = ((AVAIL | USED) if wrap else 0) | (WRITE if (length > 0 if write is None else write) else 0)
            view = self.mem.view(self.addrs.desc + slot * DESC_SIZE, DESC_SIZE)
            PACKED_USED_TAIL.pack_into(view, 8, length, buf_id, flags)


@pytest.fixture
def make_device() -> Iterator[Callable[..., BadDevice]]:
    made: list[BadDevice] = []

    def make(layout: Layout, num: int = NUM) -> BadDevice:
        made.append(BadDevice(layout, num))
        return made[-1]

    yield make
    for d in made:
        with contextlib.suppress(BufferError):  # a failed test's traceback may hold a view
            d.close()


@layouts
def test_used_buffers_within_the_rules_are_accepted(make_device, layout):
    """2.7.8 / 2.8.4 / 2.8.6: out of order, length up to the writable bytes (indirect too), then nothing."""
    d = make_device(layout)
    a = d.add(1, 1, 64, token="A")  # 2 descriptors, 64 writable
    b = d.add(1, 0, 64, token="B")  # 1 descriptor, nothing writable
    c = d.add(0, 2, 64, indirect=True, token="C")  # 1 descriptor, 128 writable
    if layout is SPLIT:
        d.used(0, c, 128)
        d.used(1, a, 64)
        d.used(2, b, 0)
    else:  # packed: each used descriptor skips the slots of the chain it returns
        d.used(0, c, 128)
        d.used(1, a, 64)
        d.used(3, b, 0)
    assert [d.drv.get_used() for _ in range(4)] == [("C", 128), ("A", 64), ("B", 0), None]
    assert d.drv.num_free == NUM


@layouts
@pytest.mark.parametrize("bad", ["num", "max"])
def test_used_id_out_of_range_is_rejected(make_device, layout, bad):
    """2.7.8 / 2.8.6: a used id is a head index / buffer id, both < Queue Size (split id is le32)."""
    d = make_device(layout)
    buf_id = NUM if bad == "num" else (0xFFFFFFFF if layout is SPLIT else 0xFFFF)
    d.add(token="first")  # split: head 0 -> 1; packed: id 0 in slots 0, 1
    second = d.add(token="second")  # split: head 2 -> 3; packed: id 1 in slots 2, 3
    d.used(0, second, 64)
    assert d.drv.get_used() == ("second", 64)
    slot = 1 if layout is SPLIT else 2  # packed: the used descriptor skipped the 2 slots of `second`
    d.used(slot, buf_id, 0)
    broke_with(d.drv, DeviceRingError, slot, f"id {buf_id} out of range")


@layouts
@pytest.mark.parametrize("case", ["never-added", "inside-a-chain", "already-reaped"])
def test_used_id_not_in_flight_is_rejected(make_device, layout, case):
    """2.7.8 / 2.8.6: only a buffer the driver made available, and not yet used, can come back used."""
    d = make_device(layout)
    first = d.add(1, 1, 64)  # split: head 0 -> 1; packed: id 0 in slots 0, 1
    slot = 0
    if case == "never-added":
        buf_id = NUM - 1
    elif case == "inside-a-chain":
        buf_id = 1  # split: the chain's second descriptor; packed: the chain's second slot
    else:
        buf_id = first
        d.used(0, first, 64)
        assert d.drv.get_used() == (("tok", 1, 1), 64)
        slot = 1 if layout is SPLIT else 2
    d.used(slot, buf_id, 0)
    broke_with(d.drv, DeviceRingError, slot, f"id {buf_id} is not", "in use")


@layouts
@pytest.mark.parametrize(
    "n_out,n_in,indirect,length",
    [(1, 1, False, 65), (1, 2, True, 129), (0, 1, False, 0xFFFFFFFF)],
    ids=["one-writable", "indirect", "max"],
)
def test_used_length_over_writable_bytes_is_rejected(make_device, layout, n_out, n_in, indirect, length):
    """2.7.8 / 2.8.4: len counts bytes written into the device-writable part, so it cannot exceed it."""
    d = make_device(layout)
    buf_id = d.add(n_out, n_in, 64, indirect=indirect)
    d.used(0, buf_id, length)
    broke_with(d.drv, DeviceRingError, 0, f"used length {length} > writable {64 * n_in}")


@layouts
@pytest.mark.parametrize("length", [1, 76, 0xFFFFFFFF])
def test_used_length_of_a_read_only_chain_is_read_as_zero(make_device, layout, length):
    """A chain with nothing writable had nothing written: its used length means nothing, and DPDK's
    packed vhost reports the bytes it read there (TX). Linux ignores it; so do we: 0, not an error."""
    d = make_device(layout)
    buf_id = d.add(2, 0, 64)
    d.used(0, buf_id, length)
    assert d.drv.get_used() == (("tok", 2, 0), 0)
    assert not d.drv.broken


def test_packed_used_length_counts_even_without_the_write_flag(make_device):
    """2.8.4 calls the length of a used descriptor without VIRTQ_DESC_F_WRITE reserved, but QEMU's
    packed device (virtio.c, virtqueue_packed_fill_desc) never sets WRITE in used descriptors and
    Linux's driver reads the length regardless: as the kernel bench showed with vp_vdpa, a driver
    that ignored it would drop every received frame. We read it as Linux does (and check it)."""
    d = make_device(PACKED)
    buf_id = d.add(0, 1, 64, token="rx")
    d.used(0, buf_id, 42, write=False)
    with watchdog():
        assert d.drv.get_used() == ("rx", 42)


@pytest.mark.parametrize("idx", [NUM + 1, 0x8000, 0xFFFF])
def test_split_used_idx_more_than_num_ahead_is_rejected(make_device, idx):
    """2.7.8: at most Queue Size buffers are in flight, so used->idx never runs > num ahead."""
    d = make_device(SPLIT)
    head = d.add()
    d.used(0, head, 64, idx=idx)
    broke_with(d.drv, DeviceRingError, idx, "used idx jumped from 0 to")


# -- random bytes over a ring in use ------------------------------------------------------------
def _desc_strategy(layout: Layout, num: int, mem_size: int, tables: list[int]) -> st.SearchStrategy[bytes]:
    """A descriptor whose fields are drawn near the values that matter (or anywhere)."""
    addr = st.one_of(
        st.integers(0, mem_size),
        st.sampled_from([0, mem_size - 16, mem_size - 1, mem_size, (1 << 64) - 16, *tables]),
        st.integers(0, (1 << 64) - 1),
    )
    length = st.one_of(
        st.integers(0, 128),
        st.sampled_from([16, 32, 64, 128, 0xFFFFFFF0, 0xFFFFFFFF, mem_size]),
        st.integers(0, 0xFFFFFFFF),
    )
    small = st.one_of(st.integers(0, num), st.integers(0, 0xFFFF))
    if layout is SPLIT:
        flags = st.one_of(st.integers(0, 7), st.integers(0, 0xFFFF))
        return st.builds(lambda a, n, f, x: DESC.pack(a, n, f, x), addr, length, flags, small)
    flags = st.one_of(
        st.builds(lambda lo, hi: lo | hi, st.integers(0, 7), st.sampled_from([0, AVAIL, USED, AVAIL | USED])),
        st.integers(0, 0xFFFF),
    )
    return st.builds(lambda a, n, f, x: DESC.pack(a, n, x, f), addr, length, flags, small)


def scribble(pair: RingPair, data: st.DataObject) -> None:
    """Random bytes over the three ring areas and the indirect tables of `pair`'s ring (in use).

    Either every byte is replaced (with avail/used indexes and heads drawn near the values that
    matter, else almost every ring would fail at the first index check), or a few fields of the
    live ring are: random 1/2/4/8-byte values, or whole descriptors, at random offsets.
    """
    layout, num, mem = pair.layout, pair.num, pair.mem
    addrs = pair.drv.addrs
    area = IndirectArea(pair.indirect_gpa, MAX_SEGS * 2)
    areas = [
        (addrs.desc, desc_area_size(num)),
        (addrs.driver, driver_area_size(layout, num)),
        (addrs.device, device_area_size(layout, num)),
        (area.gpa, IndirectArea.size(num, area.max_entries)),
    ]
    u16 = st.integers(0, 0xFFFF)
    whole = data.draw(st.booleans(), label="replace every byte")
    if whole:
        for gpa, size in areas:
            mem.write(gpa, data.draw(st.binary(min_size=size, max_size=size)))
        if layout is SPLIT:

            def near(base: int) -> int:
                return data.draw(st.one_of(st.builds(lambda k: (base + k) & 0xFFFF, st.integers(0, num + 1)), u16))

            avail = mem.view(addrs.driver, driver_area_size(SPLIT, num))
            used = mem.view(addrs.device, device_area_size(SPLIT, num))
            U16.pack_into(avail, AVAIL_IDX, near(pair.dev.last_avail_idx))
            U16.pack_into(used, USED_IDX, near(pair.drv.last_used_idx))
            for i in range(num):
                U16.pack_into(avail, AVAIL_RING + 2 * i, data.draw(st.one_of(st.integers(0, num - 1), u16)))
                elem_id = data.draw(st.one_of(st.integers(0, num - 1), st.integers(0, 0xFFFFFFFF)))
                U16.pack_into(used, USED_RING + 8 * i, elem_id & 0xFFFF)
                U16.pack_into(used, USED_RING + 8 * i + 2, elem_id >> 16)
            del avail, used
    desc = _desc_strategy(layout, num, mem.size, [area.table(i) for i in range(num)])
    slots = [addrs.desc + DESC_SIZE * i for i in range(num)]
    slots += [area.gpa + DESC_SIZE * i for i in range(num * area.max_entries)]
    for _ in range(data.draw(st.integers(0 if whole else 1, 6), label="mutations")):
        if data.draw(st.booleans()):
            mem.write(data.draw(st.sampled_from(slots)), data.draw(desc))
        else:
            gpa, size = data.draw(st.sampled_from(areas))
            width = data.draw(st.sampled_from([w for w in (1, 2, 4, 8) if w <= size]))
            offset = data.draw(st.integers(0, size - width))
            value = data.draw(st.one_of(st.integers(0, num + 1), st.integers(0, (1 << (8 * width)) - 1)))
            mem.write(gpa + offset, value.to_bytes(width, "little"))


def _kind(reason: str) -> str:
    """The reason without its numbers, to count which checks the random bytes reach."""
    return " ".join(w for w in reason.split() if not any(c.isdigit() for c in w))


def _close(pair: RingPair) -> None:
    with contextlib.suppress(BufferError):  # a propagating traceback may still hold a view of guest memory
        pair.close()


def use_ring(pair: RingPair, seed: int) -> None:
    """Legitimate traffic first, with chains of at most num descriptors (indirect ones too)."""
    if pair.num > 1:
        run_ops(pair, random_ops(random.Random(seed), 25, max_segs=pair.num // 2))


ring_in_use = dict(
    layout=st.sampled_from(list(Layout)),
    num=st.sampled_from([1, 2, 4, 8]),
    event_idx=st.booleans(),
    seed=st.integers(0, 2**16),
    data=st.data(),
)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(**ring_in_use)
def test_device_side_survives_random_ring_bytes(layout, num, event_idx, seed, data):
    """2.7 / 2.8: whatever a driver writes, pop() gives None, a chain inside guest memory, or GuestRingError."""
    pair = RingPair(layout, num, event_idx, seed=seed)
    try:
        use_ring(pair, seed)
        pair.drain()
        indirect = seed % 3 == 0
        while pair.drv.num_free and ((num > 1 and pair.add(1, 1, [16, 48], indirect)) or pair.add(0, 1, [32], False)):
            pass  # fill the ring: as many available chains as fit
        scribble(pair, data)
        dev = pair.dev
        dev.need_notify()
        dev.enable_notify()
        for _ in range(num + 2):
            try:
                with watchdog():
                    chain = dev.pop()
            except GuestRingError as e:
                event(f"pop: GuestRingError: {_kind(e.reason)}")
                assert dev.broken
                with pytest.raises(RingBroken):
                    dev.pop()
                break
            if chain is None:
                event("pop: None")
                break
            event("pop: a chain" + (" (indirect)" if chain.indirect else ""))
            assert_chain_sane(chain, pair.mem, num)
        else:
            pytest.fail("pop() kept returning chains past the ring size")
    finally:
        _close(pair)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(**ring_in_use)
def test_driver_side_survives_random_ring_bytes(layout, num, event_idx, seed, data):
    """2.7 / 2.8: whatever a device writes, get_used() gives None, an in-flight (token, len) or DeviceRingError."""
    pair = RingPair(layout, num, event_idx, seed=seed)
    try:
        use_ring(pair, seed)
        while pair.drv.num_free and pair.add(0, 1, [16], indirect=False):
            pass  # fill the ring: as many chains in flight as fit
        pair.dev_pop(num)
        for _ in range(data.draw(st.integers(0, len(pair.popped)), label="used")):
            pair.dev_complete(seed, 0.5)  # the device uses some, in its own order, for the driver to reap
        writable = {rec.token: sum(n for _, n in rec.in_) for rec in [*pair.by_id.values(), *pair.used_order]}
        scribble(pair, data)
        drv = pair.drv
        drv.kick_needed()
        drv.enable_cb_delayed()
        seen: set[int] = set()
        for _ in range(num + 2):
            try:
                with watchdog():
                    got = drv.get_used()
            except DeviceRingError as e:
                event(f"get_used: DeviceRingError: {_kind(e.reason)}")
                assert drv.broken
                with pytest.raises(RingBroken):
                    drv.get_used()
                break
            if got is None:
                event("get_used: None")
                break
            event("get_used: a buffer")
            token, length = got
            assert token in writable and token not in seen, f"token {token} was not in flight"
            assert 0 <= length <= writable[token]
            seen.add(token)
        else:
            pytest.fail("get_used() kept returning buffers past the ring size")
    finally:
        _close(pair)
