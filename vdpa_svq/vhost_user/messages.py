"""vhost-user messages: the header, the payload structs, and one table row per request.

Security model: do not assume received fields are sane. Every message comes from a frontend we
do not trust; decode() checks the header, the payload size against the request's struct, every
count and index, and the number of file descriptors, and raises ProtocolError (which closes the
connection) before anything acts on it.

Wire format (docs/interop/vhost-user.rst): a 12-byte header, `request` le32, `flags` le32,
`size` le32, then `size` bytes of payload; file descriptors ride along as SCM_RIGHTS.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from enum import IntEnum
from typing import TypeVar

from vdpa_svq.errors import VdpaSvqError

HEADER = struct.Struct("<III")  # request, flags, size
VERSION = 0x1  # flags bits 0-1
VERSION_MASK = 0x3
FLAG_REPLY = 1 << 2
FLAG_NEED_REPLY = 1 << 3
KNOWN_FLAGS = VERSION_MASK | FLAG_REPLY | FLAG_NEED_REPLY

MAX_FDS = 8  # VHOST_MEMORY_BASELINE_NREGIONS: at most one fd per memory region
MAX_REGIONS = 8
MAX_CONFIG = 256  # VHOST_USER_MAX_CONFIG_SIZE
VRING_IDX_MASK = 0xFF  # SET_VRING_KICK/CALL/ERR: u64 bits 0-7 are the queue index,
VRING_NOFD_MASK = 1 << 8  # bit 8 set: no fd sent (polling mode / no notifier)


class ProtocolError(VdpaSvqError):
    """A message that breaks the protocol; the connection that sent it is closed."""


class Request(IntEnum):
    GET_FEATURES = 1
    SET_FEATURES = 2
    SET_OWNER = 3
    RESET_OWNER = 4
    SET_MEM_TABLE = 5
    SET_LOG_BASE = 6
    SET_LOG_FD = 7
    SET_VRING_NUM = 8
    SET_VRING_ADDR = 9
    SET_VRING_BASE = 10
    GET_VRING_BASE = 11
    SET_VRING_KICK = 12
    SET_VRING_CALL = 13
    SET_VRING_ERR = 14
    GET_PROTOCOL_FEATURES = 15
    SET_PROTOCOL_FEATURES = 16
    GET_QUEUE_NUM = 17
    SET_VRING_ENABLE = 18
    SEND_RARP = 19
    NET_SET_MTU = 20
    GET_CONFIG = 24
    SET_CONFIG = 25
    SET_STATUS = 39
    GET_STATUS = 40


class ProtocolFeature(IntEnum):
    MQ = 0
    LOG_SHMFD = 1
    RARP = 2
    REPLY_ACK = 3
    MTU = 4
    BACKEND_REQ = 5
    CROSS_ENDIAN = 6
    CONFIG = 9
    STATUS = 16


VHOST_USER_F_PROTOCOL_FEATURES = 30  # a virtio feature bit, only meaningful over vhost-user
VHOST_F_LOG_ALL = 26


# -- payload structs --------------------------------------------------------------------------------
U64 = struct.Struct("<Q")


@dataclass(frozen=True)
class VringState:
    """struct vhost_vring_state { unsigned int index; unsigned int num; }"""

    index: int
    num: int
    STRUCT = struct.Struct("<II")

    def encode(self) -> bytes:
        return self.STRUCT.pack(self.index, self.num)


@dataclass(frozen=True)
class VringAddr:
    """struct vhost_vring_addr { unsigned int index, flags; u64 desc_user_addr, used_user_addr,
    avail_user_addr, log_guest_addr; } — ring addresses in the frontend's *user* address space;
    log_guest_addr is guest-physical."""

    index: int
    flags: int
    desc: int
    used: int
    avail: int
    log: int
    STRUCT = struct.Struct("<IIQQQQ")

    def encode(self) -> bytes:
        return self.STRUCT.pack(self.index, self.flags, self.desc, self.used, self.avail, self.log)


@dataclass(frozen=True)
class MemRegion:
    """VhostUserMemoryRegion { u64 guest_phys_addr, memory_size, userspace_addr, mmap_offset; }"""

    gpa: int
    size: int
    uaddr: int
    mmap_offset: int
    STRUCT = struct.Struct("<QQQQ")

    def encode(self) -> bytes:
        return self.STRUCT.pack(self.gpa, self.size, self.uaddr, self.mmap_offset)


@dataclass(frozen=True)
class MemTable:
    """VhostUserMemory { u32 nregions; u32 padding; VhostUserMemoryRegion regions[8]; }"""

    regions: tuple[MemRegion, ...]
    HEAD = struct.Struct("<II")

    def encode(self) -> bytes:
        return self.HEAD.pack(len(self.regions), 0) + b"".join(r.encode() for r in self.regions)


@dataclass(frozen=True)
class LogArea:
    """VhostUserLog { u64 mmap_size; u64 mmap_offset; }"""

    mmap_size: int
    mmap_offset: int
    STRUCT = struct.Struct("<QQ")

    def encode(self) -> bytes:
        return self.STRUCT.pack(self.mmap_size, self.mmap_offset)


@dataclass(frozen=True)
class Config:
    """VhostUserConfig { u32 offset; u32 size; u32 flags; u8 region[size]; }"""

    offset: int
    size: int
    flags: int
    data: bytes
    HEAD = struct.Struct("<III")

    def encode(self) -> bytes:
        return self.HEAD.pack(self.offset, self.size, self.flags) + self.data


Payload = int | VringState | VringAddr | MemTable | LogArea | Config | None
P = TypeVar("P", int, VringState, VringAddr, MemTable, LogArea, Config)


def payload_as(request: Request, payload: Payload, kind: type[P]) -> P:
    """`payload` as the `kind` its table row decodes, else ProtocolError: a real check (not an
    assert, which python -O strips) that a handler gets the shape it reads."""
    if not isinstance(payload, kind):
        raise ProtocolError(f"{request.name}: payload is {type(payload).__name__}, not {kind.__name__}")
    return payload


def _need(request: Request, body: bytes, size: int) -> None:
    if len(body) < size:
        raise ProtocolError(f"{request.name}: payload of {len(body)} bytes, needs {size}")


def _decode_u64(request: Request, body: bytes) -> int:
    _need(request, body, U64.size)
    return U64.unpack_from(body)[0]


def _decode_state(request: Request, body: bytes) -> VringState:
    _need(request, body, VringState.STRUCT.size)
    return VringState(*VringState.STRUCT.unpack_from(body))


def _decode_addr(request: Request, body: bytes) -> VringAddr:
    _need(request, body, VringAddr.STRUCT.size)
    return VringAddr(*VringAddr.STRUCT.unpack_from(body))


def _decode_mem(request: Request, body: bytes) -> MemTable:
    _need(request, body, MemTable.HEAD.size)
    n, _ = MemTable.HEAD.unpack_from(body)
    if not 1 <= n <= MAX_REGIONS:
        raise ProtocolError(f"{request.name}: {n} memory regions (1..{MAX_REGIONS})")
    _need(request, body, MemTable.HEAD.size + n * MemRegion.STRUCT.size)
    regions = []
    for i in range(n):
        r = MemRegion(*MemRegion.STRUCT.unpack_from(body, MemTable.HEAD.size + i * MemRegion.STRUCT.size))
        if r.size == 0 or r.gpa + r.size > 1 << 64 or r.uaddr + r.size > 1 << 64:
            raise ProtocolError(f"{request.name}: region {i} empty or wraps the address space")
        regions.append(r)
    spans = sorted((r.gpa, r.gpa + r.size) for r in regions)
    for (_, end), (start, _) in zip(spans, spans[1:], strict=False):
        if start < end:
            raise ProtocolError(f"{request.name}: guest-physical ranges overlap at {start:#x}")
    return MemTable(tuple(regions))


def _decode_log(request: Request, body: bytes) -> LogArea:
    _need(request, body, LogArea.STRUCT.size)
    area = LogArea(*LogArea.STRUCT.unpack_from(body))
    if area.mmap_size == 0 or area.mmap_size > 1 << 40:
        raise ProtocolError(f"{request.name}: log of {area.mmap_size} bytes")
    return area


def _decode_config(request: Request, body: bytes) -> Config:
    _need(request, body, Config.HEAD.size)
    offset, size, flags = Config.HEAD.unpack_from(body)
    if size > MAX_CONFIG or offset + size > MAX_CONFIG:
        raise ProtocolError(f"{request.name}: config range {offset}+{size} beyond {MAX_CONFIG} bytes")
    # GET_CONFIG carries a buffer of `size` bytes to fill (contents unused); SET_CONFIG the data.
    _need(request, body, Config.HEAD.size + size)
    return Config(offset, size, flags, bytes(body[Config.HEAD.size : Config.HEAD.size + size]))


@dataclass(frozen=True)
class Shape:
    """How a payload looks: its name, the largest size accepted, and its decoder."""

    name: str
    max_size: int
    decode: object  # Callable[[Request, bytes], Payload] | None

    def parse(self, request: Request, body: bytes) -> Payload:
        if len(body) > self.max_size:
            raise ProtocolError(
                f"{request.name}: payload of {len(body)} bytes, at most {self.max_size} for {self.name}"
            )
        return None if self.decode is None else self.decode(request, body)  # type: ignore[operator]


NONE = Shape("no payload", 0, None)
# Some frontends send an 8-byte payload with requests that carry none (QEMU's RESET_OWNER, GET_*):
# tolerated and ignored.
IGNORED_U64 = Shape("no payload (u64 ignored)", U64.size, None)
U64_SHAPE = Shape("u64", U64.size, _decode_u64)
STATE = Shape("vring state", VringState.STRUCT.size, _decode_state)
ADDR = Shape("vring address", VringAddr.STRUCT.size, _decode_addr)
MEM = Shape("memory table", MemTable.HEAD.size + MAX_REGIONS * MemRegion.STRUCT.size, _decode_mem)
LOG = Shape("log area", LogArea.STRUCT.size, _decode_log)
CONFIG = Shape("config", Config.HEAD.size + MAX_CONFIG, _decode_config)


@dataclass(frozen=True)
class Spec:
    """One row of the message table."""

    shape: Shape
    fds: str  # "none", "one" (exactly one), "vring" (one unless the u64's NOFD bit), "regions" (one per region)
    reply: bool  # the backend always answers (GET_*); others answer only with REPLY_ACK + NEED_REPLY


# request -> (payload, fds accepted, always replies). The dispatcher in backend.py has one handler per row.
MESSAGES: dict[Request, Spec] = {
    Request.GET_FEATURES: Spec(IGNORED_U64, "none", True),
    Request.SET_FEATURES: Spec(U64_SHAPE, "none", False),
    Request.SET_OWNER: Spec(IGNORED_U64, "none", False),
    Request.RESET_OWNER: Spec(IGNORED_U64, "none", False),
    Request.SET_MEM_TABLE: Spec(MEM, "regions", False),
    Request.SET_LOG_BASE: Spec(LOG, "one", True),
    Request.SET_LOG_FD: Spec(IGNORED_U64, "one", False),
    Request.SET_VRING_NUM: Spec(STATE, "none", False),
    Request.SET_VRING_ADDR: Spec(ADDR, "none", False),
    Request.SET_VRING_BASE: Spec(STATE, "none", False),
    Request.GET_VRING_BASE: Spec(STATE, "none", True),
    Request.SET_VRING_KICK: Spec(U64_SHAPE, "vring", False),
    Request.SET_VRING_CALL: Spec(U64_SHAPE, "vring", False),
    Request.SET_VRING_ERR: Spec(U64_SHAPE, "vring", False),
    Request.GET_PROTOCOL_FEATURES: Spec(IGNORED_U64, "none", True),
    Request.SET_PROTOCOL_FEATURES: Spec(U64_SHAPE, "none", False),
    Request.GET_QUEUE_NUM: Spec(IGNORED_U64, "none", True),
    Request.SET_VRING_ENABLE: Spec(STATE, "none", False),
    Request.SEND_RARP: Spec(U64_SHAPE, "none", False),
    Request.NET_SET_MTU: Spec(U64_SHAPE, "none", False),
    Request.GET_CONFIG: Spec(CONFIG, "none", True),
    Request.SET_CONFIG: Spec(CONFIG, "none", False),
    Request.SET_STATUS: Spec(U64_SHAPE, "none", False),
    Request.GET_STATUS: Spec(IGNORED_U64, "none", True),
}

MAX_PAYLOAD = max(spec.shape.max_size for spec in MESSAGES.values())


@dataclass
class Message:
    request: Request
    flags: int
    payload: Payload
    fds: list[int]

    @property
    def need_reply(self) -> bool:
        return bool(self.flags & FLAG_NEED_REPLY)

    def payload_as(self, kind: type[P]) -> P:
        """The payload as `kind` (ProtocolError if it is not: see the module function)."""
        return payload_as(self.request, self.payload, kind)


def decode_header(data: bytes) -> tuple[int, int, int]:
    """(request, flags, size) of a header, checked: version 1, known flags, size within MAX_PAYLOAD."""
    if len(data) != HEADER.size:
        raise ProtocolError(f"header of {len(data)} bytes, needs {HEADER.size} (truncated)")
    request, flags, size = HEADER.unpack(data)
    if flags & VERSION_MASK != VERSION:
        raise ProtocolError(f"request {request}: protocol version {flags & VERSION_MASK}, only {VERSION} is spoken")
    if flags & ~KNOWN_FLAGS:
        raise ProtocolError(f"request {request}: unknown flags {flags & ~KNOWN_FLAGS:#x}")
    if flags & FLAG_REPLY:
        raise ProtocolError(f"request {request}: a reply sent to the backend")
    if size > MAX_PAYLOAD:
        raise ProtocolError(f"request {request}: payload of {size} bytes, at most {MAX_PAYLOAD}")
    return request, flags, size


def _check_fds(request: Request, spec: Spec, payload: Payload, fds: list[int]) -> None:
    if spec.fds == "none":
        want = 0
    elif spec.fds == "one":
        want = 1
    elif spec.fds == "vring":
        payload = payload_as(request, payload, int)
        if payload & ~(VRING_IDX_MASK | VRING_NOFD_MASK):
            raise ProtocolError(f"{request.name}: unknown bits in {payload:#x}")
        want = 0 if payload & VRING_NOFD_MASK else 1
    else:
        want = len(payload_as(request, payload, MemTable).regions)
    if len(fds) != want:
        raise ProtocolError(f"{request.name}: {len(fds)} file descriptors, needs {want}")


def decode(request_id: int, flags: int, body: bytes, fds: list[int]) -> Message:
    """The message, every field checked; ProtocolError if anything is off (the fds stay the caller's)."""
    try:
        request = Request(request_id)
    except ValueError:
        raise ProtocolError(f"unknown request {request_id}") from None
    spec = MESSAGES[request]
    payload = spec.shape.parse(request, body)
    _check_fds(request, spec, payload, fds)
    return Message(request, flags, payload, fds)


def encode(request: int, payload: bytes = b"", *, flags: int = 0) -> bytes:
    """A message on the wire: header (version 1 plus `flags`) and payload."""
    return HEADER.pack(int(request), VERSION | flags, len(payload)) + payload


def encode_reply(request: Request, payload: bytes) -> bytes:
    return encode(request, payload, flags=FLAG_REPLY)
