"""What the two sides of a ring exchange: descriptor chains, and where indirect tables live.

Also the rules on a chain that do not depend on the layout, written once for split and packed:
what a driver side may be asked to add (plan_chain), and what a device side checks of every
buffer and indirect table it reads (ChainReader; _ring.h's take_segment is its C twin).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple, NoReturn

from vdpa_svq.errors import GuestMemoryError, RingFull
from vdpa_svq.memory.guest import GuestMemory
from vdpa_svq.ring.layout import DESC_SIZE

VRING_DESC_F_NEXT = 1
VRING_DESC_F_WRITE = 2
VRING_DESC_F_INDIRECT = 4
VRING_PACKED_DESC_F_AVAIL = 1 << 7
VRING_PACKED_DESC_F_USED = 1 << 15

MAX_CHAIN_BYTES = 0xFFFFFFFF  # a used length is le32: a chain may not describe more


@dataclass(slots=True)
class Chain:
    """One available buffer as the device side sees it.

    `id` is what goes back in the used element (split: the head descriptor's index; packed: the
    buffer id). `segments` are (address, length, device-writable) in ring order, readable ones
    first. `ndescs` is how many ring slots it took (1 for an indirect chain): a packed device
    skips that many slots when it marks the buffer used.
    """

    id: int
    segments: list[tuple[int, int, bool]]
    ndescs: int
    indirect: bool = False
    writable_bytes: int = field(default=0)

    @property
    def readable(self) -> list[tuple[int, int]]:
        return [(a, n) for a, n, w in self.segments if not w]

    @property
    def writable(self) -> list[tuple[int, int]]:
        return [(a, n) for a, n, w in self.segments if w]


@dataclass(frozen=True)
class IndirectArea:
    """Guest memory the driver side uses for indirect tables: one table per buffer id.

    Table of id i starts at gpa + i * max_entries * DESC_SIZE, so tables never collide and
    nothing needs allocating on the hot path.
    """

    gpa: int
    max_entries: int

    def table(self, buffer_id: int) -> int:
        return self.gpa + buffer_id * self.max_entries * DESC_SIZE

    @staticmethod
    def size(num: int, max_entries: int) -> int:
        return num * max_entries * DESC_SIZE


class ChainPlan(NamedTuple):
    """A chain a driver side was asked to add, checked, before anything is written to the ring."""

    segments: list[tuple[int, int, int]]  # (address, length, 0 or VRING_DESC_F_WRITE), readable ones first
    indirect: bool  # in an indirect table, behind one ring descriptor
    slots: int  # ring descriptors it takes
    writable: int  # device-writable bytes


def plan_chain(
    out: Sequence[tuple[int, int]],
    in_: Sequence[tuple[int, int]],
    token: Any,
    *,
    indirect: bool,
    indirect_area: IndirectArea | None,
    num: int,
    num_free: int,
    name: str,
) -> ChainPlan:
    """What add() of either driver side writes for readable `out` then writable `in_` buffers.

    Raises ValueError for a request no ring of this size can take, RingFull when `num_free` ring
    descriptors are not enough now (nothing is written then).
    """
    if token is None:
        raise ValueError("token must not be None")
    segs = [(a, n, 0) for a, n in out] + [(a, n, VRING_DESC_F_WRITE) for a, n in in_]
    total = len(segs)
    if total == 0:
        raise ValueError("a chain needs at least one buffer")
    if total > num:
        # 2.7.5.3.1: the driver MUST NOT create a chain longer than the queue, indirect or not.
        raise ValueError(f"{name}: a chain of {total} descriptors is longer than the queue ({num})")
    use_indirect = indirect and total > 1
    if use_indirect and (indirect_area is None or total > indirect_area.max_entries):
        raise ValueError("indirect chain longer than the indirect area allows")
    slots = 1 if use_indirect else total
    if slots > num_free:
        raise RingFull(f"{name}: {slots} descriptors needed, {num_free} free")
    return ChainPlan(segs, use_indirect, slots, sum(n for _, n, f in segs if f))


class ChainReader:
    """A device side's reading of one guest chain: the checks every buffer descriptor and every
    indirect table get, whatever the layout, in the order _ring.h's take_segment makes them.

    `fail(reason)` raises (the ring's GuestRingError at the chain's index, marking it broken).
    The layout-specific rules (how descriptors are linked, where an indirect descriptor may
    stand) stay with the layout.
    """

    __slots__ = ("mem", "fail", "segments", "total", "writable", "seen_write")

    def __init__(self, mem: GuestMemory, fail: Callable[[str], NoReturn]) -> None:
        self.mem = mem
        self.fail = fail
        self.segments: list[tuple[int, int, bool]] = []
        self.total = 0  # bytes described so far
        self.writable = 0  # device-writable bytes so far
        self.seen_write = False

    def take_segment(self, addr: int, length: int, flags: int) -> None:
        """One buffer descriptor: writable ones last (2.7.4.2), inside guest memory, 4 GiB in all."""
        write = bool(flags & VRING_DESC_F_WRITE)
        if write:
            self.seen_write = True
            self.writable += length
        elif self.seen_write:
            self.fail("readable descriptor after a writable one")
        if not self.mem.contains(addr, length):
            self.fail(f"buffer [{addr:#x}, +{length:#x}) outside guest memory")
        self.total += length
        if self.total > MAX_CHAIN_BYTES:
            self.fail("chain longer than 4 GiB")
        self.segments.append((addr, length, write))

    def indirect_table(self, addr: int, length: int, num: int) -> memoryview:
        """The indirect table an indirect descriptor points to, checked, in a queue of size `num`."""
        if length == 0 or length % DESC_SIZE:
            self.fail(f"indirect table length {length} is not a multiple of 16")
        if length // DESC_SIZE > num:
            # 2.7.5.3.1: no chain, indirect tables included, is longer than the queue size.
            self.fail(f"indirect table of {length // DESC_SIZE} descriptors is longer than the queue size {num}")
        try:
            return self.mem.view(addr, length)
        except GuestMemoryError:
            self.fail(f"indirect table [{addr:#x}, +{length:#x}) outside guest memory")

    def chain(self, chain_id: int, ndescs: int, indirect: bool) -> Chain:
        """The chain read, as the device side hands it on."""
        return Chain(chain_id, self.segments, ndescs, indirect, self.writable)
