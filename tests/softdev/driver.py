"""The guest side for soft device tests: GuestMemory, the project's driver rings, real eventfds.

GuestDriver brings the device up through a DeviceSession, as attach does (negotiate, map guest
memory into the device IOTLB at iova = gpa, point each queue at its ring, DRIVER_OK), with the
knobs a device test needs: features asked for one by one, its own IOTLB maps, the indirect area
there even when INDIRECT_DESC was not negotiated, an err eventfd per queue. It waits for used
buffers on the call eventfd with a timeout, never by sleeping.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Self

from kernel_iface import uapi
from vdpa_svq.errors import RingFull
from vdpa_svq.guest.blk import request_chain
from vdpa_svq.guest.buffers import BlockPool
from vdpa_svq.guest.net import VIRTIO_NET_HDR_LEN
from vdpa_svq.guest.notify import new_eventfd, wait_notified
from vdpa_svq.guest.plan import GuestLayout, plan_layout
from vdpa_svq.guest.queue import GuestQueue
from vdpa_svq.memory import GuestMemory
from vdpa_svq.ring import DriverRing, Layout
from vdpa_svq.session import DeviceSession
from vdpa_svq.softdev import SoftDevice

PAGE = 4096
SLOT = 2048  # bytes per data buffer slot
TIMEOUT = 5.0

STATUS_UP_TO_FEATURES = (
    uapi.VIRTIO_CONFIG_S_ACKNOWLEDGE | uapi.VIRTIO_CONFIG_S_DRIVER | uapi.VIRTIO_CONFIG_S_FEATURES_OK
)


@dataclass
class DriverQueue(GuestQueue):
    """A guest queue plus the vhost-vdpa error eventfd the soft device reports a broken ring on."""

    err_fd: int = -1

    @classmethod
    def open(cls, index: int, ring: DriverRing) -> Self:
        q = super().open(index, ring)
        q.err_fd = new_eventfd()
        return q

    def close(self) -> None:
        super().close()
        os.close(self.err_fd)


class GuestDriver:
    def __init__(
        self,
        dev: SoftDevice,
        *,
        packed: bool = False,
        event_idx: bool = False,
        indirect: bool = False,
        num: int = 16,
        slots: int = 128,
        maps: Sequence[tuple[int, int, int]] | None = None,
        extra_features: int = 0,
    ) -> None:
        """`maps` overrides the IOTLB mappings: (gpa, size, perm) each, default all of memory RW.
        `extra_features`: device-type bits to negotiate (the device must offer them)."""
        self.dev = dev
        self.session = DeviceSession(
            dev, packed=packed, event_idx=event_idx, indirect=indirect, extra_features=extra_features
        )
        self.plan = self.plan_for(dev, packed=packed, num=num, slots=slots)
        self.pool = self.plan.pools[0]
        self.data_base = self.pool.gpa
        self.mem = GuestMemory.create(self.plan.size)
        self.queues: list[DriverQueue] = []
        self.maps = list(maps) if maps is not None else [(r.gpa, r.size, uapi.VHOST_ACCESS_RW) for r in self.mem]
        self.setup()

    @staticmethod
    def plan_for(dev: SoftDevice, *, packed: bool = False, num: int = 16, slots: int = 128) -> GuestLayout:
        """Where a driver made with these arguments puts its rings and slots (one pool of `slots`
        SLOT-sized blocks after every ring), without making it: for a test that maps them its own way."""
        layout = Layout.PACKED if packed else Layout.SPLIT
        return plan_layout(layout, num, dev.vqs_count(), SLOT, slots, pools=1, base=PAGE)

    # -- the session's part ----------------------------------------------------------------------
    def setup(self) -> None:
        """The session's order: negotiate, map, each queue on its ring (and its err eventfd), DRIVER_OK."""
        s = self.session
        s.negotiate()
        assert s.features == s.wanted, "the device does not offer what the test asked for"
        with self.dev.iotlb_batch():
            for gpa, size, perm in self.maps:
                s.map(gpa, size, self.mem.hva(gpa), perm)
        for i in range(len(self.plan.rings)):
            # The plan's ring in the layout negotiated now (a test may reset and switch layouts);
            # the indirect area is there whether INDIRECT_DESC was negotiated or not.
            ring = self.plan.driver_ring(i, self.mem, s.layout, event_idx=s.event_idx, indirect=True, name=f"drv{i}")
            q = DriverQueue.open(i, ring)
            self.queues.append(q)
            s.setup_queue(i, self.plan.num, ring.addrs, kick_fd=q.kick_fd, call_fd=q.call_fd)
            self.dev.set_vring_err(i, q.err_fd)
        s.start()

    def restart(self, *, packed: bool) -> None:
        """After the device was reset: set it up again, in the layout `packed` says, with the rings
        where the plan first put them and every slot free again."""
        self.session.close()
        self.teardown_rings()
        self.session.packed = packed
        self.pool = self.plan.pools[0] = BlockPool(self.data_base, SLOT, self.pool.count)
        self.setup()

    def teardown_rings(self) -> None:
        for q in self.queues:
            q.close()
        self.queues = []

    def close(self) -> None:
        try:
            self.session.close()  # reset and unmap: the device must not touch memory that is going away
            self.dev.close()
        finally:
            self.teardown_rings()
            self.mem.close()

    # -- the driver's part -----------------------------------------------------------------------
    def kick(self, qi: int) -> bool:
        return self.queues[qi].kick()

    def wait(self, qi: int, done: Callable[[], bool], timeout: float = TIMEOUT) -> None:
        """Block on queue qi's call eventfd until done() holds; AssertionError after `timeout`."""
        ok = self.queues[qi].wait_until(done, timeout)
        assert ok, f"queue {qi}: timed out; device errors {self.dev.queue_errors()}"

    def call_within(self, qi: int, timeout: float) -> bool:
        """Whether queue qi's call eventfd fires within `timeout` seconds (consumes it)."""
        return self.queues[qi].wait_call(timeout)

    def wait_error(self, qi: int, timeout: float = TIMEOUT) -> str:
        """Block on queue qi's err eventfd until the device reports it broken; return the reason."""
        fd = self.queues[qi].err_fd
        assert wait_notified([fd], timeout), f"queue {qi}: no error reported"
        return self.dev.queue_errors()[qi]

    def reap(self, qi: int, want: int, timeout: float = TIMEOUT) -> list[tuple[object, int]]:
        """Exactly `want` used buffers of queue qi, in used order, waiting as needed."""
        got = self.queues[qi].reap(want, timeout)
        assert got is not None, f"queue {qi}: timed out; device errors {self.dev.queue_errors()}"
        return got

    def reap_all(self, qi: int) -> list[tuple[object, int]]:
        return self.queues[qi].reap_ready()


RX, TX = 0, 1
NET_HDR = VIRTIO_NET_HDR_LEN


def net_hdr(seq: int) -> bytes:
    """A virtio_net_hdr_v1 with recognisable bytes in flags..csum_offset, num_buffers 0."""
    return bytes([0, 0]) + seq.to_bytes(8, "little") + b"\0\0"


def rx_hdr(tx_hdr: bytes) -> bytes:
    """What the device puts on RX for `tx_hdr`: the same, with num_buffers = 1 (no MRG_RXBUF)."""
    return tx_hdr[:10] + b"\x01\x00"


class NetDriver(GuestDriver):
    """A virtio-net driver over GuestDriver: post RX buffers, send frames, receive them back.
    `pair` picks the queue pair (rx of pair p is queue 2p, tx 2p + 1: VIRTIO 1.2 5.1.2)."""

    def post_rx(self, count: int = 1, *, split_hdr: bool = False, split_at: int | None = None, pair: int = 0) -> int:
        """Post up to `count` RX buffers of SLOT bytes, in two descriptors when split_hdr (at the
        header's end) or split_at (anywhere); return how many fit in the ring."""
        if split_hdr:
            split_at = NET_HDR
        ring = self.queues[2 * pair + RX].ring
        posted = 0
        for _ in range(count):
            if not self.pool.available:
                break
            gpa = self.pool.get()
            in_ = [(gpa, split_at), (gpa + split_at, SLOT - split_at)] if split_at else [(gpa, SLOT)]
            try:
                ring.add((), in_, gpa, indirect=self.session.indirect)
            except RingFull:
                self.pool.put(gpa)
                break
            posted += 1
        self.kick(2 * pair + RX)
        return posted

    def send(self, frame: bytes, hdr: bytes, *, kick: bool = True, one_segment: bool = False, pair: int = 0) -> None:
        """Header and frame in two descriptors, or (one_segment) in one, as DPDK's virtio PMD does."""
        assert 0 < len(frame) <= SLOT - (NET_HDR if one_segment else 0) and len(hdr) == NET_HDR
        h, f = self.pool.get(), self.pool.get()
        self.mem.write(h, hdr)
        self.mem.write(f, frame)
        out = [(h, NET_HDR), (f, len(frame))]
        if one_segment:
            self.mem.write(h + NET_HDR, frame)
            out = [(h, NET_HDR + len(frame))]
        try:
            self.queues[2 * pair + TX].ring.add(out, (), (h, f), indirect=self.session.indirect)
        except RingFull:
            self.pool.put(h)
            self.pool.put(f)
            raise
        if kick:
            self.kick(2 * pair + TX)

    def _rx_bytes(self, token: object, length: int) -> bytes:
        gpa = token
        assert isinstance(gpa, int)
        data = self.mem.read(gpa, length)
        self.pool.put(gpa)
        return data

    def recv(self, count: int, *, pair: int = 0) -> list[bytes]:
        """`count` received packets (virtio_net_hdr + frame), waiting for them."""
        return [self._rx_bytes(t, n) for t, n in self.reap(2 * pair + RX, count)]

    def recv_ready(self, *, pair: int = 0) -> list[bytes]:
        return [self._rx_bytes(t, n) for t, n in self.reap_all(2 * pair + RX)]

    def _free_tx(self, used: list[tuple[object, int]]) -> int:
        for token, length in used:
            assert length == 0, "the device wrote into a TX buffer"
            for gpa in token:  # type: ignore[attr-defined]
                self.pool.put(gpa)
        return len(used)

    def complete_tx(self, count: int, *, pair: int = 0) -> int:
        return self._free_tx(self.reap(2 * pair + TX, count))

    def complete_tx_ready(self, *, pair: int = 0) -> int:
        return self._free_tx(self.reap_all(2 * pair + TX))

    def control(self, cls: int, command: int, data: bytes = b"", *, ctrl: int | None = None) -> int:
        """One command on the control queue (the last queue, or `ctrl`): class, command and data in
        one readable descriptor, the ack byte in a writable one (5.1.6.5); returns the ack."""
        qi = len(self.queues) - 1 if ctrl is None else ctrl
        cmd, ack = self.pool.get(), self.pool.get()
        self.mem.write(cmd, bytes([cls, command]) + data)
        self.mem.write(ack, b"\xee")  # neither OK nor ERR: a device that wrote nothing shows
        self.queues[qi].ring.add([(cmd, 2 + len(data))], [(ack, 1)], (cmd, ack), indirect=False)
        self.kick(qi)
        ((token, written),) = self.reap(qi, 1)
        assert token == (cmd, ack) and written == 1, f"control command used with {written} bytes written"
        self.pool.put(cmd)
        self.pool.put(ack)
        return self.mem.read(ack, 1)[0]


@dataclass
class BlkRequest:
    slots: list[int]
    in_: list[tuple[int, int]]
    status_gpa: int
    status: int | None = None
    written: int | None = None
    data: bytes = b""


class BlkDriver(GuestDriver):
    """A virtio-blk driver over GuestDriver: header, data in SLOT-sized pieces, status byte."""

    def submit(self, req_type: int, sector: int, *, out: bytes = b"", in_len: int = 0) -> BlkRequest:
        hdr = self.pool.get()
        pieces = [out[pos : pos + SLOT] for pos in range(0, len(out), SLOT)]
        out_segs = [(self.pool.get(), len(piece)) for piece in pieces]
        for (gpa, _), piece in zip(out_segs, pieces, strict=True):
            self.mem.write(gpa, piece)
        in_segs = [(self.pool.get(), min(SLOT, in_len - pos)) for pos in range(0, in_len, SLOT)]
        status = self.pool.get()
        req = BlkRequest([hdr, *(gpa for gpa, _ in out_segs + in_segs), status], in_segs, status)
        chain = request_chain(self.mem, req_type, sector, hdr, out_segs, in_segs, status)
        self.queues[0].ring.add(*chain, req, indirect=self.session.indirect)
        return req

    def complete(self, count: int) -> list[BlkRequest]:
        done = []
        for token, written in self.reap(0, count):
            req = token
            assert isinstance(req, BlkRequest)
            req.written = written
            req.status = self.mem.read(req.status_gpa, 1)[0]
            req.data = b"".join(self.mem.read(a, n) for a, n in req.in_)
            for gpa in req.slots:
                self.pool.put(gpa)
            done.append(req)
        return done

    def do(self, req_type: int, sector: int, *, out: bytes = b"", in_len: int = 0) -> BlkRequest:
        req = self.submit(req_type, sector, out=out, in_len=in_len)
        self.kick(0)
        (got,) = self.complete(1)
        assert got is req
        return req
