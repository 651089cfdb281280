"""SoftNetDevice driven through the project's driver rings: loopback, backpressure, ring state."""

from __future__ import annotations

import random

import pytest

from kernel_iface import uapi
from kernel_iface.device import PackedVringBase
from tests.softdev.driver import NET_HDR, RX, SLOT, TX, NetDriver, net_hdr, rx_hdr
from vdpa_svq.ring import Layout
from vdpa_svq.softdev import SoftNetDevice

RING_VARIANTS = [
    pytest.param(
        packed, event_idx, indirect, id=f"{'packed' if packed else 'split'}-evidx{int(event_idx)}-ind{int(indirect)}"
    )
    for packed in (False, True)
    for event_idx in (False, True)
    for indirect in (False, True)
]


@pytest.fixture
def make_net():
    made: list[NetDriver] = []

    def make(*, dev: SoftNetDevice | None = None, **kw: object) -> NetDriver:
        drv = NetDriver(dev or SoftNetDevice(), **kw)  # type: ignore[arg-type]
        made.append(drv)
        return drv

    yield make
    for drv in made:
        drv.close()


@pytest.mark.parametrize("packed, event_idx, indirect", RING_VARIANTS)
def test_tx_frames_come_back_on_rx_byte_identical(make_net, packed, event_idx, indirect):
    """Loopback like vdpa_sim_net: each TX frame arrives on RX as virtio_net_hdr + frame; the
    used length is 12 + frame length (VIRTIO 1.2, 5.1.6.3/5.1.6.4). 200 frames through 16-entry
    rings wrap the split indexes and the packed wrap counters many times."""
    drv = make_net(packed=packed, event_idx=event_idx, indirect=indirect, num=16)
    rng = random.Random(1)
    sent: list[bytes] = []
    got: list[bytes] = []
    drv.post_rx(8, split_hdr=True)
    for seq in range(200):
        frame = rng.randbytes(rng.randint(1, SLOT - NET_HDR))
        hdr = net_hdr(seq)
        drv.send(frame, hdr)
        sent.append(rx_hdr(hdr) + frame)
        if seq % 5 == 4:  # reap in bursts, repost what came back
            got += drv.recv(len(sent) - len(got))
            drv.complete_tx(5)
            drv.post_rx(5, split_hdr=True)
    assert got == sent
    stats = drv.dev.stats()
    assert stats["tx"].chains == stats["rx"].chains == 200
    assert stats["rx"].written_bytes == sum(len(p) for p in sent)
    # Only RX is waited on; TX completions may all be reaped without ever needing a call.
    assert stats["rx"].calls > 0
    assert drv.dev.queue_errors() == {}


@pytest.mark.parametrize("packed, event_idx", [(p, e) for p in (False, True) for e in (False, True)])
def test_tx_is_held_until_rx_buffers_arrive(make_net, packed, event_idx):
    """Without RX buffers the device keeps TX frames in the TX ring (vdpa_sim would drop them):
    no TX completion, no call, until the driver posts RX buffers; the RX kick then wakes the
    device (its notification state must allow it) and every frame arrives."""
    drv = make_net(packed=packed, event_idx=event_idx, num=16)
    frames = [bytes([i]) * (60 + i) for i in range(5)]
    for i, f in enumerate(frames):
        drv.send(f, net_hdr(i))
    assert not drv.call_within(TX, 0.1), "TX completed with no RX buffer to loop into"
    assert drv.reap_all(TX) == []
    drv.post_rx(2)
    assert [p[12:] for p in drv.recv(2)] == frames[:2]
    drv.post_rx(8)
    assert [p[12:] for p in drv.recv(3)] == frames[2:]
    assert drv.complete_tx(5) == 5
    assert drv.dev.stats()["tx"].dropped == 0


@pytest.mark.parametrize("packed", [False, True], ids=["split", "packed"])
def test_get_vring_base_matches_the_driver_ring(make_net, packed):
    """GET_VRING_BASE after traffic: split gives last_avail_idx (= the driver's avail idx once
    all is consumed); packed gives next avail/used slots and wrap counters, which match the
    driver's next_avail_idx/avail_wrap_counter and last_used_idx/used_wrap_counter."""
    drv = make_net(packed=packed, indirect=True, num=8)  # indirect: one slot per TX frame too
    total = 0
    for burst in (3, 7, 5, 8, 2):
        drv.post_rx(burst)
        for i in range(burst):
            drv.send(b"x" * (10 + i), net_hdr(i))
        drv.recv(burst)
        drv.complete_tx(burst)
        total += burst
    dev = drv.dev
    dev.suspend()
    for qi in (RX, TX):
        ring = drv.queues[qi].ring
        base = dev.get_vring_base(qi)
        if packed:
            want = PackedVringBase(
                ring.next_avail_idx, bool(ring.avail_wrap_counter), ring.last_used_idx, bool(ring.used_wrap_counter)
            )
            assert PackedVringBase.from_num(base) == want
            # One slot per buffer: 25 slots, three laps of 8 flip the counters thrice.
            assert (want.last_avail_idx, want.avail_wrap_counter) == (total % 8, bool(1 ^ (total // 8) % 2))
        else:
            assert base == ring.avail_idx_shadow == total
    dev.resume()
    drv.post_rx(1)
    drv.send(b"after resume", net_hdr(99))
    assert drv.recv(1)[0][12:] == b"after resume"


def test_suspended_device_does_not_touch_the_rings(make_net):
    """SUSPEND stops the datapath: a frame sent while suspended stays available; RESUME
    serves it (vhost-vdpa VHOST_VDPA_SUSPEND / RESUME)."""
    drv = make_net(num=8)
    drv.post_rx(4)
    drv.dev.suspend()
    drv.send(b"held", net_hdr(1))
    assert not drv.call_within(RX, 0.1)
    assert drv.dev.get_vring_base(TX) == 0
    drv.dev.resume()
    assert drv.recv(1)[0][12:] == b"held"


@pytest.mark.parametrize("packed", [False, True], ids=["split", "packed"])
def test_reset_forgets_everything_and_setup_works_again(make_net, packed):
    """Status 0 stops the thread and forgets rings, features and IOTLB; a second full setup
    (here with the other layout) carries traffic again."""
    drv = make_net(packed=packed, event_idx=True, num=8)
    drv.post_rx(2)
    drv.send(b"one", net_hdr(1))
    assert drv.recv(1)[0][12:] == b"one"
    dev = drv.dev
    dev.set_status(0)
    assert dev.get_status() == 0 and dev.acked_features == 0
    assert dev.mem.mappings == ()
    assert dev.get_vring_base(TX) == 0
    drv.restart(packed=not packed)
    assert drv.session.layout is (Layout.SPLIT if packed else Layout.PACKED)
    drv.post_rx(2)
    drv.send(b"two", net_hdr(2))
    assert drv.recv(1)[0][12:] == b"two"
    assert dev.stats()["rx"].chains == 1  # stats restart with the device


@pytest.mark.parametrize("split_at", [1, 10, 11, 12, 40])
def test_one_segment_frames_into_rx_buffers_split_anywhere(make_net, split_at):
    """A TX frame in one descriptor (header and data together, as DPDK sends it) lands whole in
    an RX buffer of two descriptors split at any byte, num_buffers (bytes 10 and 11) included:
    the C datapath copies such a frame straight from the TX buffer and sets num_buffers in the
    RX buffer, wherever its two bytes fall."""
    drv = make_net(num=8)
    rng = random.Random(split_at)
    for seq in range(12):
        drv.post_rx(1, split_at=split_at)
        frame = rng.randbytes(rng.randint(1, 200))
        drv.send(frame, net_hdr(seq), one_segment=True)
        assert drv.recv(1) == [rx_hdr(net_hdr(seq)) + frame]
        drv.complete_tx(1)
    assert drv.dev.queue_errors() == {}


def test_frame_larger_than_the_rx_buffer_is_truncated(make_net):
    """Without MRG_RXBUF there is no second buffer to continue in: the device fills the one it
    has and reports that length (a documented choice; the driver sizes RX buffers for its MTU)."""
    drv = make_net(num=8)
    drv.post_rx(1)
    frame = bytes(range(256)) * 8  # 2048 bytes: 12 more than an RX slot holds after the header
    drv.send(frame, net_hdr(7))
    (got,) = drv.recv(1)
    assert got == rx_hdr(net_hdr(7)) + frame[: SLOT - NET_HDR]


def test_vdpa_sim_like_device_offers_split_only(make_net):
    """like_vdpa_sim(): no RING_PACKED, EVENT_IDX or INDIRECT_DESC, 256 entries, as vdpa_sim net."""
    dev = SoftNetDevice.like_vdpa_sim()
    f = dev.get_features()
    for bit in (uapi.VIRTIO_F_RING_PACKED, uapi.VIRTIO_RING_F_EVENT_IDX, uapi.VIRTIO_RING_F_INDIRECT_DESC):
        assert not f >> bit & 1
    assert dev.vring_num() == 256
    drv = make_net(dev=dev, num=256)
    drv.post_rx(1)
    drv.send(b"sim", net_hdr(0))
    assert drv.recv(1)[0][12:] == b"sim"


def test_indirect_chain_without_negotiation_breaks_the_queue(make_net):
    """A driver MUST NOT set VIRTQ_DESC_F_INDIRECT unless INDIRECT_DESC was negotiated (2.7.5.3.1)."""
    drv = make_net(num=8)
    ring = drv.queues[TX].ring
    h, f = drv.pool.get(), drv.pool.get()
    ring.add([(h, 12), (f, 10)], (), "bad", indirect=True)  # the area exists; the feature was not acked
    drv.post_rx(1)
    drv.kick(TX)
    assert "INDIRECT_DESC" in drv.wait_error(TX)
    assert RX not in drv.dev.queue_errors()
