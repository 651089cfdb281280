"""The C frontend loop (vdpa_svq/guest/_burst.c through guest/burst.py): a net driver's datapath that
takes over a driver's RX and TX rings. Against the in-process soft device, every frame comes back whole
and in order; what a device writes into the rings is checked before it is used (VIRTIO 1.2 2.7.8 /
2.8.4: the used id is one the driver made available, the length at most the buffer's writable bytes)."""

from __future__ import annotations

import struct
from collections.abc import Iterator

import pytest

from tests.softdev.driver import RX, TX, NetDriver
from vdpa_svq.guest import burst
from vdpa_svq.guest.burst import BurstLoop, RingError
from vdpa_svq.guest.frames import build_frame
from vdpa_svq.guest.notify import new_eventfd
from vdpa_svq.guest.plan import plan_layout
from vdpa_svq.memory import GuestMemory
from vdpa_svq.ring import Layout
from vdpa_svq.softdev import SoftNetDevice

FRAME = 64
HDR = 12
FRAMES = b"".join(build_frame(k, FRAME) for k in range(1024))
DEADLINE = 60.0  # a bound on a run that ends by itself once its frames are back (a hang fails, it is not timed)


def test_the_extension_built():
    assert burst.available(), "vdpa_svq/guest/_burst.c did not build (python setup.py build_ext --inplace)"


@pytest.mark.parametrize("event_idx", [False, True], ids=["flags", "event_idx"])
@pytest.mark.parametrize("packed", [False, True], ids=["split", "packed"])
def test_every_frame_comes_back_from_the_soft_device_whole_and_in_order(packed, event_idx):
    """5.1.6 (virtio-net's TX then RX) through soft:net's loopback: 3000 frames, bursts of 8 on a ring of
    32 (so both rings wrap many times, 2.7.6 / 2.8.1), each checked byte for byte by the loop."""
    drv = NetDriver(SoftNetDevice(), num=32, packed=packed, event_idx=event_idx, slots=64)
    try:
        drv.post_rx(32)
        q = drv.queues
        tx_buffers = [drv.pool.get() for _ in range(32)]
        with BurstLoop(drv.mem, q[RX].ring, q[TX].ring, (q[RX].kick_fd, q[TX].kick_fd), tx_buffers, FRAMES, FRAME,
                       1e6, 8, limit=3000) as loop:
            loop.run(DEADLINE, counting=True)
            counts, rtts = loop.counts(), loop.rtts()
    finally:
        drv.close()
    assert (counts.sent, counts.returned, counts.outstanding, counts.reordered) == (3000, 3000, 0, 0)
    assert len(rtts) == 3000 and min(rtts) > 0


class Bench:
    """Rings in guest memory with no device behind them: the test writes what a device would."""

    def __init__(self, layout: Layout, rx_posted: int = 4) -> None:
        self.num = 8
        self.plan = plan_layout(layout, self.num, 2, 2048, self.num)
        self.mem = GuestMemory.create(self.plan.size)
        self.rx = self.plan.driver_ring(0, self.mem, layout, event_idx=False, indirect=False, name="rx")
        self.tx = self.plan.driver_ring(1, self.mem, layout, event_idx=False, indirect=False, name="tx")
        self.rx_gpas = [self.plan.pools[0].get() for _ in range(rx_posted)]
        for gpa in self.rx_gpas:
            self.rx.add([], [(gpa, 2048)], gpa)
        self.kicks = [new_eventfd(), new_eventfd()]
        self.tx_buffers = [self.plan.pools[1].get() for _ in range(self.num)]

    def loop(self) -> BurstLoop:
        # One frame: one tick, then it polls until the deadline or an error.
        return BurstLoop(self.mem, self.rx, self.tx, self.kicks, self.tx_buffers, FRAMES, FRAME, 1.0, 1, limit=1)

    def split_used(self, ring_index: int, used_idx: int, elem: tuple[int, int] = (0, 0)) -> None:
        """Write used->ring[0] and used->idx of a split ring, as a device would (2.7.8)."""
        used = self.plan.rings[ring_index].device
        self.mem.write(used + 4, struct.pack("<II", *elem))
        self.mem.write(used + 2, struct.pack("<H", used_idx))

    def packed_used(self, ring_index: int, buf_id: int, length: int) -> None:
        """Mark descriptor 0 of a packed ring used under wrap counter 1 (AVAIL = USED = 1, 2.8.1)."""
        desc = self.plan.rings[ring_index].desc
        self.mem.write(desc + 8, struct.pack("<IHH", length, buf_id, 1 << 7 | 1 << 15))

    def close(self) -> None:
        for ring in (self.rx, self.tx):
            ring.close()
        self.mem.close()


@pytest.fixture(params=list(Layout), ids=lambda layout: layout.value)
def bench(request) -> Iterator[Bench]:
    b = Bench(request.param)
    yield b
    b.close()


def forge(b: Bench, what: str) -> None:
    """The device writes one bad used entry on RX (TX, split only: a packed TX slot is the driver's to fill)."""
    split = b.rx.layout is Layout.SPLIT
    if what == "id out of range":
        b.split_used(0, 1, (200, 0)) if split else b.packed_used(0, 200, 0)
    elif what == "id not in flight":  # ids 0..3 are posted, 5 is not
        b.split_used(0, 1, (5, 0)) if split else b.packed_used(0, 5, 0)
    elif what == "length beyond the buffer":
        b.split_used(0, 1, (0, 2049)) if split else b.packed_used(0, 0, 2049)
    elif what == "damaged frame":
        frame = bytearray(FRAMES[5 * FRAME:6 * FRAME])
        frame[-1] ^= 0xFF
        b.mem.write(b.rx_gpas[0], bytes(HDR) + frame)
        b.split_used(0, 1, (0, HDR + FRAME)) if split else b.packed_used(0, 0, HDR + FRAME)


@pytest.mark.parametrize("what, error", [
    ("id out of range", "rx: used id out of range: 200"),
    ("id not in flight", "rx: used id not in flight: 5"),
    ("length beyond the buffer", "rx: used length beyond the buffer's writable bytes: 2049"),
    ("damaged frame", "frame 5 came back damaged"),
])
def test_a_forged_used_entry_ends_the_run_with_its_reason(bench, what, error):
    """2.7.8.1 / 2.8.4: a device returns only ids the driver made available, writes no more than their
    writable bytes; a loop that met anything else stops for good (no out-of-bounds read or write)."""
    forge(bench, what)
    with bench.loop() as loop:
        with pytest.raises(RingError, match=error):
            loop.run(DEADLINE, counting=True)
        with pytest.raises(RingError, match="the loop stopped: " + error):
            loop.run(DEADLINE)


def test_a_split_used_index_that_jumps_past_the_ring_is_refused():
    """2.7.8: used->idx moves by the entries the device used, never more than the ring holds in flight."""
    b = Bench(Layout.SPLIT)
    try:
        b.split_used(1, 9)  # TX: 9 > num in one step
        with b.loop() as loop, pytest.raises(RingError, match="tx: used idx jumped to 9"):
            loop.run(DEADLINE, counting=True)
    finally:
        b.close()


def test_the_loop_takes_the_rings_and_the_python_rings_refuse_further_use(bench):
    """After the takeover the Python rings' state is stale: using them would corrupt what C keeps."""
    with bench.loop():
        assert bench.rx.broken and bench.tx.broken


def test_a_tx_ring_with_chains_in_flight_is_not_taken():
    b = Bench(Layout.SPLIT)
    try:
        b.tx.add([(b.tx_buffers[0], 10)], [], 1)
        with pytest.raises(ValueError, match="none in flight"):
            b.loop()
    finally:
        b.close()
