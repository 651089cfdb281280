"""Fixed-size buffer blocks carved out of guest memory (no allocation on the data path)."""

from __future__ import annotations

from vdpa_svq.errors import VdpaSvqError


class OutOfBuffers(VdpaSvqError):
    """Every block is in flight."""


class BlockPool:
    """`count` blocks of `block_size` bytes from guest-physical address `gpa`."""

    def __init__(self, gpa: int, block_size: int, count: int) -> None:
        self.gpa = gpa
        self.block_size = block_size
        self.count = count
        self._free = list(range(count - 1, -1, -1))

    @property
    def size(self) -> int:
        return self.block_size * self.count

    @property
    def available(self) -> int:
        return len(self._free)

    def get(self) -> int:
        if not self._free:
            raise OutOfBuffers(f"all {self.count} buffers of {self.block_size} bytes are in flight")
        return self.gpa + self._free.pop() * self.block_size

    def put(self, gpa: int) -> None:
        index, rest = divmod(gpa - self.gpa, self.block_size)
        if rest or not 0 <= index < self.count:
            raise ValueError(f"{gpa:#x} is not a block of this pool")
        self._free.append(index)
