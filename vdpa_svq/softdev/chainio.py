"""Moving bytes in and out of a descriptor chain through the device's IOTLB."""

from __future__ import annotations

from vdpa_svq.ring import Chain
from vdpa_svq.softdev.iotlb import IotlbMemory


def gather(mem: IotlbMemory, chain: Chain, limit: int | None = None) -> bytes:
    """The chain's device-readable bytes, in order (at most `limit` of them)."""
    parts = []
    left = limit
    for addr, length in chain.readable:
        if left is not None:
            length = min(length, left)
            left -= length
        parts.append(mem.read(addr, length))
        if left == 0:
            break
    return b"".join(parts)


def scatter(mem: IotlbMemory, chain: Chain, data: bytes | memoryview, offset: int = 0) -> int:
    """Write `data` into the chain's device-writable bytes from logical `offset`; return how many fit."""
    src = memoryview(data)
    done = 0
    for addr, length in chain.writable:
        if offset >= length:
            offset -= length
            continue
        n = min(length - offset, len(src) - done)
        mem.write(addr + offset, src[done : done + n])
        done += n
        offset = 0
        if done == len(src):
            break
    return done
