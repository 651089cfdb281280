"""soft:net with several queue pairs: VIRTIO_NET_F_MQ, the control queue, VQ_PAIRS_SET (VIRTIO 1.2 5.1)."""

from __future__ import annotations

import random
import struct

import pytest

from kernel_iface import uapi
from tests.softdev.driver import NET_HDR, SLOT, NetDriver, net_hdr, rx_hdr
from vdpa_svq.devices import open_device
from vdpa_svq.errors import VdpaSvqError
from vdpa_svq.softdev import SoftNetDevice
from vdpa_svq.softdev.netctrl import (
    VIRTIO_NET_CTRL_MQ,
    VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET,
    VIRTIO_NET_ERR,
    VIRTIO_NET_OK,
)

MQ = 1 << uapi.VIRTIO_NET_F_MQ | 1 << uapi.VIRTIO_NET_F_CTRL_VQ
PAIRS = 3
VIRTIO_NET_CTRL_RX = 0
VIRTIO_NET_CTRL_MQ_RSS_CONFIG = 1


def pairs_set(n: int) -> bytes:
    return struct.pack("<H", n)


@pytest.fixture
def make_mq():
    made: list[NetDriver] = []

    def make(*, pairs: int = PAIRS, features: int = MQ, **kw: object) -> NetDriver:
        drv = NetDriver(SoftNetDevice(queue_pairs=pairs), extra_features=features, **kw)  # type: ignore[arg-type]
        made.append(drv)
        return drv

    yield make
    for drv in made:
        drv.close()


def roundtrip(drv: NetDriver, pair: int, seq: int, rng: random.Random) -> None:
    """One frame out on `pair`'s TX, back on the same pair's RX, byte-identical."""
    frame = rng.randbytes(rng.randint(1, SLOT - NET_HDR))
    drv.post_rx(1, pair=pair)
    drv.send(frame, net_hdr(seq), pair=pair)
    assert drv.recv(1, pair=pair) == [rx_hdr(net_hdr(seq)) + frame]
    assert drv.complete_tx(1, pair=pair) == 1


def test_multiqueue_device_offers_mq_ctrl_vq_and_max_virtqueue_pairs():
    """5.1.3, 5.1.4, 5.1.2: MQ requires CTRL_VQ; max_virtqueue_pairs (config offset 8, le16) is the
    pair count; the queues are 2N data queues and the control queue. One pair: neither bit, as before."""
    dev = SoftNetDevice(queue_pairs=PAIRS)
    one = SoftNetDevice()
    try:
        assert dev.get_features() & MQ == MQ
        assert struct.unpack_from("<H", dev.get_config(), 8) == (PAIRS,)
        assert dev.vqs_count() == 2 * PAIRS + 1
        assert one.get_features() & MQ == 0
        assert one.vqs_count() == 2
    finally:
        dev.close()
        one.close()


@pytest.mark.parametrize("packed", [False, True], ids=["split", "packed"])
def test_each_pair_loops_back_on_its_own_receive_queue(make_mq, packed):
    """5.1.6.5.5: after VQ_PAIRS_SET(n) transmitq1..n and receiveq1..n may be used; the loopback's
    flow steering is the pair itself (a frame sent on pair i comes back on pair i's RX). Interleaved
    over the pairs, 40 frames each through 8-entry rings (indexes and wrap counters wrap)."""
    drv = make_mq(packed=packed, event_idx=True, num=8)
    assert drv.control(VIRTIO_NET_CTRL_MQ, VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET, pairs_set(PAIRS)) == VIRTIO_NET_OK
    rng = random.Random(7)
    for seq in range(40 * PAIRS):
        roundtrip(drv, seq % PAIRS, seq, rng)
    stats = drv.dev.stats()
    for name in ("rx", "tx", "rx1", "tx1", "rx2", "tx2"):
        assert stats[name].chains == 40, name
    assert stats["ctrl"].chains == 1


def test_only_the_first_pair_moves_frames_until_vq_pairs_set(make_mq):
    """5.1.6.5.5: "After initialization of reset, the device MUST queue packets only on receiveq1."
    A frame sent on pair 1 first stays in its TX ring (a later frame of pair 0 passes it), and
    comes back on pair 1's RX once the driver sets two pairs."""
    drv = make_mq()
    rng = random.Random(1)
    drv.post_rx(1, pair=1)
    frame = b"pair one, early"
    drv.send(frame, net_hdr(100), pair=1)
    roundtrip(drv, 0, 0, rng)  # the device served a pass after pair 1's kick
    assert drv.recv_ready(pair=1) == [] and drv.complete_tx_ready(pair=1) == 0
    assert drv.dev.stats()["tx1"].chains == 0
    assert drv.control(VIRTIO_NET_CTRL_MQ, VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET, pairs_set(2)) == VIRTIO_NET_OK
    assert drv.recv(1, pair=1) == [rx_hdr(net_hdr(100)) + frame]
    assert drv.complete_tx(1, pair=1) == 1


def test_fewer_pairs_again_holds_the_higher_pairs(make_mq):
    """5.1.6.5.5: "The device MUST NOT queue packets on receive queues greater than virtqueue_pairs
    once it has placed the VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET command in a used buffer.\""""
    drv = make_mq()
    rng = random.Random(2)
    assert drv.control(VIRTIO_NET_CTRL_MQ, VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET, pairs_set(3)) == VIRTIO_NET_OK
    roundtrip(drv, 2, 1, rng)
    assert drv.control(VIRTIO_NET_CTRL_MQ, VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET, pairs_set(1)) == VIRTIO_NET_OK
    drv.post_rx(1, pair=2)
    drv.send(b"held", net_hdr(2), pair=2)
    roundtrip(drv, 0, 3, rng)
    assert drv.recv_ready(pair=2) == []
    assert drv.dev.stats()["tx2"].chains == 1


@pytest.mark.parametrize(
    "data, why",
    [(pairs_set(0), "zero pairs"), (pairs_set(PAIRS + 1), "more than max_virtqueue_pairs"), (b"\x02", "short data")],
)
def test_vq_pairs_set_out_of_range_is_refused(make_mq, data, why):
    """5.1.6.5.5: "The driver MUST NOT request a virtqueue_pairs of 0 or greater than
    max_virtqueue_pairs"; the device answers VIRTIO_NET_ERR and keeps the pairs it had."""
    drv = make_mq()
    assert drv.control(VIRTIO_NET_CTRL_MQ, VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET, data) == VIRTIO_NET_ERR, why
    drv.post_rx(1, pair=1)
    drv.send(b"still one pair", net_hdr(5), pair=1)
    roundtrip(drv, 0, 6, random.Random(3))
    assert drv.recv_ready(pair=1) == []
    assert drv.dev.queue_errors() == {}


def test_unknown_class_or_command_is_answered_err_and_the_queue_goes_on(make_mq):
    """5.1.6.5: a command the device does not offer gets ack VIRTIO_NET_ERR (RX mode without
    CTRL_RX; RSS_CONFIG without VIRTIO_NET_F_RSS; an unknown class); the next command still works."""
    drv = make_mq()
    assert drv.control(VIRTIO_NET_CTRL_RX, 0, b"\x01") == VIRTIO_NET_ERR
    assert drv.control(VIRTIO_NET_CTRL_MQ, VIRTIO_NET_CTRL_MQ_RSS_CONFIG, bytes(16)) == VIRTIO_NET_ERR
    assert drv.control(0xEE, 0xEE) == VIRTIO_NET_ERR
    assert drv.control(VIRTIO_NET_CTRL_MQ, VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET, pairs_set(2)) == VIRTIO_NET_OK
    assert drv.dev.queue_errors() == {}


@pytest.mark.parametrize(
    "readable, writable, reason",
    [(1, 1, "class and command need 2"), (2, 0, "without a device-writable ack byte")],
    ids=["one-readable-byte", "no-ack-byte"],
)
def test_a_chain_that_is_no_command_stops_the_control_queue_only(make_mq, readable, writable, reason):
    """5.1.6.5: a command is class, command (device-readable) and ack (device-writable); a chain
    without them breaks the control queue with the reason, and the data queues go on."""
    drv = make_mq()
    ctrl = len(drv.queues) - 1
    buf = drv.pool.get()
    out = [(buf, readable)]
    in_ = [(buf + 64, writable)] if writable else []
    drv.queues[ctrl].ring.add(out, in_, buf, indirect=False)
    drv.kick(ctrl)
    assert reason in drv.wait_error(ctrl)
    assert set(drv.dev.queue_errors()) == {ctrl}
    roundtrip(drv, 0, 1, random.Random(4))


def test_ctrl_vq_without_mq_is_queue_2_and_refuses_vq_pairs_set(make_mq):
    """5.1.2: without VIRTIO_NET_F_MQ there is one pair (N = 1) and the control queue is vq 2;
    VQ_PAIRS_SET needs MQ (5.1.6.5.5), so the device answers VIRTIO_NET_ERR."""
    drv = make_mq(features=1 << uapi.VIRTIO_NET_F_CTRL_VQ)
    ack = drv.control(VIRTIO_NET_CTRL_MQ, VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET, pairs_set(2), ctrl=2)
    assert ack == VIRTIO_NET_ERR
    assert drv.dev.stats()["ctrl"].chains == 1
    roundtrip(drv, 0, 1, random.Random(5))


def test_reset_goes_back_to_one_pair(make_mq):
    """5.1.6.5.5: after reset only receiveq1 gets packets until the driver sets pairs again."""
    drv = make_mq()
    assert drv.control(VIRTIO_NET_CTRL_MQ, VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET, pairs_set(2)) == VIRTIO_NET_OK
    drv.restart(packed=False)
    drv.post_rx(1, pair=1)
    drv.send(b"after reset", net_hdr(9), pair=1)
    roundtrip(drv, 0, 1, random.Random(6))
    assert drv.recv_ready(pair=1) == []


@pytest.mark.parametrize(
    "spec, pairs", [("soft:net", 1), ("soft:net,pairs=2", 2), ("soft:net-sim,pairs=4", 4)]
)
def test_soft_net_spec_takes_the_pair_count(spec, pairs):
    dev = open_device(spec)
    try:
        assert dev.vqs_count() == (2 * pairs + 1 if pairs > 1 else 2)
    finally:
        dev.close()


@pytest.mark.parametrize(
    "spec, says",
    [
        ("soft:net,pairs=0", "queue pairs are 1..32768"),
        ("soft:net,pairs=x", "pairs takes a number"),
        ("soft:net,queues=2", "has no option 'queues'"),
        ("soft:blk,pairs=2", "has no option 'pairs'"),
        ("soft:nett", "unknown software device"),
    ],
)
def test_soft_device_spec_mistakes_are_clear(spec, says):
    with pytest.raises(VdpaSvqError, match=says):
        open_device(spec)
