"""A virtio-net driver for tests and the demo: post RX buffers, send frames, reap both."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from vdpa_svq.errors import RingFull
from vdpa_svq.guest.buffers import BlockPool
from vdpa_svq.guest.notify import wait_notified
from vdpa_svq.memory.guest import GuestMemory
from vdpa_svq.ring import DriverRing

VIRTIO_NET_HDR_LEN = 12  # struct virtio_net_hdr_v1 (VERSION_1 always has num_buffers)
RX_BUFFER = 2048


@dataclass
class NetStats:
    sent: int = 0
    sent_bytes: int = 0
    tx_done: int = 0
    received: int = 0
    received_bytes: int = 0
    kicks: int = 0
    calls: int = 0


@dataclass
class NetDriver:
    """Queue 0 is RX, queue 1 is TX (virtio-net). `kick(index)` notifies the device."""

    mem: GuestMemory
    rx: DriverRing
    tx: DriverRing
    rx_pool: BlockPool
    tx_pool: BlockPool
    kick: Callable[[int], None]
    call_fds: tuple[int, int] = (-1, -1)
    stats: NetStats = field(default_factory=NetStats)
    # (gpa, length) of every RX buffer the device filled, when asked for (to check dirty logs).
    rx_spans: list[tuple[int, int]] | None = None

    def fill_rx(self) -> int:
        """Post as many RX buffers as fit; returns how many were posted."""
        posted = 0
        while self.rx_pool.available and self.rx.num_free:
            gpa = self.rx_pool.get()
            self.rx.add([], [(gpa, self.rx_pool.block_size)], gpa)
            posted += 1
        if posted and self.rx.kick_needed():
            self._kick(0)
        return posted

    def send(self, frame: bytes) -> bool:
        """Queue one frame on TX; False when the TX ring or buffers are full (reap, then retry)."""
        if len(frame) + VIRTIO_NET_HDR_LEN > self.tx_pool.block_size:
            raise ValueError(f"frame of {len(frame)} bytes > TX buffer")
        if not self.tx_pool.available:
            return False
        gpa = self.tx_pool.get()
        self.mem.write(gpa, bytes(VIRTIO_NET_HDR_LEN) + frame)
        try:
            # Header and frame as two descriptors, as Linux does without ANY_LAYOUT tricks.
            self.tx.add([(gpa, VIRTIO_NET_HDR_LEN), (gpa + VIRTIO_NET_HDR_LEN, len(frame))], [], gpa)
        except RingFull:
            self.tx_pool.put(gpa)
            return False
        self.stats.sent += 1
        self.stats.sent_bytes += len(frame)
        return True

    def flush(self) -> None:
        """Kick TX if the device asked for it."""
        if self.tx.kick_needed():
            self._kick(1)

    def reap(self) -> list[bytes]:
        """Take back finished TX buffers and received frames (reposting RX buffers)."""
        while (r := self.tx.get_used()) is not None:
            self.tx_pool.put(r[0])
            self.stats.tx_done += 1
        frames = []
        while (r := self.rx.get_used()) is not None:
            gpa, length = r
            if self.rx_spans is not None:
                self.rx_spans.append((gpa, length))
            if length >= VIRTIO_NET_HDR_LEN:
                frames.append(self.mem.read(gpa + VIRTIO_NET_HDR_LEN, length - VIRTIO_NET_HDR_LEN))
                self.stats.received_bytes += length - VIRTIO_NET_HDR_LEN
            self.rx_pool.put(gpa)
        self.stats.received += len(frames)
        if frames:
            self.fill_rx()
        return frames

    def wait(self, timeout: float) -> None:
        """Sleep until the device calls (or timeout); consume the calls."""
        self.stats.calls += len(wait_notified([fd for fd in self.call_fds if fd >= 0], timeout))

    def _kick(self, index: int) -> None:
        self.stats.kicks += 1
        self.kick(index)
