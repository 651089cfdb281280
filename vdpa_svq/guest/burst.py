"""The C measuring loop of bench.latency's frontend (_burst.c): hands it a net driver's RX and TX rings.

Python keeps the control plane (memory, rings, notifiers, the RX buffers posted at setup); the loop
takes the driver side of both rings over, as they stand, and from then on they are its own: the
Python rings are marked broken (a late Python add or reap would corrupt what C keeps), so a driver
handed to it is done with. What one run does, and what it checks of what the device writes, is in
_burst.c's header; measure_c() in bench/latency.py is how the bench drives it.
"""

from __future__ import annotations

import array
import os
from collections.abc import Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Self

from vdpa_svq.guest.net import VIRTIO_NET_HDR_LEN, NetDriver
from vdpa_svq.memory.guest import GuestMemory
from vdpa_svq.ring import DriverRing, Layout

try:
    from vdpa_svq.guest import _burst
except ImportError:  # pragma: no cover - the extension did not build (setup.py: optional)
    _burst = None

RingError = _burst.RingError if _burst is not None else RuntimeError


@dataclass(frozen=True)
class BurstCounts:
    """What the loop counted in its counted runs (the fields of bench.latency's Cell of the same names)."""

    sent: int
    returned: int  # counted frames back (one round trip each)
    late: int  # frames of the ticks it missed (behind its schedule)
    full: int  # frames not offered: the TX ring was full
    kicks: int  # eventfd writes, TX and RX, when the device asked for them
    frontend_ns: int  # in send + kick + reap
    outstanding: int  # counted frames not back
    reordered: int  # frames (counted or not) that did not come back right after the one sent before them


def available() -> bool:
    return _burst is not None


def _ring_spec(ring: DriverRing, kick_fd: int) -> tuple:
    st = ring.export_state()
    a = st.addrs
    if ring.layout is Layout.SPLIT:
        return (False, st.num, a.desc, a.driver, a.device, st.event_idx, kick_fd, st.avail_idx_shadow, 0,
                st.last_used_idx, 0)
    return (True, st.num, a.desc, a.driver, a.device, st.event_idx, kick_fd, st.next_avail_idx,
            st.avail_wrap_counter, st.last_used_idx, st.used_wrap_counter)


class BurstLoop:
    """A net driver's datapath in C, on `rx` and `tx` (their kick eventfds in `kick_fds`): `burst` frames
    every burst/rate s, taken in turn from `frames` (a whole number of `frame_len`-byte frames of
    guest/frames.py, frame k with sequence number k), each in one of `tx_buffers` (one per TX ring
    entry). RX buffers must be posted (one descriptor each, token = its address), TX must be empty.
    `limit`: counted frames to send at most (0: as many as the time allows)."""

    def __init__(self, mem: GuestMemory, rx: DriverRing, tx: DriverRing, kick_fds: Sequence[int],
                 tx_buffers: Sequence[int], frames: bytes, frame_len: int, rate: float, burst: int,
                 *, limit: int = 0) -> None:
        if _burst is None:
            raise RuntimeError("the C frontend (vdpa_svq/guest/_burst.c) did not build: run "
                               "`python setup.py build_ext --inplace`, or use the Python frontend")
        if len(mem.regions) != 1:
            raise ValueError("the C frontend takes guest memory of one region")
        if rate <= 0 or burst < 1:
            raise ValueError(f"rate {rate} and burst {burst} must be positive")
        if tx.chains_in_flight():
            raise ValueError("TX for the C frontend: none in flight (its buffers are tx_buffers, one per entry)")
        chains = []
        for chain_id, token, slots, writable in rx.chains_in_flight():
            if slots != 1 or not isinstance(token, int):
                raise ValueError("RX buffers for the C frontend are one descriptor each, their address as token")
            chains.append((chain_id, token, writable))
        for ring, fd in ((rx, kick_fds[0]), (tx, kick_fds[1])):
            if ring.kick_needed():  # what Python added and did not kick yet: the loop starts from a clean slate
                os.eventfd_write(fd, 1)
        (region,) = mem.regions
        self._c = _burst.Burst(mem.view(region.gpa, region.size), region.gpa, _ring_spec(rx, kick_fds[0]), chains,
                               _ring_spec(tx, kick_fds[1]), list(tx_buffers), frames, frame_len,
                               max(1, int(1e9 * burst / rate)), burst, limit)
        for ring in (rx, tx):
            ring.broken = True  # the C loop's now

    @classmethod
    def for_net_driver(cls, drv: NetDriver, kick_fds: Sequence[int], frames: bytes, frame_len: int, rate: float,
                       burst: int, *, limit: int = 0) -> Self:
        """On vdpa_svq.guest.net's driver (the vhost-user test client's): TX buffers from its TX pool."""
        if drv.tx_pool.block_size < VIRTIO_NET_HDR_LEN + frame_len or drv.tx_pool.available < drv.tx.num:
            raise ValueError("the TX pool needs a free block per TX ring entry, each header + frame long")
        tx_buffers = [drv.tx_pool.get() for _ in range(drv.tx.num)]
        try:
            return cls(drv.mem, drv.rx, drv.tx, kick_fds, tx_buffers, frames, frame_len, rate, burst, limit=limit)
        except BaseException:
            for gpa in tx_buffers:
                drv.tx_pool.put(gpa)
            raise

    def run(self, seconds: float, *, counting: bool = False) -> None:
        """Send and poll for `seconds` (less once `limit` frames are sent and back); counting: count and time
        what it sends. RingError if the device wrote what no buffer of ours can be, or a frame came back damaged."""
        self._c.run(seconds, counting)

    def drain(self, seconds: float) -> None:
        """Send nothing; poll until every counted frame is back, or `seconds` passed."""
        self._c.run(seconds, False, True)

    def poll_turn_ns(self, n: int = 20000) -> float:
        """ns of one idle turn of the loop (the clock and both used rings read): its polling resolution."""
        return self._c.poll_turn(n)

    def counts(self) -> BurstCounts:
        return BurstCounts(**self._c.stats())

    def rtts(self) -> list[int]:
        """Each counted frame's round trip (ns), in the order they came back."""
        return array.array("q", self._c.rtts()).tolist()

    def close(self) -> None:
        self._c.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None) -> None:
        self.close()
