"""A virtio-blk driver for tests and the demo: write, read back, flush, get id."""

from __future__ import annotations

import struct
from collections.abc import Callable
from dataclasses import dataclass, field

from vdpa_svq.guest.buffers import BlockPool
from vdpa_svq.guest.chains import Segment
from vdpa_svq.guest.notify import wait_notified
from vdpa_svq.memory.guest import GuestMemory
from vdpa_svq.ring import DriverRing

SECTOR = 512
VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT, VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_GET_ID = 0, 1, 4, 8
VIRTIO_BLK_S_OK, VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_UNSUPP = 0, 1, 2
REQ_HEADER = struct.Struct("<IIQ")  # type, reserved, sector
ID_BYTES = 20
STATUS_UNANSWERED = 0xFF  # no status a device sends: a request it never answered shows


def request_chain(
    mem: GuestMemory, rtype: int, sector: int, header: int, out: list[Segment], in_: list[Segment], status: int
) -> tuple[list[Segment], list[Segment]]:
    """The chain of one request (VIRTIO 1.2 5.2.6): the header at `header` (written here), the data
    segments `out` (device-readable) and `in_` (device-writable), the status byte at `status`
    (set to STATUS_UNANSWERED here). Returns the chain's readable and writable segments."""
    mem.write(header, REQ_HEADER.pack(rtype, 0, sector))
    mem.write(status, bytes([STATUS_UNANSWERED]))
    return [(header, REQ_HEADER.size), *out], [*in_, (status, 1)]


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
            # One block: header, data, status byte.
            data_gpa = gpa + REQ_HEADER.size
            if data:
                self.mem.write(data_gpa, data)
            out = [(data_gpa, len(data))] if data else []
            in_ = [(data_gpa, read_len)] if read_len else []
            status_gpa = data_gpa + max(len(data or b""), read_len)
            self.vq.add(*request_chain(self.mem, rtype, sector, gpa, out, in_, status_gpa), gpa)
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
