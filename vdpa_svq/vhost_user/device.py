"""A vhost-user backend (DPDK's vhost PMD, a vhost-user-blk daemon, ...) driven as the device.

`vdpa-svq serve vhost-user:PATH` and `attach vhost-user:PATH` put the shadow virtqueues in front of
a vhost-user backend instead of a vhost-vdpa node: the backend only ever sees rings vdpa-svq owns,
and vdpa-svq logs every page it writes, also for backends that keep no dirty log of their own.

VhostUserDevice implements vdpa_svq.device.Device and speaks the frontend side of the
protocol over the socket. What vhost-vdpa has and vhost-user lacks is emulated here:
- IOTLB: every update names memory of this process (GuestMemory regions, found by address with
  memory.guest.backing); the maps become the memory table, sent whole (SET_MEM_TABLE) after each
  update or batch, with guest_phys_addr = userspace_addr = IOVA. Ring addresses are IOVAs too.
  vhost-user has no access rights: the backend may write anywhere it is mapped.
- VIRTIO_F_ACCESS_PLATFORM is offered to the session (addresses are IOVAs through that table) and
  never sent to the backend, which sees those IOVAs as its guest-physical addresses.
- Status: kept here; DRIVER_OK is when the backend has everything; reset stops each ring with
  GET_VRING_BASE (as QEMU does), after which the backend may be configured again.
- No SUSPEND (GET_VRING_BASE stops a ring for good), no config space, no device id: `kind` says
  what the backend is (net by default). No queue groups, address spaces or per-queue sizes.
- The backend can go away: hangup_fd() is its socket.
"""

from __future__ import annotations

import array
import contextlib
import errno
import socket
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from kernel_iface import IovaRange, NotSupported, VdpaError, uapi
from kernel_iface.uapi import bit
from vdpa_svq.memory.guest import backing
from vdpa_svq.vhost_user import messages as m
from vdpa_svq.vhost_user.messages import (
    FLAG_NEED_REPLY,
    HEADER,
    VHOST_USER_F_PROTOCOL_FEATURES,
    ProtocolFeature,
    Request,
)

KINDS = {"net": uapi.VIRTIO_ID_NET, "blk": uapi.VIRTIO_ID_BLOCK}
MAX_QUEUE_SIZE = 32768  # vhost-user cannot ask: the virtio maximum, as QEMU's vhost-user does
REPLY_TIMEOUT_S = 10.0
# Protocol features we use when the backend offers them.
WANTED_PROTOCOL = (ProtocolFeature.REPLY_ACK, ProtocolFeature.MQ)


@dataclass
class _Map:
    iova: int
    size: int
    fd: int
    offset: int


class VhostUserDevice:
    """A connected vhost-user backend as a vdpa_svq.device.Device. `VhostUserDevice.connect(path)`."""

    def __init__(self, sock: socket.socket, path: str, kind: str = "net") -> None:
        if kind not in KINDS:
            raise ValueError(f"vhost-user device kind must be one of {', '.join(KINDS)}, not {kind!r}")
        self.sock = sock
        self.path = f"vhost-user:{path}"
        self.kind = kind
        self.sock.settimeout(REPLY_TIMEOUT_S)
        self._maps: list[_Map] = []
        self._batching = False
        self._status = 0
        self._backend_features = 0
        self._protocol = 0
        self._features = 0
        self._offered: int | None = None
        self._nums: dict[int, int] = {}
        self._started: set[int] = set()  # rings the backend may be running: GET_VRING_BASE stops them
        self._table_sent = False

    @classmethod
    def connect(cls, path: str, kind: str = "net") -> VhostUserDevice:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.connect(path)
        except OSError as e:
            sock.close()
            raise VdpaError(e.errno or errno.EIO, f"vhost-user:{path}", "connect",
                            f"no vhost-user backend listens there ({(e.strerror or str(e)).lower()})") from None
        return cls(sock, path, kind)

    # -- the wire ---------------------------------------------------------------------------------
    def _fail(self, op: str, cause: str, err: int = errno.EIO) -> VdpaError:
        return VdpaError(err, self.path, op, cause)

    def _send(self, request: Request, payload: bytes = b"", fds: list[int] | None = None, *,
              ack: bool = False) -> None:
        ack = ack and bool(self._protocol & bit(ProtocolFeature.REPLY_ACK))
        data = m.encode(request, payload, flags=FLAG_NEED_REPLY if ack else 0)
        anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())] if fds else []
        try:
            self.sock.sendmsg([data], anc)
        except OSError as e:
            raise self._fail(request.name, f"the backend hung up ({(e.strerror or str(e)).lower()})") from None
        if ack and self._u64_reply(request) != 0:
            raise self._fail(request.name, "the backend refused it (REPLY_ACK non-zero)", errno.EINVAL)

    def _reply(self, request: Request) -> bytes:
        head = self._recv_exact(HEADER.size, request)
        req, flags, size = HEADER.unpack(head)
        if req != request or not flags & m.FLAG_REPLY or size > m.MAX_PAYLOAD:
            raise self._fail(request.name, f"bad reply (request {req}, flags {flags:#x}, {size} bytes)", errno.EPROTO)
        return self._recv_exact(size, request)

    def _recv_exact(self, n: int, request: Request) -> bytes:
        buf = b""
        try:
            while len(buf) < n:
                chunk = self.sock.recv(n - len(buf))
                if not chunk:
                    raise self._fail(request.name, "the backend hung up")
                buf += chunk
        except TimeoutError:
            raise self._fail(request.name, f"no reply within {REPLY_TIMEOUT_S:g} s", errno.ETIMEDOUT) from None
        return buf

    def _u64_reply(self, request: Request) -> int:
        body = self._reply(request)
        if len(body) != m.U64.size:
            raise self._fail(request.name, f"reply of {len(body)} bytes, expected 8", errno.EPROTO)
        return m.U64.unpack(body)[0]

    def _get_u64(self, request: Request) -> int:
        self._send(request)
        return self._u64_reply(request)

    # -- lifecycle and features -----------------------------------------------------------------------
    def fileno(self) -> int:
        return self.sock.fileno()

    @property
    def closed(self) -> bool:
        return self.sock.fileno() < 0

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> VhostUserDevice:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def hangup_fd(self) -> int | None:
        """Readable once the backend is gone: it never speaks first on this socket, so anything
        readable is its end of file (or a protocol breach, which ends it as well)."""
        return self.sock.fileno()

    def check_alive(self) -> None:
        """Raise if the backend hung up (call when hangup_fd() is readable)."""
        try:
            data = self.sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT)
        except BlockingIOError:
            return
        except OSError as e:
            raise self._fail("connection", f"the backend's socket failed ({(e.strerror or str(e)).lower()})") from None
        raise self._fail("connection", "the backend hung up" if not data else "the backend spoke unasked")

    def set_owner(self) -> None:
        offered = self._backend_offered()
        if offered & bit(VHOST_USER_F_PROTOCOL_FEATURES):
            theirs = self._get_u64(Request.GET_PROTOCOL_FEATURES)
            self._protocol = theirs & sum(bit(f) for f in WANTED_PROTOCOL)
            self._send(Request.SET_PROTOCOL_FEATURES, m.U64.pack(self._protocol))
        self._send(Request.SET_OWNER)

    def reset_owner(self) -> None:
        self._send(Request.RESET_OWNER)

    def _backend_offered(self) -> int:
        if self._offered is None:
            self._offered = self._get_u64(Request.GET_FEATURES)
        return self._offered

    def get_features(self) -> int:
        """The backend's virtio features, plus ACCESS_PLATFORM (emulated), minus vhost-user's own bits."""
        own = bit(VHOST_USER_F_PROTOCOL_FEATURES) | bit(m.VHOST_F_LOG_ALL)
        return (self._backend_offered() & ~own) | bit(uapi.VIRTIO_F_ACCESS_PLATFORM)

    def set_features(self, features: int) -> None:
        self._features = features
        wire = features & ~bit(uapi.VIRTIO_F_ACCESS_PLATFORM)
        wire |= self._backend_offered() & bit(VHOST_USER_F_PROTOCOL_FEATURES)
        self._send(Request.SET_FEATURES, m.U64.pack(wire), ack=True)

    def get_backend_features(self) -> int:
        return bit(uapi.VHOST_BACKEND_F_IOTLB_MSG_V2) | bit(uapi.VHOST_BACKEND_F_IOTLB_BATCH)

    def set_backend_features(self, features: int) -> None:
        self._backend_features = features

    def has_backend_feature(self, b: int) -> bool:
        return bool(self._backend_features & bit(b))

    def device_id(self) -> int:
        return KINDS[self.kind]

    def get_status(self) -> int:
        return self._status

    def set_status(self, status: int) -> None:
        if status == 0:
            self._stop_rings()
        elif status & uapi.VIRTIO_CONFIG_S_DRIVER_OK and not self._table_sent:
            self._send_table()  # the backend starts a ring once it has memory to find it in
        self._status = status

    def _stop_rings(self) -> None:
        for index in sorted(self._started):
            self._send(Request.GET_VRING_BASE, m.VringState(index, 0).encode())
            self._reply(Request.GET_VRING_BASE)
        self._started.clear()

    def config_size(self) -> int:
        return 0

    def get_config(self, offset: int = 0, length: int | None = None) -> bytes:
        raise NotSupported(errno.ENOTSUP, self.path, "GET_CONFIG", "vdpa-svq reads no config over vhost-user")

    def set_config(self, offset: int, data: bytes) -> None:
        raise NotSupported(errno.ENOTSUP, self.path, "SET_CONFIG", "vdpa-svq writes no config over vhost-user")

    def vqs_count(self) -> int:
        if self._protocol & bit(ProtocolFeature.MQ):
            return self._get_u64(Request.GET_QUEUE_NUM) * (2 if self.kind == "net" else 1)
        return 2 if self.kind == "net" else 1

    def suspend(self) -> None:
        raise NotSupported(errno.ENOTSUP, self.path, "SUSPEND", "a vhost-user backend cannot suspend")

    def resume(self) -> None:
        raise NotSupported(errno.ENOTSUP, self.path, "RESUME", "a vhost-user backend cannot resume")

    def inline_kick(self, index: int) -> Callable[[], None] | None:
        """None: the backend learns of a kick through the queue's kick eventfd only."""
        return None

    def faults(self) -> dict[int, str]:
        """NotSupported: a vhost-user backend reports its faults in its own log."""
        raise self._not_asked("faults")

    def activity(self) -> list[str]:
        """NotSupported: vhost-user has no request for a backend's counters."""
        raise self._not_asked("activity")

    # -- what vhost-user cannot ask ----------------------------------------------------------------
    def _not_asked(self, op: str) -> NotSupported:
        return NotSupported(errno.ENOTSUP, self.path, op, "vhost-user has no such request")

    def vring_size(self, index: int) -> int:
        raise self._not_asked("GET_VRING_SIZE")

    def as_num(self) -> int:
        raise self._not_asked("GET_AS_NUM")

    def group_num(self) -> int:
        raise self._not_asked("GET_GROUP_NUM")

    def vring_group(self, index: int) -> int:
        raise self._not_asked("GET_VRING_GROUP")

    # -- memory: the IOTLB as a memory table -------------------------------------------------------
    def iova_range(self) -> IovaRange:
        return IovaRange(0, (1 << 64) - 1)

    def iotlb_update(self, iova: int, size: int, uaddr: int, perm: int = uapi.VHOST_ACCESS_RW, asid: int = 0) -> None:
        """Map [iova, iova + size) to `uaddr`, an address of this process inside a GuestMemory region."""
        if asid:
            raise NotSupported(errno.EINVAL, self.path, "IOTLB_UPDATE", "vhost-user has one address space")
        if any(mp.iova < iova + size and iova < mp.iova + mp.size for mp in self._maps):
            raise self._fail("IOTLB_UPDATE", f"[{iova:#x}, +{size:#x}) overlaps a mapping", errno.EEXIST)
        fd, offset = backing(uaddr, size)
        self._maps.append(_Map(iova, size, fd, offset))
        if not self._batching:
            self._send_table()

    def iotlb_invalidate(self, iova: int, size: int, asid: int = 0) -> None:
        self._maps = [mp for mp in self._maps if not (iova <= mp.iova and mp.iova + mp.size <= iova + size)]
        if not self._batching and self._table_sent:
            self._send_table()

    @contextlib.contextmanager
    def iotlb_batch(self, asid: int = 0) -> Iterator[None]:
        self._batching = True
        try:
            yield
        finally:
            self._batching = False
        self._send_table()

    def _regions(self) -> list[_Map]:
        """The maps, neighbours in both IOVA and file merged (a shadow ring's areas are one memfd)."""
        out: list[_Map] = []
        for mp in sorted(self._maps, key=lambda x: x.iova):
            last = out[-1] if out else None
            if last and last.fd == mp.fd and last.iova + last.size == mp.iova and last.offset + last.size == mp.offset:
                last.size += mp.size
            else:
                out.append(_Map(mp.iova, mp.size, mp.fd, mp.offset))
        return out

    def _send_table(self) -> None:
        regions = self._regions()
        if not regions:
            self._table_sent = False  # nothing to map: the next table replaces whatever the backend has
            return
        if len(regions) > m.MAX_REGIONS:
            raise self._fail("SET_MEM_TABLE", f"{len(regions)} memory regions, vhost-user carries at most "
                             f"{m.MAX_REGIONS}", errno.E2BIG)
        table = m.MemTable(tuple(m.MemRegion(r.iova, r.size, r.iova, r.offset) for r in regions))
        self._send(Request.SET_MEM_TABLE, table.encode(), [r.fd for r in regions], ack=True)
        self._table_sent = True

    # -- vrings ---------------------------------------------------------------------------------------
    def vring_num(self) -> int:
        return MAX_QUEUE_SIZE

    def set_vring_num(self, index: int, num: int) -> None:
        self._nums[index] = num
        self._send(Request.SET_VRING_NUM, m.VringState(index, num).encode())

    def set_vring_addr(self, index: int, desc: int, avail: int, used: int, *, flags: int = 0) -> None:
        """IOVAs of the three areas (for packed rings avail/used are the driver/device event areas)."""
        addr = m.VringAddr(index, flags, desc, used, avail, 0)
        self._send(Request.SET_VRING_ADDR, addr.encode(), ack=True)

    def set_vring_base(self, index: int, num: int) -> None:
        self._send(Request.SET_VRING_BASE, m.VringState(index, num).encode())

    def get_vring_base(self, index: int) -> int:
        raise NotSupported(errno.ENOTSUP, self.path, "GET_VRING_BASE",
                           "over vhost-user it stops the ring for good; vdpa-svq uses it only to reset")

    def _vring_fd(self, request: Request, index: int, fd: int) -> None:
        if fd < 0:
            self._send(request, m.U64.pack(index | m.VRING_NOFD_MASK))
        else:
            self._send(request, m.U64.pack(index), [fd])

    def set_vring_kick(self, index: int, fd: int) -> None:
        self._vring_fd(Request.SET_VRING_KICK, index, fd)
        if fd >= 0:
            self._started.add(index)

    def set_vring_call(self, index: int, fd: int) -> None:
        self._vring_fd(Request.SET_VRING_CALL, index, fd)

    def set_vring_err(self, index: int, fd: int) -> None:
        self._vring_fd(Request.SET_VRING_ERR, index, fd)

    def set_vring_enable(self, index: int, enable: bool = True) -> None:
        if self._backend_offered() & bit(VHOST_USER_F_PROTOCOL_FEATURES):
            self._send(Request.SET_VRING_ENABLE, m.VringState(index, int(enable)).encode(), ack=True)

    def __repr__(self) -> str:
        return f"VhostUserDevice({self.path!r}, kind={self.kind!r})"


def is_vhost_user(spec: str) -> bool:
    return spec.startswith("vhost-user:")


def open_vhost_user(spec: str) -> VhostUserDevice:
    """`vhost-user:PATH` or `vhost-user:PATH,kind=blk`."""
    rest = spec[len("vhost-user:"):]
    path, _, opts = rest.partition(",")
    kind = "net"
    for opt in filter(None, opts.split(",")):
        key, _, value = opt.partition("=")
        if key != "kind" or value not in KINDS:
            raise ValueError(f"{spec}: unknown option {opt!r} (only kind={'|'.join(KINDS)})")
        kind = value
    if not path:
        raise ValueError(f"{spec}: no socket path after vhost-user:")
    return VhostUserDevice.connect(path, kind)
