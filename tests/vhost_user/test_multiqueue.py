"""serve with a multiqueue net device: two queue pairs over one socket, in QEMU's message order.

QEMU's vhost-user net (hw/net/vhost_net.c, hw/virtio/vhost-user.c) keeps the control queue and
sends one vhost_dev's messages per pair over the same socket: GET_QUEUE_NUM and SET_MEM_TABLE once,
SET_FEATURES and the vrings (indexes 2p, 2p + 1) per pair, SET_VRING_ENABLE per queue as the guest's
VQ_PAIRS_SET enables pairs, and SET_STATUS DRIVER_OK after the last pair.
"""

from __future__ import annotations

import logging
import os
import select
import threading
import time

import pytest

from kernel_iface import uapi
from kernel_iface.uapi import bit
from tests.vhost_user.client import UADDR_OFFSET, new_eventfd, recv_reply, send
from tests.vhost_user.conftest import RunningServer
from vdpa_svq.devices import open_device
from vdpa_svq.errors import GuestRingError
from vdpa_svq.guest.net import RX_BUFFER, NetDriver
from vdpa_svq.guest.plan import plan_layout
from vdpa_svq.memory.guest import GuestMemory
from vdpa_svq.ring import Layout
from vdpa_svq.vhost_user import messages as m
from vdpa_svq.vhost_user.messages import FLAG_NEED_REPLY, ProtocolFeature, Request

PAIRS = 2
NUM = 32
TIMEOUT = 5.0
MQ = bit(uapi.VIRTIO_NET_F_MQ) | bit(uapi.VIRTIO_NET_F_CTRL_VQ)


class MqFrontend:
    """Just enough of QEMU's vhost-user net for two pairs: each pair a NetDriver."""

    def __init__(self, sock, layout: Layout) -> None:
        self.sock, self.layout = sock, layout
        self.plan = plan_layout(layout, NUM, 2 * PAIRS, RX_BUFFER, NUM)
        self.mem = GuestMemory.create(self.plan.size)
        self.fds: list[int] = []
        self.rings = []
        self.drivers: list[NetDriver] = []
        self.errs: dict[int, int] = {}  # queue -> the eventfd serve signals when the queue breaks

    def ack(self, request: Request, payload: bytes = b"", fds: list[int] | None = None) -> None:
        send(self.sock, request, payload, fds, flags=FLAG_NEED_REPLY)
        assert m.U64.unpack(recv_reply(self.sock, request))[0] == 0, request.name

    def get_u64(self, request: Request) -> int:
        send(self.sock, request)
        return m.U64.unpack(recv_reply(self.sock, request))[0]

    def start(self, enabled_pairs: int) -> None:
        s = self.sock
        send(s, Request.SET_OWNER)
        offered = self.get_u64(Request.GET_FEATURES)
        assert offered & MQ == MQ, "serve must offer MQ and CTRL_VQ for a multiqueue device"
        pf = self.get_u64(Request.GET_PROTOCOL_FEATURES)
        want_pf = bit(ProtocolFeature.REPLY_ACK) | bit(ProtocolFeature.MQ) | bit(ProtocolFeature.STATUS)
        assert pf & want_pf == want_pf
        send(s, Request.SET_PROTOCOL_FEATURES, m.U64.pack(want_pf))
        assert self.get_u64(Request.GET_QUEUE_NUM) == PAIRS  # pairs, as QEMU compares it with queues=
        features = bit(uapi.VIRTIO_F_VERSION_1) | bit(m.VHOST_USER_F_PROTOCOL_FEATURES) | MQ
        features |= bit(uapi.VIRTIO_RING_F_EVENT_IDX)
        if self.layout is Layout.PACKED:
            features |= bit(uapi.VIRTIO_F_RING_PACKED)
        (region,) = self.mem.regions
        for pair in range(PAIRS):  # virtio_net_set_queue_pairs before the start: enable state
            for i in (2 * pair, 2 * pair + 1):
                self.ack(Request.SET_VRING_ENABLE, m.VringState(i, int(pair < enabled_pairs)).encode())
        for pair in range(PAIRS):  # one vhost_dev per pair
            self.ack(Request.SET_FEATURES, m.U64.pack(features))
            if pair == 0:
                table = m.MemTable((m.MemRegion(region.gpa, region.size, region.gpa + UADDR_OFFSET, 0),))
                self.ack(Request.SET_MEM_TABLE, table.encode(), [region.fd])
            kicks = []
            for i in (2 * pair, 2 * pair + 1):
                addrs = self.plan.rings[i]
                self.rings.append(self.plan.driver_ring(i, self.mem, self.layout, event_idx=True, indirect=True,
                                                        name=f"client vq{i}"))
                kick, call = new_eventfd(i), new_eventfd(i)
                self.fds += [kick, call]
                kicks.append(kick)
                self.ack(Request.SET_VRING_NUM, m.VringState(i, NUM).encode())
                base = 0x8000 if self.layout is Layout.PACKED else 0
                self.ack(Request.SET_VRING_BASE, m.VringState(i, base).encode())
                u = UADDR_OFFSET
                self.ack(Request.SET_VRING_ADDR, m.VringAddr(i, 0, addrs.desc + u, addrs.device + u,
                                                             addrs.driver + u, addrs.device).encode())
                self.ack(Request.SET_VRING_KICK, m.U64.pack(i), [kick])
                self.ack(Request.SET_VRING_CALL, m.U64.pack(i), [call])
                self.errs[i] = new_eventfd(i)  # QEMU gives each queue one (vhost_virtqueue_init)
                self.fds.append(self.errs[i])
                self.ack(Request.SET_VRING_ERR, m.U64.pack(i), [self.errs[i]])
            rx, tx = self.rings[2 * pair], self.rings[2 * pair + 1]
            pools = self.plan.pools[2 * pair : 2 * pair + 2]
            self.drivers.append(NetDriver(self.mem, rx, tx, pools[0], pools[1],
                                          lambda i, k=tuple(kicks): os.eventfd_write(k[i], 1)))
        for drv in self.drivers:
            drv.fill_rx()
        status = (uapi.VIRTIO_CONFIG_S_ACKNOWLEDGE | uapi.VIRTIO_CONFIG_S_DRIVER
                  | uapi.VIRTIO_CONFIG_S_FEATURES_OK | uapi.VIRTIO_CONFIG_S_DRIVER_OK)
        self.ack(Request.SET_STATUS, m.U64.pack(status))

    def enable_pair(self, pair: int, on: bool) -> None:
        """peer_attach / peer_detach: what QEMU does on the guest's VQ_PAIRS_SET."""
        for i in (2 * pair, 2 * pair + 1):
            self.ack(Request.SET_VRING_ENABLE, m.VringState(i, int(on)).encode())

    def roundtrip(self, pair: int, frame: bytes) -> None:
        """One frame out on `pair`, back on the same pair (soft:net's loopback per pair)."""
        drv = self.drivers[pair]
        assert drv.send(frame)
        drv.flush()
        got: list[bytes] = []
        deadline = time.monotonic() + TIMEOUT
        while not got:
            assert time.monotonic() < deadline, f"pair {pair}: the frame did not come back"
            drv.wait(0.05)
            got = drv.reap()
        assert got == [frame]

    def get_vring_base(self, index: int) -> int:
        send(self.sock, Request.GET_VRING_BASE, m.VringState(index, 0).encode())
        return m.VringState(*m.VringState.STRUCT.unpack(recv_reply(self.sock, Request.GET_VRING_BASE))).num

    def close(self) -> None:
        self.sock.close()
        for ring in self.rings:
            ring.close()
        self.mem.close()
        for fd in self.fds:
            os.close(fd)


@pytest.fixture
def mq_server(tmp_path):
    # A thread per pair, whatever the machine's CPUs (the default is half of them): the pairs race.
    srv = RunningServer(str(tmp_path / "vu.sock"), device=open_device(f"soft:net,pairs={PAIRS}"), relay_threads=PAIRS)
    yield srv
    srv.stop()


@pytest.mark.parametrize("layout", [Layout.SPLIT, Layout.PACKED], ids=["split", "packed"])
def test_two_pairs_in_qemus_order_and_vq_pairs_set_reaches_the_device(mq_server, layout):
    """VIRTIO 1.2 5.1.6.5.5 through serve: the guest starts with one pair (pair 1 configured but
    disabled: its frames stay in its ring), QEMU enables pair 1 (the guest's VQ_PAIRS_SET 2) and
    serve tells the device's control queue, so pair 1's frames come back on pair 1; disabled again,
    they stay again. GET_VRING_BASE then gives each ring where the frontend's own count says."""
    fe = MqFrontend(mq_server.connect(), layout)
    try:
        fe.start(enabled_pairs=1)
        fe.roundtrip(0, b"pair 0, one pair enabled")
        held = fe.drivers[1]
        assert held.send(b"pair 1 before it is enabled")
        held.flush()
        fe.roundtrip(0, b"pair 0 passes it")  # the relay and the device ran after pair 1's kick
        assert held.reap() == []
        dev = mq_server.device
        assert dev.stats()["tx1"].chains == 0
        fe.enable_pair(1, True)
        held.wait(TIMEOUT)
        assert held.reap() == [b"pair 1 before it is enabled"]
        for n in range(20):
            fe.roundtrip(n % PAIRS, f"frame {n}".encode())
        fe.enable_pair(1, False)
        assert held.send(b"pair 1 disabled again")
        held.flush()
        fe.roundtrip(0, b"pair 0 still runs")
        assert held.reap() == []
        assert dev.stats()["ctrl"].chains == 2  # VQ_PAIRS_SET 2, then 1
        bases = [fe.get_vring_base(i) for i in range(2 * PAIRS)]
        sent = [fe.drivers[p].stats.sent for p in range(PAIRS)]
        for p in range(PAIRS):
            rx_base, tx_base = bases[2 * p], bases[2 * p + 1]
            if layout is Layout.PACKED:  # rewound: avail half = used half (the slots count descriptors)
                assert all(b & 0xFFFF == b >> 16 for b in (rx_base, tx_base)), [hex(b) for b in bases]
                continue
            # TX: every frame used but the one held on the disabled pair (it is read again later).
            assert tx_base == sent[p] - (p == 1)
            assert rx_base == fe.drivers[p].stats.received
    finally:
        fe.close()
    mq_server.wait_connections(1)
    assert mq_server.server.summaries[-1].error is None


def break_tx1(dev) -> None:
    """soft:net stops using pair 1's TX queue (index 3), as for a ring error there."""
    with dev.lock:
        dev.break_queue(dev.queues[3], GuestRingError("tx1", "injected"))


def test_a_device_queue_that_breaks_stops_its_relay_at_once_and_tells_the_frontend(mq_server, caplog):
    """The device signals a queue's error eventfd (VHOST_SET_VRING_ERR) when it stops using it (soft:net
    breaks the one queue with its reason; VIRTIO 1.2 2.1.2). serve stops that queue's relay then and
    there, with the device's reason, and signals the frontend's error eventfd of the queue (QEMU logs
    "vhost vring error in virtqueue N"), while the connection and the other pairs go on."""
    dev = mq_server.device
    fe = MqFrontend(mq_server.connect(), Layout.SPLIT)
    try:
        with caplog.at_level(logging.INFO, logger="vdpa_svq"):
            fe.start(enabled_pairs=1)
            fe.enable_pair(1, True)
            fe.roundtrip(1, b"pair 1 before")
            assert select.select([fe.errs[3]], [], [], 0)[0] == []
            break_tx1(dev)
            ready, _, _ = select.select([fe.errs[3]], [], [], TIMEOUT)
            assert ready == [fe.errs[3]], "serve did not signal the frontend's error eventfd of queue 3"
            assert "svq3: device broke the ring: the device stopped queue 3: tx1: guest broke the ring: injected" \
                in caplog.text  # logged while the connection is still up
            assert all(select.select([fe.errs[i]], [], [], 0)[0] == [] for i in (0, 1, 2))
            fe.roundtrip(0, b"pair 0 goes on")
    finally:
        fe.close()


def test_a_device_queue_that_stopped_is_named_in_serves_log(mq_server, caplog):
    """A device that stops using one queue's buffers (VIRTIO 1.2 2.1.2: DEVICE_NEEDS_RESET for a
    device that can no longer serve; soft:net breaks the one queue with the reason) leaves the
    relay forwarding and kicking into nothing; serve cannot see it in its own counters. When the
    relay stops, serve logs what the device says: the broken queue with its reason, the pairs it
    was moving frames on, and its per-queue counters (here pair 1's TX: no chain used)."""
    dev = mq_server.device
    fe = MqFrontend(mq_server.connect(), Layout.PACKED)
    try:
        with caplog.at_level(logging.INFO, logger="vdpa_svq.vhost_user"):
            fe.start(enabled_pairs=1)
            fe.enable_pair(1, True)
            fe.roundtrip(0, b"pair 0 before")
            break_tx1(dev)
            assert fe.drivers[1].send(b"pair 1 into a stopped queue")
            fe.drivers[1].flush()
            fe.roundtrip(0, b"pair 0 goes on")
            assert fe.drivers[1].reap() == []
            fe.sock.close()
            mq_server.wait_connections(1)
    finally:
        fe.close()
    assert "device queue 3 stopped: tx1: guest broke the ring: injected" in caplog.text
    assert "svq3: device broke the ring: the device stopped queue 3: tx1: guest broke" in caplog.text
    assert "device: 2 queue pair(s) moving frames" in caplog.text
    assert "device: tx1: 0 chains" in caplog.text


@pytest.mark.parametrize("layout", [Layout.SPLIT, Layout.PACKED], ids=["split", "packed"])
def test_two_pairs_relay_at_once_each_in_its_own_thread(mq_server, layout):
    """Each queue pair is relayed by a thread of its own (ShadowSession: one RelayLoop per pair),
    and both pairs move frames at the same time: every frame comes back once, in order, on the
    pair it was sent on (VIRTIO 1.2 5.1.6: a pair's RX gets what its TX sent, soft:net's loopback),
    and GET_VRING_BASE then counts every TX buffer used and every RX buffer filled (2.7.8)."""
    fe = MqFrontend(mq_server.connect(), layout)
    bursts, burst = 40, 8
    errors: list[BaseException] = []

    def traffic(pair: int) -> None:
        drv = fe.drivers[pair]
        try:
            for b in range(bursts):
                frames = [f"pair {pair} burst {b} frame {k}".encode() for k in range(burst)]
                for f in frames:
                    assert drv.send(f)
                drv.flush()
                got: list[bytes] = []
                deadline = time.monotonic() + TIMEOUT
                while len(got) < burst:
                    assert time.monotonic() < deadline, f"pair {pair}: {burst - len(got)} frames did not come back"
                    drv.wait(0.05)
                    got += drv.reap()
                assert got == frames
        except BaseException as e:  # reported by the test's thread
            errors.append(e)

    try:
        fe.start(enabled_pairs=2)
        fe.roundtrip(0, b"warm-up")  # the relay runs: its threads exist
        relays = sorted(t.name for t in threading.enumerate() if t.name.startswith("vdpa-svq-relay"))
        assert relays == ["vdpa-svq-relay0", "vdpa-svq-relay1"]
        workers = [threading.Thread(target=traffic, args=(p,)) for p in range(PAIRS)]
        for w in workers:
            w.start()
        for w in workers:
            w.join()
        assert not errors, errors
        bases = [fe.get_vring_base(i) for i in range(2 * PAIRS)]
        for p in range(PAIRS):
            st = fe.drivers[p].stats
            assert st.received == st.sent == bursts * burst + (p == 0)
            if layout is Layout.SPLIT:
                assert bases[2 * p] == st.received and bases[2 * p + 1] == st.sent
    finally:
        fe.close()
    mq_server.wait_connections(1)
    summary = mq_server.server.summaries[-1]
    assert summary.error is None
