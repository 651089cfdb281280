"""A virtio-blk driver for tests and the demo: write, read back, flush, get id."""

from __future__ import annotations

import struct
from collections.abc import Callable
from dataclasses import dataclass, field

from vdpa_svq.guest.buffers import BlockPool
from vdpa_svq.guest.notify import wait_notified
from vdpa_svq.memory.guest import GuestMemory
from vdpa_svq.ring import DriverRing

SECTOR = 512
VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT, VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_GET_ID = 0, 1, 4, 8
VIRTIO_BLK_S_OK, VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_UNSUPP = 0, 1, 2
REQ_HEADER = struct.Struct("<IIQ")  # type, reserved, sector
ID_BYTES = 20


class BlkIOError(IOError):
    """The device answered a request with a status other than OK."""


@dataclass
class BlkStats:
    requests: int = 0
    bytes_written: int = 0
    bytes_read: int = 0
    kicks: int = 0


@dataclass
class BlkDriver:
    """Synchronous requests on queue 0: each call submits one chain and waits for it."""

    mem: GuestMemory
    vq: DriverRing
    pool: BlockPool  # blocks hold header + data + status
    kick: Callable[[int], None]
    call_fd: int = -1
    timeout: float = 10.0
    stats: BlkStats = field(default_factory=BlkStats)

    def _request(self, rtype: int, sector: int, data: bytes | None, read_len: int) -> bytes:
        gpa = self.pool.get()
        try:
            self.mem.write(gpa, REQ_HEADER.pack(rtype, 0, sector))
            out = [(gpa, REQ_HEADER.size)]
            data_gpa = gpa + REQ_HEADER.size
            in_: list[tuple[int, int]] = []
            if data:
                self.mem.write(data_gpa, data)
                out.append((data_gpa, len(data)))
            if read_len:
                in_.append((data_gpa, read_len))
            status_gpa = data_gpa + max(len(data or b""), read_len)
            self.mem.write(status_gpa, b"\xff")
            in_.append((status_gpa, 1))
            self.vq.add(out, in_, gpa)
            if self.vq.kick_needed():
                self.stats.kicks += 1
                self.kick(0)
            self._wait_for(gpa)
            status = self.mem.read(status_gpa, 1)[0]
            if status != VIRTIO_BLK_S_OK:
                raise BlkIOError(f"request type {rtype} sector {sector}: status {status}")
            self.stats.requests += 1
            return self.mem.read(data_gpa, read_len)
        finally:
            self.pool.put(gpa)

    def _wait_for(self, token: int) -> None:
        waited = 0.0
        while True:
            r = self.vq.get_used()
            if r is not None:
                if r[0] != token:
                    raise AssertionError(f"completion for {r[0]:#x} while waiting for {token:#x}")
                return
            if waited >= self.timeout:
                raise TimeoutError(f"blk request not completed in {self.timeout} s")
            if self.call_fd >= 0:
                wait_notified([self.call_fd], 0.05)
            waited += 0.05

    def write(self, sector: int, data: bytes) -> None:
        if len(data) % SECTOR:
            raise ValueError("writes are whole sectors")
        self._request(VIRTIO_BLK_T_OUT, sector, data, 0)
        self.stats.bytes_written += len(data)

    def read(self, sector: int, length: int) -> bytes:
        data = self._request(VIRTIO_BLK_T_IN, sector, None, length)
        self.stats.bytes_read += length
        return data

    def flush(self) -> None:
        self._request(VIRTIO_BLK_T_FLUSH, 0, None, 0)

    def get_id(self) -> bytes:
        return self._request(VIRTIO_BLK_T_GET_ID, 0, None, ID_BYTES).rstrip(b"\0")
