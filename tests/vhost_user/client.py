"""A vhost-user frontend in Python, for tests: memfd guest memory, the project's driver rings and
NetDriver, and the messages spoken over a Unix socket to the backend under test."""

from __future__ import annotations

import array
import mmap
import os
import socket
from collections.abc import Callable
from dataclasses import dataclass, field

from kernel_iface import uapi
from kernel_iface.uapi import bit
from vdpa_svq.guest.net import RX_BUFFER, NetDriver
from vdpa_svq.guest.plan import plan_layout
from vdpa_svq.memory.guest import GuestMemory
from vdpa_svq.ring import DriverRing, Layout
from vdpa_svq.vhost_user import messages as m
from vdpa_svq.vhost_user.messages import FLAG_NEED_REPLY, HEADER, ProtocolFeature, Request

UADDR_OFFSET = 0x7F0000000000  # the frontend's "virtual" address of guest-physical 0
NUM = 64


def new_eventfd(queue: int) -> int:
    return os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)


def send(sock: socket.socket, request: int, payload: bytes = b"", fds: list[int] | None = None,
         flags: int = 0) -> None:
    data = m.encode(request, payload, flags=flags)
    anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())] if fds else []
    sock.sendmsg([data], anc)


def recv_reply(sock: socket.socket, request: int) -> bytes:
    head = b""
    while len(head) < HEADER.size:
        chunk = sock.recv(HEADER.size - len(head))
        if not chunk:
            raise ConnectionError("backend hung up")
        head += chunk
    req, flags, size = HEADER.unpack(head)
    assert req == request, f"reply to {req}, expected {request}"
    assert flags & m.FLAG_REPLY
    body = b""
    while len(body) < size:
        body += sock.recv(size - len(body))
    return body


@dataclass
class VhostUserFrontend:
    sock: socket.socket
    layout: Layout
    event_idx: bool = True
    log_all: bool = False
    num: int = NUM
    mem: GuestMemory = field(init=False)
    rings: list[DriverRing] = field(default_factory=list)
    kick_fds: list[int] = field(default_factory=list)
    call_fds: list[int] = field(default_factory=list)
    log_fd: int = -1
    log_mm: mmap.mmap | None = None
    features: int = 0
    ring_uaddr_offset: int = UADDR_OFFSET  # where the rings are said to be (a wrong one, to test refusals)
    extra_features: int = 0  # device-specific bits to ack (each must be offered)
    config: bool = False  # negotiate protocol feature CONFIG
    offered: int = 0  # what GET_FEATURES said
    extra_memory: int = 0  # bytes of guest memory after what the rings and buffers use (sparse)
    # The fds sent as queue i's kick and call notifiers (a misbehaving frontend sends others).
    make_kick_fd: Callable[[int], int] = new_eventfd
    make_call_fd: Callable[[int], int] = new_eventfd
    err_fds: bool = False  # send each queue an error eventfd (SET_VRING_ERR), as QEMU does
    errs: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.plan = plan_layout(self.layout, self.num, 2, RX_BUFFER, self.num)
        self.mem = GuestMemory.create(self.plan.size + self.extra_memory)

    def ack(self, request: Request, payload: bytes = b"", fds: list[int] | None = None) -> None:
        send(self.sock, request, payload, fds, flags=FLAG_NEED_REPLY)
        status = m.U64.unpack(recv_reply(self.sock, request))[0]
        assert status == 0, f"{request.name} failed: {status}"

    def get_u64(self, request: Request) -> int:
        send(self.sock, request)
        return m.U64.unpack(recv_reply(self.sock, request))[0]

    def negotiate(self) -> None:
        """SET_OWNER, features and protocol features: what comes before memory and rings."""
        s = self.sock
        send(s, Request.SET_OWNER)
        self.offered = offered = self.get_u64(Request.GET_FEATURES)
        want = bit(uapi.VIRTIO_F_VERSION_1) | bit(m.VHOST_USER_F_PROTOCOL_FEATURES) | self.extra_features
        want |= bit(uapi.VIRTIO_RING_F_INDIRECT_DESC)
        if self.layout is Layout.PACKED:
            want |= bit(uapi.VIRTIO_F_RING_PACKED)
        if self.event_idx:
            want |= bit(uapi.VIRTIO_RING_F_EVENT_IDX)
        if self.log_all:
            want |= bit(m.VHOST_F_LOG_ALL)
        assert offered & want == want, f"offered {offered:#x}, want {want:#x}"
        pf = self.get_u64(Request.GET_PROTOCOL_FEATURES)
        want_pf = bit(ProtocolFeature.REPLY_ACK) | bit(ProtocolFeature.LOG_SHMFD)
        if self.config:
            want_pf |= bit(ProtocolFeature.CONFIG)
        assert pf & want_pf == want_pf, f"protocol features offered {pf:#x}, want {want_pf:#x}"
        send(s, Request.SET_PROTOCOL_FEATURES, m.U64.pack(want_pf))
        self.features = want
        self.ack(Request.SET_FEATURES, m.U64.pack(want))

    def get_config(self, offset: int, size: int, flags: int = 0) -> bytes:
        """GET_CONFIG as QEMU sends it (a zeroed buffer of `size` bytes); the raw reply payload."""
        send(self.sock, Request.GET_CONFIG, m.Config(offset, size, flags, bytes(size)).encode())
        return recv_reply(self.sock, Request.GET_CONFIG)

    def set_config(self, offset: int, data: bytes, flags: int = 0) -> None:
        self.ack(Request.SET_CONFIG, m.Config(offset, len(data), flags, data).encode())

    def setup(self) -> NetDriver:
        self.negotiate()
        return self.setup_rings()

    def setup_rings(self) -> NetDriver:
        """Memory table, log, rings, RX buffers, then enable: the relay starts."""
        (region,) = self.mem.regions
        table = m.MemTable((m.MemRegion(region.gpa, region.size, region.gpa + UADDR_OFFSET, 0),))
        self.ack(Request.SET_MEM_TABLE, table.encode(), [region.fd])
        if self.log_all:
            self.set_log_base()
        for i in range(2):
            addrs = self.plan.rings[i]
            self.rings.append(self.plan.driver_ring(i, self.mem, self.layout, event_idx=self.event_idx, indirect=True,
                                                    name=f"client vq{i}"))
            kick = self.make_kick_fd(i)
            call = self.make_call_fd(i)
            self.kick_fds.append(kick)
            self.call_fds.append(call)
            self.ack(Request.SET_VRING_NUM, m.VringState(i, self.num).encode())
            base = 0x8000 if self.layout is Layout.PACKED else 0
            self.ack(Request.SET_VRING_BASE, m.VringState(i, base).encode())
            u = self.ring_uaddr_offset
            # vhost's names: "used" is the device area, "avail" the driver area (packed too).
            self.ack(Request.SET_VRING_ADDR, m.VringAddr(i, 0, addrs.desc + u, addrs.device + u,
                                                         addrs.driver + u, addrs.device).encode())
            self.ack(Request.SET_VRING_CALL, m.U64.pack(i), [call])
            self.ack(Request.SET_VRING_KICK, m.U64.pack(i), [kick])
            if self.err_fds:
                self.errs.append(new_eventfd(i))
                self.ack(Request.SET_VRING_ERR, m.U64.pack(i), [self.errs[-1]])
        drv = NetDriver(self.mem, self.rings[0], self.rings[1], self.plan.pools[0], self.plan.pools[1],
                        lambda i: os.eventfd_write(self.kick_fds[i], 1), (self.call_fds[0], self.call_fds[1]))
        drv.fill_rx()
        for i in range(2):
            self.ack(Request.SET_VRING_ENABLE, m.VringState(i, 1).encode())
        return drv

    def set_log_base(self) -> None:
        assert self.log_mm is None
        size = -(-(self.mem.size // 4096 // 8 + 1) // 4096) * 4096
        self.log_fd = os.memfd_create("client-log", os.MFD_CLOEXEC)
        os.ftruncate(self.log_fd, size)
        self.log_mm = mmap.mmap(self.log_fd, size)
        send(self.sock, Request.SET_LOG_BASE, m.LogArea(size, 0).encode(), [self.log_fd])
        assert recv_reply(self.sock, Request.SET_LOG_BASE) == b""

    def get_vring_base(self, index: int) -> int:
        send(self.sock, Request.GET_VRING_BASE, m.VringState(index, 0).encode())
        st = m.VringState(*m.VringState.STRUCT.unpack(recv_reply(self.sock, Request.GET_VRING_BASE)))
        assert st.index == index
        return st.num

    def close(self) -> None:
        self.sock.close()
        for ring in self.rings:
            ring.close()
        self.mem.close()
        for fd in self.kick_fds + self.call_fds + self.errs:
            os.close(fd)
        if self.log_mm is not None:
            self.log_mm.close()
            os.close(self.log_fd)
