"""What the two sides of a ring exchange: descriptor chains, and where indirect tables live."""

from __future__ import annotations

from dataclasses import dataclass, field

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
