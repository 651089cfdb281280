"""The vhost-user backend: a frontend (QEMU, DPDK virtio-user) drives a vhost-vdpa device through
shadow virtqueues.

Layers, as in DPDK's lib/vhost: the transport (a listening AF_UNIX socket, one frontend at a time,
file descriptors as SCM_RIGHTS) in Server; the messages (messages.py, one table row each) handled
by Connection, one method per request; the datapath is ShadowSession (session.py), unchanged.

Security model: do not assume received fields are sane. messages.decode() checks every field
before a handler runs; a handler checks what depends on state (queue index, ring inside guest
memory). Any error closes that connection with one log line, and the server takes the next one.

The frontend's rings are the guest-visible rings: SET_VRING_ADDR gives their addresses in the
frontend's virtual address space, translated to guest-physical through the memory table's
userspace_addr. When every queue is configured (size, addresses, kick) and enabled, the device is
negotiated (DeviceSession.negotiate, as attach does) and each queue becomes
ShadowSession.add_queue with the frontend's kick and call eventfds.

Config space (protocol feature CONFIG, offered when the device has one): GET_CONFIG reads the
device's config space, SET_CONFIG writes it; for a net device the bits that describe config fields
(MAC, MTU, STATUS) are passed through when the device offers them, and negotiated with the device
when the frontend acks them.

Multiqueue (a net device that offers VIRTIO_NET_F_MQ and CTRL_VQ, max_virtqueue_pairs = N): MQ
and CTRL_VQ are offered to the frontend, protocol feature MQ too, and GET_QUEUE_NUM answers N,
the pair count (QEMU's net compares it with -netdev queues=, a pair count; DPDK's vhost library
answers pairs as well). The frontend keeps its control queue and sends each pair's vrings over
this one socket (QEMU: one vhost_dev per pair, its messages with queue indexes 2p, 2p+1), and
tells which pairs run with SET_VRING_ENABLE. Serve relays every pair that is configured (size,
addresses, kick), enabled or not: pair 0 must be enabled to start, as before; a frontend that
acked MQ with protocol feature STATUS is started at DRIVER_OK, once every pair is configured
(a pair configured later restarts the relay with it). Which pairs move frames is the device's
business: serve drives the device's own control queue (control.py, ShadowSession.add_control_queue)
and sends VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET with the number of enabled pairs counted from pair 0,
after each start and whenever a SET_VRING_ENABLE changes it. A disabled pair's buffers may sit in
its shadow ring, but the device does not touch them (5.1.6.5.5), so the frontend's ring stays as it
left it, and GET_VRING_BASE rewinds to what was used, as for any queue.

Dirty log (VHOST_F_LOG_ALL + SET_LOG_BASE with LOG_SHMFD): the relay marks its own bitmap; the
backend moves it (harvest, then OR) into the frontend's shared log every LOG_SYNC_S while a log is
set, and always before GET_VRING_BASE answers, which is where a migrating frontend takes its last
log sync of a stopped device.
"""

from __future__ import annotations

import array
import contextlib
import errno
import logging
import mmap
import os
import select
import socket
import threading
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from kernel_iface import NotSupported, uapi
from kernel_iface.uapi import bit
from vdpa_svq.device import Device
from vdpa_svq.errors import VdpaSvqError
from vdpa_svq.loop import ADAPTIVE, Polling, check_polling, signal_eventfd
from vdpa_svq.memory.guest import GuestMemory
from vdpa_svq.ring import Layout, RingAddresses, RingState
from vdpa_svq.ring.layout import USED_IDX, desc_area_size, device_area_size, driver_area_size
from vdpa_svq.session import DeviceSession, ShadowSession
from vdpa_svq.vhost_user import messages as m
from vdpa_svq.vhost_user.backoff import BACKOFF_MAX_S, AcceptBackoff
from vdpa_svq.vhost_user.messages import (
    HEADER,
    MAX_FDS,
    VHOST_F_LOG_ALL,
    VHOST_USER_F_PROTOCOL_FEATURES,
    Message,
    ProtocolError,
    ProtocolFeature,
    Request,
)
from vdpa_svq.vhost_user.peer_fds import check_memory_fd, take_eventfd

log = logging.getLogger("vdpa_svq.vhost_user")


# Virtio features offered to the frontend, each for a reason. The relay implements both layouts,
# EVENT_IDX and indirect tables on the guest side whatever the device has, so these do not depend
# on the device. Device-specific bits: NET_PASSTHROUGH_FEATURES.
GUEST_FEATURES = {
    uapi.VIRTIO_F_VERSION_1: "modern little-endian layout; the rings assume it",
    uapi.VIRTIO_F_RING_PACKED: "the relay serves packed guest rings (2.8)",
    uapi.VIRTIO_RING_F_EVENT_IDX: "notification suppression by event index, both ways",
    uapi.VIRTIO_RING_F_INDIRECT_DESC: "the relay flattens guest indirect tables",
    VHOST_USER_F_PROTOCOL_FEATURES: "vhost-user protocol features (rings start disabled)",
    VHOST_F_LOG_ALL: "dirty logging into the frontend's shared log (live migration)",
}
OFFERED_FEATURES = sum(bit(b) for b in GUEST_FEATURES)
# virtio-net bits passed through to the frontend when the device offers them, and negotiated with
# the device (DeviceSession.extra_features) when the frontend acks them. None changes the ring
# format or the number of queues, and the header is 12 bytes with VERSION_1 whatever they say;
# the relay copies buffers' addresses and used lengths, never a header, so it is the same with or
# without them. Each row says what the bit changes instead.
NET_PASSTHROUGH_FEATURES = {
    uapi.VIRTIO_NET_F_MAC: "config.mac is the device's address (the one it filters on, e.g. vdpa_sim)",
    uapi.VIRTIO_NET_F_MTU: "config.mtu is the device's maximum MTU (advice to the driver, who sizes its buffers)",
    uapi.VIRTIO_NET_F_STATUS: "config.status has the link state; config interrupts are not forwarded, "
                              "so the frontend sees a change on its next GET_CONFIG",
    uapi.VIRTIO_NET_F_MRG_RXBUF: "a frame may span RX buffers, one used element each: the relay returns a "
                                 "pass's used elements with one publish, so the guest sees them together",
    uapi.VIRTIO_NET_F_CSUM: "TX headers may ask for a checksum (NEEDS_CSUM): header fields the relay never reads",
    uapi.VIRTIO_NET_F_GUEST_CSUM: "RX headers may carry a partial checksum: written by the device, not the relay",
    uapi.VIRTIO_NET_F_HOST_TSO4: "TX frames up to 64 KiB with gso_type TCPV4: longer chains, relayed like any",
    uapi.VIRTIO_NET_F_HOST_TSO6: "TX frames up to 64 KiB with gso_type TCPV6: longer chains, relayed like any",
    uapi.VIRTIO_NET_F_HOST_ECN: "the ECN bit of a TX gso_type: a header field",
    uapi.VIRTIO_NET_F_GUEST_TSO4: "RX frames up to 64 KiB (TCPV4 GSO) in the guest's buffers: used lengths relayed",
    uapi.VIRTIO_NET_F_GUEST_TSO6: "RX frames up to 64 KiB (TCPV6 GSO) in the guest's buffers: used lengths relayed",
    uapi.VIRTIO_NET_F_GUEST_ECN: "the ECN bit of an RX gso_type: a header field",
}
NET_PASSTHROUGH = sum(bit(b) for b in NET_PASSTHROUGH_FEATURES)
# Multiqueue: offered when the device has both; the frontend's control queue stays in the frontend,
# serve drives the device's (see the module docstring).
NET_MQ_FEATURES = {
    uapi.VIRTIO_NET_F_MQ: "the device's queue pairs (max_virtqueue_pairs); QEMU's vhost-user net needs it offered",
    uapi.VIRTIO_NET_F_CTRL_VQ: "MQ requires it (5.1.3.1); the frontend emulates its control queue itself",
}
NET_MQ = sum(bit(b) for b in NET_MQ_FEATURES)
MAX_PAIRS_OFFSET = 8  # struct virtio_net_config: mac[6], status le16, max_virtqueue_pairs le16
PROTOCOL_FEATURES = {
    ProtocolFeature.REPLY_ACK: "NEED_REPLY answered with a u64 status",
    ProtocolFeature.LOG_SHMFD: "the dirty log is a shared memory fd (SET_LOG_BASE)",
    ProtocolFeature.STATUS: "SET_STATUS/GET_STATUS (virtio-user uses them)",
    ProtocolFeature.CONFIG: "GET_CONFIG/SET_CONFIG reach the device's config space (only offered when it has one)",
}
OFFERED_PROTOCOL_FEATURES = sum(bit(b) for b in PROTOCOL_FEATURES)

# Own dirty bitmap only up to this guest-physical span (its bitmap: span / 32 KiB bytes). A DPDK
# --no-huge frontend puts memory at its virtual addresses (~2^47): no log there unless asked for.
MAX_LOGGED_SPAN = 1 << 36
LOG_SYNC_S = 0.02
KEPT_SUMMARIES = 64  # the last connections' summaries a long-lived server keeps (the rest: counted)
# Notifier fds replaced under a running relay stay open until it stops (its thread may be reading
# one); past this many, a replacement restarts the relay instead, which closes them: a frontend that
# replaces its kick fd in a loop must not take the whole server to its fd limit.
MAX_RETIRED_FDS = 64
POLL_S = 0.2
MESSAGE_TIMEOUT_S = 5.0  # the rest of a message that started arriving; a frontend stalled mid-message is dropped


class BackendError(VdpaSvqError):
    """A request that is well formed but cannot be served; the connection is closed."""


class ConnectionClosed(Exception):
    """The frontend went away."""


@dataclass
class VuQueue:
    """One queue as the frontend configured it (addresses still in its user address space)."""

    index: int
    num: int = 0
    addr: m.VringAddr | None = None
    state: RingState = field(default_factory=RingState)
    kick_fd: int | None = None
    call_fd: int | None = None
    err_fd: int | None = None
    enabled: bool = False
    kicked: bool = False  # SET_VRING_KICK since the last GET_VRING_BASE: the ring may start

    def fds(self) -> list[int]:
        return [fd for fd in (self.kick_fd, self.call_fd, self.err_fd) if fd is not None]


@dataclass
class ConnectionSummary:
    peer: str
    messages: int = 0
    started: int = 0  # relay starts
    duration: float = 0.0
    features: int = 0
    protocol_features: int = 0
    guest_layout: str = ""
    shadow_layout: str = ""
    queues: dict[int, dict[str, int]] = field(default_factory=dict)
    log_syncs: int = 0
    relay_loop: dict[str, int] = field(default_factory=dict)  # wake-ups, polling phases and rounds, summed
    error: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {k: (v if k != "queues" else {str(i): q for i, q in v.items()}) for k, v in self.__dict__.items()}


# Relay counters kept per queue across relay runs (RelayStats fields).
QUEUE_COUNTERS = ("forwarded", "returned", "bytes_written", "device_kicks", "guest_calls")


def recv_message(sock: socket.socket) -> tuple[int, int, bytes, list[int]]:
    """One message off the socket: (request, flags, payload, fds); fds travel with the header."""
    fds = array.array("i")
    data, anc, flags, _ = sock.recvmsg(HEADER.size, socket.CMSG_SPACE(MAX_FDS * fds.itemsize))
    for level, kind, cdata in anc:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds.frombytes(cdata[: len(cdata) - len(cdata) % fds.itemsize])
    received = list(fds)
    try:
        if not data:
            raise ConnectionClosed()
        if flags & socket.MSG_CTRUNC:
            raise ProtocolError(f"more than {MAX_FDS} file descriptors with one message")
        data += _recv_exact(sock, HEADER.size - len(data))
        request, mflags, size = m.decode_header(data)
        return request, mflags, _recv_exact(sock, size), received
    except BaseException:
        for fd in received:
            os.close(fd)
        raise


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = b""
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise ProtocolError(f"message truncated: {len(buf)} of {n} bytes, then the frontend hung up")
        buf += chunk
    return buf


class Connection:
    """One frontend connection: its memory, queues and log, and the shadow relay under them."""

    def __init__(self, session: DeviceSession, sock: socket.socket, *, impl: str = "auto", peer: str = "",
                 poll_us: Polling = 0, relay_cpus: Sequence[int] = (), relay_threads: int | None = None) -> None:
        self.session = session
        self.device = session.device
        self.sock = sock
        sock.settimeout(MESSAGE_TIMEOUT_S)
        self.impl = impl
        self.poll_us = poll_us
        self.relay_cpus = relay_cpus  # the relay threads' CPUs, in order (ShadowSession)
        self.relay_threads = relay_threads  # how many (None: loop.default_relay_threads)
        self.summary = ConnectionSummary(peer or "frontend")
        self.features = 0
        self.protocol_features = 0
        self.status = 0
        self.mem: GuestMemory | None = None
        self.table: tuple[m.MemRegion, ...] = ()
        self.log_mem: GuestMemory | None = None  # the frontend's dirty log (SET_LOG_BASE)
        self.log_mm: mmap.mmap | None = None  # its one region's mapping
        self.shadow: ShadowSession | None = None
        self.stats: dict[int, dict[str, int]] = {}  # queue -> counters of finished relay runs
        self._started_at = 0.0
        dev_id = self.device.device_id()
        self.offered_features = OFFERED_FEATURES
        self.config_size = self.device.config_size()
        self.offered_protocol_features = OFFERED_PROTOCOL_FEATURES
        if not self.config_size:
            self.offered_protocol_features &= ~bit(ProtocolFeature.CONFIG)
        self.net = dev_id == uapi.VIRTIO_ID_NET
        self.max_pairs = 1
        if self.net:
            self.offered_features |= self.device.get_features() & NET_PASSTHROUGH
            self.max_pairs = self._device_pairs()
            if self.max_pairs > 1:
                self.offered_features |= NET_MQ
                self.offered_protocol_features |= bit(ProtocolFeature.MQ)
        self.nqueues = 2 * self.max_pairs if self.net else self.device.vqs_count()
        self.queues = [VuQueue(i) for i in range(self.nqueues)]
        self.pairs_set = 1  # what the device's control queue was last told (1: its state after reset)
        self._last_sync = 0.0
        self._fault_said = False  # the fault hook's warning, once
        self._retired: list[int] = []  # replaced kick fds the running relay loop still polls

    # -- the message loop -------------------------------------------------------------------
    def serve(self, stop: threading.Event | None = None) -> ConnectionSummary:
        """Handle messages until the frontend hangs up, breaks the protocol, or `stop` is set."""
        # A device that can vanish (a vhost-user backend) says so on this fd: the frontend is then told
        # by the connection closing, rather than left with queues that silently stopped.
        hangup = self.device.hangup_fd()
        watched = [self.sock] if hangup is None else [self.sock, hangup]
        try:
            while stop is None or not stop.is_set():
                ready, _, _ = select.select(watched, [], [], LOG_SYNC_S if self._logging() else POLL_S)
                if hangup in ready:
                    self.device.check_alive()
                if self.sock in ready:
                    self.handle_one()
                self._check_memory()
                self._maybe_sync_log()
        except ConnectionClosed:
            pass
        except (ProtocolError, BackendError, OSError, VdpaSvqError, ValueError) as e:
            self.summary.error = f"{type(e).__name__}: {e}"
            log.error("%s: closing the connection: %s", self.summary.peer, self.summary.error)
        except Exception as e:  # a bug in vdpa-svq: this connection dies with a traceback, the server goes on
            self.summary.error = f"internal error: {type(e).__name__}: {e}"
            log.exception("%s: closing the connection: %s", self.summary.peer, self.summary.error)
        finally:
            self.close()
        return self.summary

    def _check_memory(self) -> None:
        """A frontend that truncated its memory file under us: its accesses read zeros now (see
        GuestMemory.add_region's shrinkable), and the connection ends with the reason."""
        for mem, what in ((self.mem, "guest memory"), (self.log_mem, "the dirty log")):
            for r in mem.faulted() if mem is not None else ():
                n, addr = r.faults()
                raise BackendError(f"{what} at {r.gpa:#x} (+{r.size:#x}) shrank under the relay: {n} access(es) "
                                   f"past the end of the frontend's file, the first at offset {addr - r.hva:#x}; "
                                   "a frontend must not truncate memory it shared (seal it with F_SEAL_SHRINK)")

    def handle_one(self) -> None:
        request, flags, body, fds = recv_message(self.sock)
        try:
            msg = m.decode(request, flags, body, fds)
        except BaseException:
            for fd in fds:
                os.close(fd)
            raise
        self.summary.messages += 1
        spec = m.MESSAGES[msg.request]
        handler = getattr(self, "on_" + msg.request.name.lower())
        try:
            reply = handler(msg)
        except BaseException:
            for fd in msg.fds:  # handlers take the fds only once they succeed
                _close_quietly(fd)
            raise
        if spec.reply:
            self._send(m.encode_reply(msg.request, reply or b""))
        elif msg.need_reply and self.protocol_features & bit(ProtocolFeature.REPLY_ACK):
            self._send(m.encode_reply(msg.request, m.U64.pack(0)))

    def _send(self, data: bytes) -> None:
        self.sock.sendall(data)

    # -- handlers: one per row of messages.MESSAGES ------------------------------------------
    def on_get_features(self, msg: Message) -> bytes:
        return m.U64.pack(self.offered_features)

    def on_set_features(self, msg: Message) -> None:
        features = msg.payload_as(int)
        if features & ~self.offered_features:
            raise BackendError(f"SET_FEATURES: bits {features & ~self.offered_features:#x} were not offered")
        running = self.shadow is not None
        # Only LOG_ALL may change on the fly: any other bit is negotiated with the device at start.
        changed = (features ^ self.features) & ~bit(VHOST_F_LOG_ALL)
        if running and changed:
            raise BackendError(f"SET_FEATURES: features changed ({changed:#x}) while the rings run")
        self.features = features
        self.summary.features = features

    def on_set_owner(self, msg: Message) -> None:
        pass  # the connection is the owner; the device is owned by the server for its lifetime

    def on_reset_owner(self, msg: Message) -> None:
        self._stop_relay()
        self.features = 0

    def on_get_protocol_features(self, msg: Message) -> bytes:
        return m.U64.pack(self.offered_protocol_features)

    def on_set_protocol_features(self, msg: Message) -> None:
        features = msg.payload_as(int)
        if features & ~self.offered_protocol_features:
            raise BackendError(
                f"SET_PROTOCOL_FEATURES: bits {features & ~self.offered_protocol_features:#x} not offered"
            )
        self.protocol_features = features
        self.summary.protocol_features = features

    def _device_pairs(self) -> int:
        """The net device's queue pairs: max_virtqueue_pairs when it offers MQ and CTRL_VQ, else 1."""
        if self.device.get_features() & NET_MQ != NET_MQ or self.config_size < MAX_PAIRS_OFFSET + 2:
            return 1
        pairs = int.from_bytes(self.device.get_config(MAX_PAIRS_OFFSET, 2), "little")
        return pairs if 1 <= pairs <= 0x8000 else 1  # out of range (5.1.4): one pair, no MQ offered

    def on_get_queue_num(self, msg: Message) -> bytes:
        return m.U64.pack(self.max_pairs if self.net else self.nqueues)

    def on_set_mem_table(self, msg: Message) -> None:
        table = msg.payload_as(m.MemTable)
        restart = self.shadow is not None
        self._stop_relay()
        new = GuestMemory()
        try:
            for region, fd in zip(table.regions, msg.fds, strict=True):
                if region.mmap_offset % mmap.ALLOCATIONGRANULARITY:
                    raise BackendError(f"SET_MEM_TABLE: mmap_offset {region.mmap_offset:#x} not page aligned")
                shrinkable, page = check_memory_fd(fd, region.mmap_offset, region.size,
                                                   f"SET_MEM_TABLE: region at {region.gpa:#x}")
                new.add_region(region.gpa, region.size, fd, region.mmap_offset, owns_fd=True,
                               shrinkable=shrinkable, page_size=page)
        except BaseException:
            taken = {r.fd for r in new}
            new.close()
            for fd in msg.fds:
                if fd not in taken:
                    _close_quietly(fd)
            msg.fds.clear()
            raise
        msg.fds.clear()
        if self.mem is not None:
            self.mem.close()
        self.mem, self.table = new, table.regions
        if restart:
            self._maybe_start()

    def on_set_log_base(self, msg: Message) -> bytes:
        area = msg.payload_as(m.LogArea)
        fd = msg.fds[0]
        log_mem = GuestMemory()  # the log as one region at 0: mapped SIGBUS-safe like guest memory
        try:
            if area.mmap_offset % mmap.ALLOCATIONGRANULARITY:
                raise BackendError(f"SET_LOG_BASE: mmap_offset {area.mmap_offset:#x} not page aligned")
            shrinkable, page = check_memory_fd(fd, area.mmap_offset, area.mmap_size, "SET_LOG_BASE: the log")
            try:
                log_mem.add_region(0, area.mmap_size, fd, area.mmap_offset, shrinkable=shrinkable, page_size=page)
            except (OSError, ValueError) as e:
                raise BackendError(f"SET_LOG_BASE: cannot map the log ({area.mmap_size} bytes): {e}") from None
        finally:
            os.close(fd)
            msg.fds.clear()
        self.sync_log()  # pages dirtied so far go into the log they were dirtied under
        if self.log_mem is not None:
            self.log_mem.close()
        self.log_mem = log_mem
        self.log_mm = log_mem.regions[0].mm
        return b""  # QEMU waits for a reply with no payload (as DPDK's vhost_user_set_log_base sends)

    def on_set_log_fd(self, msg: Message) -> None:
        _close_quietly(msg.fds.pop())  # LOG_SHMFD... not the log-fd eventfd: not offered, ignored

    def _queue(self, request: Request, index: int) -> VuQueue:
        if not 0 <= index < self.nqueues:
            raise BackendError(f"{request.name}: queue {index}, the device has {self.nqueues}")
        return self.queues[index]

    def on_set_vring_num(self, msg: Message) -> None:
        st = msg.payload_as(m.VringState)
        q = self._queue(msg.request, st.index)
        if not 1 <= st.num <= 32768:
            raise BackendError(f"SET_VRING_NUM: queue {st.index} size {st.num} (1..32768)")
        q.num = st.num

    def on_set_vring_addr(self, msg: Message) -> None:
        addr = msg.payload_as(m.VringAddr)
        self._queue(msg.request, addr.index).addr = addr

    def on_set_vring_base(self, msg: Message) -> None:
        st = msg.payload_as(m.VringState)
        q = self._queue(msg.request, st.index)
        if self._packed():
            # Bits 0-14 avail index, bit 15 avail wrap counter. QEMU adds the used half in bits
            # 16-31; DPDK's virtio-user sends only the avail half: then the device starts used
            # where avail is (as DPDK's backend does).
            avail = RingState.from_vring_base(Layout.PACKED, st.num)
            if st.num >> 16 == 0:
                avail = RingState(avail.avail_idx, avail.avail_idx, avail.avail_wrap, avail.avail_wrap)
            q.state = avail
        else:
            q.state = RingState(st.num & 0xFFFF, st.num & 0xFFFF)

    def on_get_vring_base(self, msg: Message) -> bytes:
        st = msg.payload_as(m.VringState)
        q = self._queue(msg.request, st.index)
        self._stop_relay()  # the ring stops; the others restart once they are ready again
        q.kicked = False
        q.enabled = False
        layout = Layout.PACKED if self._packed() else Layout.SPLIT
        return m.VringState(q.index, q.state.to_vring_base(layout)).encode()

    def _set_vring_fd(self, msg: Message, attr: str) -> VuQueue:
        q = self._queue(msg.request, msg.payload_as(int) & m.VRING_IDX_MASK)
        if msg.fds:
            take_eventfd(msg.fds[-1], f"{msg.request.name}: queue {q.index}")
        new = msg.fds.pop() if msg.fds else None
        old = getattr(q, attr)
        running = self.shadow.queues.get(q.index) if self.shadow is not None else None
        if running is not None and attr != "call_fd" and len(self._retired) >= MAX_RETIRED_FDS:
            log.info("%s: queue %d's %s replaced %d times in one relay run: restarting the relay",
                     self.summary.peer, q.index, attr, MAX_RETIRED_FDS)
            running = None
            self._stop_relay()  # closes the retired fds; _maybe_start starts it again with the new one
        if running is not None and old is not None and new is not None and attr == "call_fd":
            # The running relay writes the old fd number: point that number at the new eventfd.
            os.dup2(new, old)
            os.close(new)
            return q
        if running is not None and old is not None and new is not None and attr == "kick_fd":
            assert self.shadow is not None
            try:
                self.shadow.loop.add_relay(new, running.svq, "kick")
            except BaseException:
                os.close(new)  # off the message already: handle_one's cleanup no longer sees it
                raise
            running.guest_kick_fd = new
            # The loop thread may be about to read the old fd: close it only once the loop stopped.
            self._retired.append(old)
            setattr(q, attr, new)
            return q
        if running is not None and attr == "err_fd":
            # The loop thread signals it when the device breaks the queue: point the running queue
            # at the new fd, and close the old one only once the loop stopped.
            running.guest_err_fd = new
            if old is not None:
                self._retired.append(old)
            setattr(q, attr, new)
            return q
        if running is not None:
            self._stop_relay()  # a notifier appears or goes away: restart with it (_maybe_start)
        if old is not None:
            os.close(old)
        setattr(q, attr, new)
        return q

    def on_set_vring_kick(self, msg: Message) -> None:
        q = self._set_vring_fd(msg, "kick_fd")
        if q.kick_fd is None:
            raise BackendError(f"SET_VRING_KICK: queue {q.index} without a kick fd (polling) is not supported")
        q.kicked = True
        if not self.features & bit(VHOST_USER_F_PROTOCOL_FEATURES):
            q.enabled = True  # without protocol features a ring starts on its kick fd
        if self.shadow is not None:
            signal_eventfd(q.kick_fd)  # a replaced kick fd: buffers made available meanwhile
        self._maybe_start()

    def on_set_vring_call(self, msg: Message) -> None:
        self._set_vring_fd(msg, "call_fd")
        self._maybe_start()

    def on_set_vring_err(self, msg: Message) -> None:
        self._set_vring_fd(msg, "err_fd")
        self._maybe_start()  # after a restart for too many replaced fds (MAX_RETIRED_FDS)

    def on_set_vring_enable(self, msg: Message) -> None:
        st = msg.payload_as(m.VringState)
        q = self._queue(msg.request, st.index)
        if st.num not in (0, 1):
            raise BackendError(f"SET_VRING_ENABLE: queue {st.index} enable={st.num}")
        q.enabled = bool(st.num)
        if q.enabled:
            self._maybe_start()
        elif self.net and q.index >= 2:
            self._apply_pairs()  # a pair beyond the first: the device stops moving its frames
        elif self.shadow is not None:
            self._stop_relay()

    def on_send_rarp(self, msg: Message) -> None:
        pass  # RARP not offered

    def on_net_set_mtu(self, msg: Message) -> None:
        pass  # protocol feature NET_MTU not offered (VIRTIO_NET_F_MTU may be: the device's config has the MTU)

    def _config(self, msg: Message) -> m.Config:
        cfg = msg.payload_as(m.Config)
        if not self.protocol_features & bit(ProtocolFeature.CONFIG):
            why = "negotiated" if self.offered_protocol_features & bit(ProtocolFeature.CONFIG) else "offered"
            raise BackendError(f"{msg.request.name}: protocol feature CONFIG was not {why}")
        return cfg

    def on_get_config(self, msg: Message) -> bytes:
        """The device's config bytes [offset, offset+size) after the vhost-user config header.

        A range past the device's config size gets the spec's failure answer, an empty payload
        ("zero length of payload to indicate an error"), as QEMU's own backends do: vhost-user-blk
        (contrib/ and the block export's vu_blk_get_config) refuses a length past its config
        struct, and libvhost-user's vu_get_config then answers with size 0. Zeros instead would
        make up fields the device does not have (a frontend would take mtu 0 or
        max_virtqueue_pairs 0 as the device's word), and the kernel refuses the same range
        (vhost_vdpa_config_validate: E2BIG): the frontend sees what a vhost-vdpa user would.
        """
        cfg = self._config(msg)
        if cfg.size == 0:
            return m.Config(cfg.offset, 0, cfg.flags, b"").encode()
        if cfg.offset + cfg.size > self.config_size:
            log.warning("%s: GET_CONFIG: %d bytes at offset %d, past the device's %d-byte config: refused",
                        self.summary.peer, cfg.size, cfg.offset, self.config_size)
            return b""
        try:
            data = self.device.get_config(cfg.offset, cfg.size)
        except (OSError, ValueError) as e:
            log.warning("%s: GET_CONFIG: the device failed: %s", self.summary.peer, e)
            return b""
        return m.Config(cfg.offset, cfg.size, cfg.flags, data).encode()

    def on_set_config(self, msg: Message) -> None:
        """Forwarded to the device, which decides which fields are writable: vhost-vdpa has no
        flags to pass on, so a migration write (flags 1) is forwarded like a driver's (flags 0)."""
        cfg = self._config(msg)
        if cfg.size == 0:
            return
        try:
            self.device.set_config(cfg.offset, cfg.data)
        except (OSError, ValueError) as e:
            raise BackendError(f"SET_CONFIG: the device refused {cfg.size} bytes at offset {cfg.offset}: {e}") from None

    def on_set_status(self, msg: Message) -> None:
        status = msg.payload_as(int)
        if status > 0xFF:
            raise BackendError(f"SET_STATUS: {status:#x} is not a status byte")
        self.status = status
        if self.status == 0:
            self._stop_relay()
        elif self.status & uapi.VIRTIO_CONFIG_S_DRIVER_OK:
            self._maybe_start()

    def on_get_status(self, msg: Message) -> bytes:
        return m.U64.pack(self.status)

    # -- the relay ----------------------------------------------------------------------------
    def _packed(self) -> bool:
        return bool(self.features & bit(uapi.VIRTIO_F_RING_PACKED))

    def _ready(self, q: VuQueue) -> bool:
        return self._configured(q) and q.enabled

    def _configured(self, q: VuQueue) -> bool:
        return q.num > 0 and q.addr is not None and q.kicked and q.kick_fd is not None

    def _mq(self) -> bool:
        """The frontend acked multiqueue: pairs beyond the first may come."""
        return self.max_pairs > 1 and bool(self.features & bit(uapi.VIRTIO_NET_F_MQ))

    def _relayed(self) -> list[VuQueue]:
        """The queues a relay run takes: all of them (not net), else pair 0 and every configured
        pair (enabled or not: the device's pair count says which move frames)."""
        if not self.net:
            return list(self.queues)
        pairs = range(self.max_pairs if self._mq() else 1)
        return [q for p in pairs for q in self.queues[2 * p : 2 * p + 2]
                if all(self._configured(x) for x in self.queues[2 * p : 2 * p + 2])]

    def _enabled_pairs(self) -> int:
        """Pairs the frontend enabled, counted from pair 0 up to the first that is not (relayed)."""
        relayed = {q.index for q in self._relayed()}
        pairs = 0
        while pairs < self.max_pairs and all(
            i in relayed and self.queues[i].enabled for i in (2 * pairs, 2 * pairs + 1)
        ):
            pairs += 1
        return max(pairs, 1)

    def _apply_pairs(self) -> None:
        """Tell the device how many pairs move frames, when that changed (VQ_PAIRS_SET)."""
        shadow = self.shadow
        if shadow is None or shadow.control is None:
            return
        pairs = self._enabled_pairs()
        if pairs != self.pairs_set:
            shadow.control.set_queue_pairs(pairs)
            self.pairs_set = pairs
            log.info("%s: %d queue pair(s) enabled", self.summary.peer, pairs)

    def to_gpa(self, uaddr: int, length: int, what: str) -> int:
        """A frontend user address -> guest-physical, through the memory table; the whole range must fit."""
        for r in self.table:
            if r.uaddr <= uaddr and uaddr + length <= r.uaddr + r.size:
                return r.gpa + (uaddr - r.uaddr)
        raise BackendError(f"{what} at user address {uaddr:#x} (+{length:#x}) is not in the memory table")

    def _maybe_start(self) -> None:
        if self.shadow is not None:
            running = set(self.shadow.queues)
            if {q.index for q in self._relayed()} <= running:
                self._apply_pairs()
                return
            self._stop_relay()  # a pair configured since the start: relay it too
        relayed = self._relayed()
        # Net: pair 0 configured and enabled; the other pairs come along configured. Else every queue.
        needed = relayed[:2] if self.net else relayed
        if self.mem is None or not needed or needed[0].index != 0 or not all(self._ready(q) for q in needed):
            return
        if self._mq() and self.protocol_features & bit(ProtocolFeature.STATUS) and not (
            self.status & uapi.VIRTIO_CONFIG_S_DRIVER_OK
        ):
            return  # the frontend says when every pair is configured (QEMU: DRIVER_OK after the last)
        layout = Layout.PACKED if self._packed() else Layout.SPLIT
        plan = []
        for q in relayed:
            assert q.addr is not None
            name = f"queue {q.index}"
            addrs = RingAddresses(
                self.to_gpa(q.addr.desc, desc_area_size(q.num), f"{name} descriptor ring"),
                self.to_gpa(q.addr.avail, driver_area_size(layout, q.num), f"{name} driver area"),
                self.to_gpa(q.addr.used, device_area_size(layout, q.num), f"{name} device area"),
            )
            if layout is Layout.SPLIT:
                self._check_split_base(q, addrs)
            plan.append((q, addrs))
        span = max(r.end for r in self.mem)
        # The session outlives this connection: its extra features are set for each start.
        self.session.extra_features = self.features & NET_PASSTHROUGH | (NET_MQ if self._mq() else 0)
        self.session.negotiate()
        shadow = ShadowSession(self.session, self.mem, impl=self.impl, poll_us=self.poll_us, relay_cpus=self.relay_cpus,
                               relay_threads=self.relay_threads,
                               dirty=True if span <= MAX_LOGGED_SPAN else None)
        try:
            for q, addrs in plan:
                shadow.add_queue(
                    q.index,
                    layout,
                    q.num,
                    addrs,
                    guest_event_idx=bool(self.features & bit(uapi.VIRTIO_RING_F_EVENT_IDX)),
                    guest_kick_fd=q.kick_fd,
                    guest_call_fd=q.call_fd,
                    guest_err_fd=q.err_fd,
                    guest_state=q.state,
                )
            if self._mq():
                shadow.add_control_queue(2 * self.max_pairs)  # after the data queues (5.1.2)
            shadow.start()
        except BaseException:
            shadow.close()
            raise
        self.shadow = shadow
        self.pairs_set = 1
        self._started_at = time.monotonic()
        self.summary.started += 1
        self.summary.guest_layout = layout.value
        self.summary.shadow_layout = self.session.layout.value
        if self.features & bit(VHOST_F_LOG_ALL) and shadow.dirty is None:
            log.warning("%s: LOG_ALL: guest-physical space of %#x bytes is too sparse to log", self.summary.peer, span)
        log.info("%s: relaying %d queues, guest %s rings -> shadow %s rings", self.summary.peer,
                 len(plan), layout.value, self.session.layout.value)
        for q in relayed:
            signal_eventfd(q.kick_fd)  # buffers made available before the relay ran
        self._apply_pairs()

    def _check_split_base(self, q: VuQueue, addrs: RingAddresses) -> None:
        """A split ring restarts where its used index stands (VIRTIO 1.2 2.7.8: idx, where the driver
        takes the next used entry): every backend that stops (serve, QEMU's shadow rings, vhost-net)
        finishes or rewinds what it took. A SET_VRING_BASE elsewhere would make the relay reuse a used
        entry (behind) or skip buffers nobody returns (ahead): refused, not guessed."""
        assert self.mem is not None
        used = int.from_bytes(self.mem.read(addrs.device + USED_IDX, 2), "little")
        if used != q.state.avail_idx:
            raise BackendError(
                f"queue {q.index}: SET_VRING_BASE {q.state.avail_idx}, but the ring's used index is {used}: "
                "a ring is handed over at its used index (was it stopped with GET_VRING_BASE?)")

    def _stop_relay(self) -> None:
        """Stop relaying (ShadowSession.hand_back): keep where each ring restarts, count, sync the log."""
        shadow = self.shadow
        if shadow is None:
            return
        self.shadow = None
        self._log_device_state()
        try:
            # The device is stopped before the last used buffers are taken and the last marks
            # harvested: a device still running could write an RX buffer after the final sync, and
            # the destination of a migration would never get that page. A net device uses buffers
            # in order: what it held is read again from the guest ring on the next start.
            handed = shadow.hand_back(assume_in_order=True)
            if handed.quiesce_error is not None:
                log.warning("%s: the device did not stop before the final sync: %s", self.summary.peer,
                            handed.quiesce_error)
            for i, state in handed.states.items():
                self.queues[i].state = state
            for i, sq in shadow.queues.items():
                stats = self.stats.setdefault(i, dict.fromkeys(QUEUE_COUNTERS, 0))
                s = sq.svq.stats
                for name in QUEUE_COUNTERS:
                    stats[name] += getattr(s, name)
            for name, n in shadow.loop.stats.items():
                self.summary.relay_loop[name] = self.summary.relay_loop.get(name, 0) + n
            for i, e in shadow.errors().items():
                log.error("%s: queue %d stopped: %s", self.summary.peer, i, e)
            self._sync_log_from(shadow)
        finally:
            self.summary.duration += time.monotonic() - self._started_at
            shadow.close()
            for fd in self._retired:
                os.close(fd)
            self._retired.clear()

    def _log_device_state(self) -> None:
        """What the device itself says when a relay run stops, before it is quiesced (a device that
        keeps an account, soft:*): its faults (broken queues with the reason, a dead datapath), and
        at -v what each queue moved. A relay whose device stopped using buffers shows why here."""
        try:
            faults, activity = self.device.faults(), self.device.activity()
        except NotSupported:
            return
        for index, reason in sorted(faults.items()):
            log.error("%s: device queue %d stopped: %s", self.summary.peer, index, reason)
        for line in activity:
            log.info("%s: device: %s", self.summary.peer, line)

    # -- dirty log ------------------------------------------------------------------------------
    def _logging(self) -> bool:
        return self.log_mm is not None and bool(self.features & bit(VHOST_F_LOG_ALL))

    def _maybe_sync_log(self) -> None:
        if self._logging() and time.monotonic() - self._last_sync >= LOG_SYNC_S:
            self.sync_log()

    def sync_log(self) -> None:
        if self.shadow is not None:
            self._sync_log_from(self.shadow)

    def _sync_log_from(self, shadow: ShadowSession) -> None:
        """Move the relay's marks into the frontend's log."""
        self._last_sync = time.monotonic()
        if shadow.dirty is None:
            return
        bits = shadow.dirty.harvest()  # atomic against the relay's marks: nothing is lost
        if not self._logging() or not any(bits):
            return  # no log to write into: nobody asked for these pages
        if FAULT_DROP_DIRTY_PAGES:
            if not self._fault_said:
                log.warning("%s: FAULT INJECTED (%s): the device's dirty pages are left out of the log",
                            self.summary.peer, FAULT_ENV)
                self._fault_said = True
            return
        assert self.log_mm is not None
        self.summary.log_syncs += 1
        n = min(len(bits), len(self.log_mm))
        or_into(memoryview(self.log_mm), bits[:n])
        if any(bits[n:]):
            log.error("%s: dirty pages beyond the frontend's log of %d bytes", self.summary.peer, len(self.log_mm))

    # -- teardown -----------------------------------------------------------------------------
    def close(self) -> None:
        """Reset the device, unmap the frontend's memory and log, close every fd it sent."""
        try:
            self._stop_relay()
        except Exception as e:  # noqa: BLE001 - teardown goes on; the reason is logged
            log.error("%s: stopping the relay: %s", self.summary.peer, e)
        for i, counters in self.stats.items():
            self.summary.queues[i] = dict(counters)
        for q in self.queues:
            for fd in q.fds():
                _close_quietly(fd)
            q.kick_fd = q.call_fd = q.err_fd = None
        if self.mem is not None:
            self.mem.close()
            self.mem = None
        if self.log_mem is not None:
            self.log_mem.close()
            self.log_mem = self.log_mm = None
        self.sock.close()


# Fault injection, for tests only (tests/migration/: a migration with it set must fail): the device's
# marks are harvested and thrown away, the frontend's log stays empty. With paced traffic the
# destination then misses pages the device wrote (at full rate the guest rewrites them itself first).
FAULT_ENV = "VDPA_SVQ_FAULT_DROP_DIRTY_PAGES"
FAULT_DROP_DIRTY_PAGES = os.environ.get(FAULT_ENV, "") not in ("", "0")


LOG_CHUNK = 4096  # bytes of log (128 MiB of guest memory) ORed at once


def or_into(log_view: memoryview, bits: bytes) -> None:
    """log |= bits, chunk by chunk, skipping clean chunks. Not atomic against the frontend clearing
    bits as it syncs: a race can only leave a page marked that it just cleared (sent once more),
    never lose one, since nobody but us sets bits in this log."""
    for start in range(0, len(bits), LOG_CHUNK):
        chunk = bits[start : start + LOG_CHUNK]
        if not any(chunk):
            continue
        end = start + len(chunk)
        merged = int.from_bytes(log_view[start:end], "little") | int.from_bytes(chunk, "little")
        log_view[start:end] = merged.to_bytes(len(chunk), "little")


def _close_quietly(fd: int) -> None:
    with contextlib.suppress(OSError):
        os.close(fd)


BACKOFF_WARN_AFTER = 5  # quick failures in a row before the back-off is logged (once per streak)
SUN_PATH_MAX = 108  # struct sockaddr_un's sun_path, the terminating NUL included


class Server:
    """Listen on `path`; serve one frontend connection at a time until stop() is called."""

    def __init__(self, device: Device, path: str, *, impl: str = "auto", poll_us: Polling = 0,
                 relay_cpus: Sequence[int] = (), relay_threads: int | None = None,
                 accept_backoff: bool = True) -> None:
        """accept_backoff: wait before accepting again after frontends that gave up at once (backoff.py).
        relay_cpus / relay_threads: the queue pairs' relay threads, how many and pinned where (ShadowSession)."""
        try:
            check_polling(poll_us)
        except ValueError:
            raise BackendError(f"poll time must be >= 0 microseconds or {ADAPTIVE!r}, not {poll_us!r}") from None
        self.session = DeviceSession(device)
        self.path = path
        self.impl = impl
        self.poll_us = poll_us
        self.relay_cpus = list(relay_cpus)
        self.relay_threads = relay_threads
        # The last KEPT_SUMMARIES connections: a server runs for months, and every frontend that
        # connects (or an attacker connecting in a loop) must not grow it.
        self.summaries: deque[ConnectionSummary] = deque(maxlen=KEPT_SUMMARIES)
        self.connections = 0  # every connection served
        self.failed = 0  # of which closed with an error
        self.backoff = AcceptBackoff() if accept_backoff else None
        self._stop = threading.Event()
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        # The path appears only once it accepts connections: bound and listening under a name of
        # its own, then renamed into place (atomically, over a stale socket of a previous run). A
        # frontend that connects as soon as the path exists is never refused.
        # (A path too long for a suffix within sun_path's 108 bytes is bound in place, as before.)
        pending = f"{path}.{os.getpid()}.pending"
        if len(os.fsencode(pending)) >= SUN_PATH_MAX:
            pending = path
        try:
            if os.path.isdir(path):
                raise IsADirectoryError(errno.EISDIR, "is a directory")
            with contextlib.suppress(FileNotFoundError):
                os.unlink(pending)  # a stale socket of a previous run, when bound in place
            self.listener.bind(pending)
            self.listener.listen(1)
            if pending != path:
                os.rename(pending, path)
        except OSError as e:
            self.listener.close()
            with contextlib.suppress(OSError):
                os.unlink(pending)
            raise BackendError(f"{path}: cannot listen on this socket path: {(e.strerror or str(e)).lower()}") from None
        except BaseException:
            self.listener.close()
            with contextlib.suppress(OSError):
                os.unlink(pending)
            raise

    def serve_forever(self, on_connection: Any = None) -> deque[ConnectionSummary]:
        n = 0
        device = self.session.device
        hangup = device.hangup_fd()
        watched = [self.listener] if hangup is None else [self.listener, hangup]
        try:
            while not self._stop.is_set():
                ready, _, _ = select.select(watched, [], [], POLL_S)
                if hangup in ready:
                    try:
                        device.check_alive()
                    except OSError as e:
                        raise BackendError(f"{e}: no device to serve frontends with any more") from None
                if self.listener not in ready:
                    continue
                sock, _ = self.listener.accept()
                n += 1
                began = time.monotonic()
                summary = self.serve_connection(sock, peer=f"connection {n}")
                if on_connection is not None:
                    on_connection(summary)
                if self.backoff is not None:
                    self._back_off(relayed=summary.started > 0, duration_s=time.monotonic() - began)
        finally:
            self.listener.close()
            with contextlib.suppress(OSError):
                os.unlink(self.path)
        return self.summaries

    def _back_off(self, *, relayed: bool, duration_s: float) -> None:
        assert self.backoff is not None
        delay = self.backoff.after(relayed=relayed, duration_s=duration_s)
        if self.backoff.failures_in_a_row == BACKOFF_WARN_AFTER:
            log.warning("%d frontends in a row gave up at once: waiting up to %.0f s before each next connection "
                        "until one relays", BACKOFF_WARN_AFTER, BACKOFF_MAX_S)
        self._stop.wait(delay)  # stop() still ends the wait at once

    def serve_connection(self, sock: socket.socket, *, peer: str = "frontend") -> ConnectionSummary:
        log.info("%s: frontend connected", peer)
        summary = Connection(self.session, sock, impl=self.impl, peer=peer, poll_us=self.poll_us,
                             relay_cpus=self.relay_cpus, relay_threads=self.relay_threads).serve(self._stop)
        self.summaries.append(summary)
        self.connections += 1
        self.failed += summary.error is not None
        return summary

    def stop(self) -> None:
        self._stop.set()
