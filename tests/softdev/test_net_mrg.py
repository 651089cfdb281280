"""SoftNetDevice with VIRTIO_NET_F_MRG_RXBUF: a received frame spread over several RX buffers.

VIRTIO 1.2 5.1.6.4.1 (device requirements, processing of incoming packets): with MRG_RXBUF the
device sets num_buffers to the number of buffers the packet (header included) is spread over,
uses every buffer but the last to its full length, and uses all of a packet's buffers together,
so that the driver sees at least num_buffers of them used. 5.1.6.3.1: every buffer the driver
posts is at least a virtio_net_hdr long. Without MRG_RXBUF num_buffers is 1 and a buffer too
small truncates the frame (tests/softdev/test_net.py). The device's own rule (net.py's
docstring): a frame waits whole in the TX ring until there are RX buffers enough for it.
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kernel_iface import uapi
from tests.softdev.driver import NET_HDR, RX, SLOT, TX, NetDriver, net_hdr
from vdpa_svq.memory import GuestMemory
from vdpa_svq.ring import Layout, device_ring, driver_ring, place_ring
from vdpa_svq.softdev import SoftNetDevice

MRG = 1 << uapi.VIRTIO_NET_F_MRG_RXBUF
LAYOUTS = [pytest.param(False, id="split"), pytest.param(True, id="packed")]


@dataclass
class Received:
    packet: bytes  # header (as written, num_buffers included) + frame
    num_buffers: int
    lengths: list[int]  # each used element's len, in used order


class MrgDriver(NetDriver):
    """NetDriver with MRG_RXBUF acked, RX buffers of any size, and packets longer than a slot."""

    def setup(self) -> None:
        self.session.extra_features |= MRG
        super().setup()
        assert self.session.features & MRG

    def post(self, sizes: list[int], *, split_at: int | None = None) -> None:
        """One RX buffer per size (a pool slot each), in two descriptors when split_at < size."""
        ring = self.queues[RX].ring
        for size in sizes:
            assert 0 < size <= SLOT
            gpa = self.pool.get()
            two = split_at is not None and split_at < size
            in_ = [(gpa, split_at), (gpa + split_at, size - split_at)] if two else [(gpa, size)]  # type: ignore[operator]
            ring.add((), in_, gpa, indirect=self.session.indirect)
        self.kick(RX)

    def send_packet(self, packet: bytes, *, kick: bool = True) -> None:
        """A header + frame of any length, in SLOT-sized descriptors."""
        pieces = [packet[i : i + SLOT] for i in range(0, len(packet), SLOT)]
        gpas = [self.pool.get() for _ in pieces]
        for gpa, piece in zip(gpas, pieces, strict=True):
            self.mem.write(gpa, piece)
        out = [(gpa, len(piece)) for gpa, piece in zip(gpas, pieces, strict=True)]
        self.queues[TX].ring.add(out, (), tuple(gpas), indirect=self.session.indirect)
        if kick:
            self.kick(TX)

    def receive(self, count: int) -> list[Received]:
        """`count` packets, each from its first buffer's num_buffers; the rest of a packet's buffers
        must be used already when its first one is (5.1.6.4.1: used together)."""
        ring = self.queues[RX].ring
        got = []
        for _ in range(count):
            ((gpa, n),) = self.reap(RX, 1)
            first = self.mem.read(gpa, n)  # type: ignore[arg-type]
            self.pool.put(gpa)  # type: ignore[arg-type]
            num_buffers = int.from_bytes(first[10:12], "little")
            parts, lengths = [first], [n]
            for _ in range(num_buffers - 1):
                r = ring.get_used()
                assert r is not None, f"{len(lengths)} of {num_buffers} buffers used: not all together"
                gpa, n = r
                parts.append(self.mem.read(gpa, n))  # type: ignore[arg-type]
                self.pool.put(gpa)  # type: ignore[arg-type]
                lengths.append(n)
            got.append(Received(b"".join(parts), num_buffers, lengths))
        return got

    def serviced(self, qi: int, kicks: int) -> None:
        """Wait until the device has counted `kicks` kicks of queue qi: it takes each kick and
        serves it under one hold of its lock, so the pass for the last one is over too."""
        name = self.dev.queues[qi].name
        deadline = time.monotonic() + 5.0
        while self.dev.stats()[name].kicks < kicks:
            assert time.monotonic() < deadline, f"the device never took kick {kicks} of {name}"
            time.sleep(0.001)


def packet(seq: int, frame_len: int) -> bytes:
    """A header with recognisable bytes (num_buffers 0) and a frame that derives from seq."""
    rng = random.Random(seq)
    return net_hdr(seq) + rng.randbytes(frame_len)


def as_received(sent: bytes, num_buffers: int) -> bytes:
    return sent[:10] + num_buffers.to_bytes(2, "little") + sent[NET_HDR:]


@pytest.fixture
def make_mrg():
    made: list[MrgDriver] = []

    def make(**kw: object) -> MrgDriver:
        drv = MrgDriver(SoftNetDevice(), **kw)  # type: ignore[arg-type]
        made.append(drv)
        return drv

    yield make
    for drv in made:
        drv.close()


@pytest.mark.parametrize("layout", [Layout.SPLIT, Layout.PACKED])
def test_staged_used_buffers_appear_together_across_the_ring_end(layout):
    """What a merged packet's buffers rest on: stage_used() writes a used element the driver
    cannot see yet; publish_used() shows every staged one at once (split: one used->idx store;
    packed: the first one's flags last), here across the ring's end (packed: a wrap flip)."""
    num = 4
    addrs, end = place_ring(layout, num, 0x1000)
    mem = GuestMemory.create(end + 0x10000)
    drv = driver_ring(layout, mem, num, addrs)
    dev = device_ring(layout, mem, num, addrs)
    try:
        buf = end
        for token in range(3):  # move both sides to slot 3: the next batch spans the ring's end
            drv.add((), [(buf, 16)], token)
            dev.push_used(dev.pop(), 16)
            assert drv.get_used() == (token, 16)
        for token in range(3, 6):
            drv.add((), [(buf + 16 * token, 16)], token)
        chains = [dev.pop() for _ in range(3)]
        for i, chain in enumerate(chains):
            dev.stage_used(chain, 10 + i)
            assert not drv.has_used() and drv.get_used() is None
        dev.publish_used()
        assert [drv.get_used() for _ in range(3)] == [(3, 10), (4, 11), (5, 12)]
        assert dev.publish_used() == ()  # nothing staged: nothing written
    finally:
        drv.close()
        dev.close()
        mem.close()


def test_soft_net_offers_mrg_rxbuf():
    with SoftNetDevice() as dev:
        assert dev.get_features() & MRG


@pytest.mark.parametrize("packed", LAYOUTS)
@pytest.mark.parametrize("split_at", [None, NET_HDR, 7], ids=["one-desc", "hdr-desc", "desc-inside-hdr"])
@pytest.mark.parametrize("k", [1, 2, 3, 5])
def test_a_frame_spans_k_buffers_each_full_but_the_last(make_mrg, packed, split_at, k):
    """A packet of k buffers' worth (the last one part full) fills k buffers in ring order, every
    one but the last to its full size; num_buffers = k in the first; the used lengths add up."""
    drv = make_mrg(packed=packed, num=16)
    size = 100
    drv.post([size] * 8, split_at=split_at)
    sent = packet(k, (k - 1) * size + 37 - NET_HDR)
    drv.send_packet(sent)
    (got,) = drv.receive(1)
    assert got.num_buffers == k
    assert got.lengths == [size] * (k - 1) + [37]
    assert got.packet == as_received(sent, k)
    assert drv.complete_tx(1) == 1
    stats = drv.dev.stats()
    assert stats["rx"].chains == k and stats["rx"].written_bytes == len(sent)
    assert stats["tx"].dropped == 0 and drv.dev.queue_errors() == {}


@pytest.mark.parametrize("packed", LAYOUTS)
def test_exactly_fitting_takes_one_buffer_one_byte_over_takes_two(make_mrg, packed):
    """A packet as long as the buffer: num_buffers 1, len = the buffer. One byte longer: the first
    buffer full, the second with that one byte, num_buffers 2."""
    drv = make_mrg(packed=packed, num=16)
    size = 300
    drv.post([size] * 4)
    exact, over = packet(1, size - NET_HDR), packet(2, size - NET_HDR + 1)
    drv.send_packet(exact)
    drv.send_packet(over)
    a, b = drv.receive(2)
    assert (a.num_buffers, a.lengths, a.packet) == (1, [size], as_received(exact, 1))
    assert (b.num_buffers, b.lengths, b.packet) == (2, [size, 1], as_received(over, 2))


@pytest.mark.parametrize("packed", LAYOUTS)
def test_frame_waits_whole_until_enough_buffers_then_completes(make_mrg, packed):
    """Two buffers for a packet that needs four: nothing is used on either queue (no half
    frame); the frame behind it waits too (in order). Two more buffers: the first packet comes
    in the four, then the second once its buffer is posted."""
    drv = make_mrg(packed=packed, num=16)
    size = 128
    drv.post([size] * 2)
    big, small = packet(1, 4 * size - NET_HDR - 5), packet(2, 50)
    drv.send_packet(big, kick=False)
    drv.send_packet(small, kick=False)
    kicks = drv.dev.stats()["tx"].kicks
    assert drv.kick(TX)
    drv.serviced(TX, kicks + 1)
    assert drv.reap_all(RX) == [] and drv.reap_all(TX) == []
    stats = drv.dev.stats()
    assert stats["rx"].chains == stats["tx"].chains == 0
    drv.post([size] * 2)
    (got,) = drv.receive(1)
    assert (got.num_buffers, got.lengths, got.packet) == (4, [size] * 3 + [size - 5], as_received(big, 4))
    drv.post([size])
    (got,) = drv.receive(1)
    assert got.packet == as_received(small, 1)
    assert drv.complete_tx(2) == 2
    assert drv.dev.stats()["tx"].dropped == 0


@pytest.mark.parametrize("packed", LAYOUTS)
def test_frames_across_the_ring_end_many_times(make_mrg, packed):
    """Through an 8-entry RX ring, 120 packets of 1..4 buffers: frames start and end anywhere in
    the ring, so many span its end (split: the avail/used index modulo num; packed: the wrap
    counters flip between a frame's buffers). Every packet arrives whole, in order."""
    drv = make_mrg(packed=packed, num=8)
    size = 64
    rng = random.Random(7)
    drv.post([size] * 8)
    for seq in range(120):
        sent = packet(seq, rng.randint(1, 4 * size - NET_HDR))
        drv.send_packet(sent)
        (got,) = drv.receive(1)
        want = -(-len(sent) // size)
        assert got.num_buffers == want, seq
        assert got.packet == as_received(sent, want), seq
        assert drv.complete_tx(1) == 1
        drv.post([size] * want)
    assert drv.dev.queue_errors() == {}


@pytest.mark.parametrize("packed", LAYOUTS)
def test_frame_longer_than_the_whole_ring_is_dropped_and_the_ring_stays_usable(make_mrg, packed):
    """Every descriptor of the RX ring posted and still too little room: no more can come, so
    waiting would stall TX for good. The frame is dropped (TX completed, counted); the RX
    buffers stay with the device, untouched, for the next frame."""
    drv = make_mrg(packed=packed, num=4)
    drv.post([50] * 4)
    drv.send_packet(packet(1, 4 * 50))  # 12 bytes too many for 4 x 50
    assert drv.complete_tx(1) == 1
    assert drv.dev.stats()["tx"].dropped == 1
    assert drv.reap_all(RX) == []
    sent = packet(2, 150 - NET_HDR)
    drv.send_packet(sent)
    (got,) = drv.receive(1)
    assert (got.num_buffers, got.lengths, got.packet) == (3, [50, 50, 50], as_received(sent, 3))


@pytest.mark.parametrize("packed", LAYOUTS)
def test_buffer_shorter_than_a_header_breaks_rx(make_mrg, packed):
    """5.1.6.3.1: with MRG_RXBUF every buffer is at least a virtio_net_hdr long. A shorter one is
    the driver breaking the rule: the RX queue stops with the reason, nothing is written."""
    drv = make_mrg(packed=packed, num=16)
    drv.post([NET_HDR - 1])
    drv.send_packet(packet(1, 60))
    assert "shorter than a virtio_net_hdr" in drv.wait_error(RX)
    assert drv.reap_all(RX) == []


@pytest.mark.parametrize("packed", LAYOUTS)
def test_without_mrg_rxbuf_a_small_buffer_still_truncates(packed):
    """Not acked: num_buffers stays 1 and the frame is cut at the buffer's end (5.1.6.4.1)."""
    drv = NetDriver(SoftNetDevice(), packed=packed, num=16)
    try:
        assert not drv.session.features & MRG
        ring = drv.queues[RX].ring
        gpa = drv.pool.get()
        ring.add((), [(gpa, 100)], gpa)
        drv.kick(RX)
        frame = bytes(range(200))
        drv.send(frame, net_hdr(3))
        ((tok, n),) = drv.reap(RX, 1)
        assert n == 100
        assert drv.mem.read(tok, n) == (net_hdr(3)[:10] + b"\x01\x00" + frame)[:100]  # type: ignore[arg-type]
    finally:
        drv.close()


@pytest.mark.parametrize("packed", LAYOUTS)
@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    sizes=st.lists(st.integers(NET_HDR, 200), min_size=16, max_size=16),
    frames=st.lists(st.integers(1, 700), min_size=1, max_size=12),
    data=st.data(),
)
def test_property_any_buffer_sizes_any_frames(make_mrg, packed, sizes, frames, data):
    """Any buffer sizes (each at least a header), any frame lengths, buffers posted in random
    batches: each packet arrives whole and in order, num_buffers the fewest buffers in ring order
    that hold it, each but the last used to its full size."""
    drv = make_mrg(packed=packed, num=16)
    sizes = list(sizes)
    posted: list[int] = []  # sizes of the buffers posted and not yet used, in ring order

    def post_some(n: int) -> None:
        batch = [sizes.pop(0) if sizes else 200 for _ in range(n)]
        drv.post(batch)
        posted.extend(batch)

    post_some(data.draw(st.integers(1, 16)))
    dropped = 0
    for seq, frame_len in enumerate(frames):
        sent = packet(seq, frame_len)
        drv.send_packet(sent)
        while sum(posted) < len(sent) and len(posted) < 16:  # too few: it waits; post more
            post_some(min(16 - len(posted), data.draw(st.integers(1, 4))))
        if sum(posted) < len(sent):  # the whole ring is not enough: dropped, the buffers kept
            assert drv.complete_tx(1) == 1
            dropped += 1
            assert drv.dev.stats()["tx"].dropped == dropped
            continue
        (got,) = drv.receive(1)
        k, room = 0, 0
        while room < len(sent):
            room += posted[k]
            k += 1
        assert got.num_buffers == k
        assert got.lengths == posted[: k - 1] + [len(sent) - sum(posted[: k - 1])]
        assert got.packet == as_received(sent, k)
        del posted[:k]
        assert drv.complete_tx(1) == 1
    assert drv.dev.queue_errors() == {}
