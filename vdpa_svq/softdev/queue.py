"""Per-virtqueue state of a soft device: what the vring ioctls set, the running ring, and stats."""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from kernel_iface.device import PackedVringBase
from vdpa_svq.ring import DeviceRing, PackedDeviceRing, RingAddresses, SplitDeviceRing


@dataclass
class QueueStats:
    """Counters for display; `read_bytes` is what the device read from the driver's buffers."""

    chains: int = 0
    read_bytes: int = 0
    written_bytes: int = 0
    kicks: int = 0
    calls: int = 0
    dropped: int = 0  # chains completed without doing their job (e.g. TX frames with no RX queue)


@dataclass
class SoftQueue:
    index: int
    name: str
    # Registers, as SET_VRING_NUM / ADDR / BASE / ENABLE left them.
    num: int = 0
    addrs: RingAddresses | None = None
    base: int = 0  # raw vhost_vring_state.num; decoded by the negotiated layout when the ring starts
    enabled: bool = False
    # Our own dups of the caller's eventfds (the kernel also keeps its own reference).
    kick_fd: int = -1
    call_fd: int = -1
    err_fd: int = -1  # signalled when the queue breaks (VHOST_SET_VRING_ERR)
    ring: DeviceRing | None = None
    error: str | None = None  # why the queue is broken; stays until reset
    stats: QueueStats = field(default_factory=QueueStats)

    @property
    def usable(self) -> bool:
        return self.ring is not None and self.error is None and not self.ring.broken

    def ring_base(self) -> int:
        """vhost_vring_state.num for GET_VRING_BASE: the live ring's state, else the stored one."""
        ring = self.ring
        if isinstance(ring, SplitDeviceRing):
            return ring.last_avail_idx
        if isinstance(ring, PackedDeviceRing):
            return PackedVringBase(
                ring.next_avail_idx, bool(ring.avail_wrap_counter), ring.next_used_idx, bool(ring.used_wrap_counter)
            ).to_num()
        return self.base

    def stop_ring(self) -> None:
        """Stop using the ring, keeping its state as the base it restarts from."""
        if self.ring is not None:
            self.base = self.ring_base()
            self.ring.close()
            self.ring = None

    def set_fd(self, which: str, fd: int) -> None:
        old = getattr(self, which)
        if old >= 0:
            os.close(old)
        setattr(self, which, fd)

    def forget(self) -> None:
        """Device reset: the ring registers go; the eventfds stay, as vhost keeps them."""
        self.stop_ring()
        self.num, self.addrs, self.base, self.enabled = 0, None, 0, False
        self.error = None
        self.stats = QueueStats()

    def close(self) -> None:
        self.forget()
        self.set_fd("kick_fd", -1)
        self.set_fd("call_fd", -1)
        self.set_fd("err_fd", -1)
