"""Chains a driver made available, remembered with their bytes, so that what comes back can be checked.

The in-process rigs (the ring tests, the relay tests, the C-vs-Python differential) put random bytes in
each chain's readable segments and keep them here; the device side checks it read those bytes, and the
driver side checks, when the chain comes back used, that its writable segments hold what the device wrote.
"""

from __future__ import annotations

from dataclasses import dataclass

from vdpa_svq.memory.guest import GuestMemory

Segment = tuple[int, int]  # (guest-physical address, length)


@dataclass
class SentChain:
    """One chain in flight: its segments, the bytes the driver wrote, and (once used) what the device wrote."""

    token: int
    out: list[Segment]  # device-readable
    in_: list[Segment]  # device-writable
    out_bytes: list[bytes]  # what the driver put in `out`, segment by segment
    written: bytes | None = None  # what the device put in `in_`, once it marked the chain used

    def write_out(self, mem: GuestMemory) -> None:
        """Put `out_bytes` into the readable segments (before the chain is made available)."""
        for (gpa, _), data in zip(self.out, self.out_bytes, strict=True):
            mem.write(gpa, data)

    def written_back(self, mem: GuestMemory, length: int) -> bytes:
        """The first `length` bytes (the used element's len) of the writable segments, in order."""
        return b"".join(mem.read(gpa, n) for gpa, n in self.in_)[:length]
