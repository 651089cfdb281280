"""vhost-user message decoding: every field checked before anything acts on it."""

from __future__ import annotations

import pytest

from vdpa_svq.vhost_user import messages as m
from vdpa_svq.vhost_user.messages import MESSAGES, ProtocolError, Request


def header(request: int, size: int, flags: int = m.VERSION) -> bytes:
    return m.HEADER.pack(request, flags, size)


def region(gpa: int = 0x100000, size: int = 0x10000, uaddr: int = 0x7F0000100000) -> m.MemRegion:
    return m.MemRegion(gpa, size, uaddr, 0)


def test_every_request_has_a_row():
    assert set(MESSAGES) == set(Request)


@pytest.mark.parametrize(
    "payload",
    [
        m.VringState(1, 256),
        m.VringAddr(0, 0, 0x1000, 0x3000, 0x2000, 0x3000),
        m.MemTable((region(), region(0x200000, 0x1000, 0x7F0000200000))),
        m.LogArea(4096, 0),
        m.Config(0, 6, 0, b"\x52\x54\x00\x00\x00\x01"),
    ],
)
def test_structs_round_trip(payload):
    request = {
        m.VringState: Request.SET_VRING_NUM,
        m.VringAddr: Request.SET_VRING_ADDR,
        m.MemTable: Request.SET_MEM_TABLE,
        m.LogArea: Request.SET_LOG_BASE,
        m.Config: Request.SET_CONFIG,
    }[type(payload)]
    fds = {Request.SET_MEM_TABLE: [10, 11], Request.SET_LOG_BASE: [12]}.get(request, [])
    msg = m.decode(request, m.VERSION, payload.encode(), fds)
    assert msg.payload == payload and msg.fds == fds


def test_header_round_trip():
    data = m.encode(Request.SET_FEATURES, m.U64.pack(1 << 32), flags=m.FLAG_NEED_REPLY)
    request, flags, size = m.decode_header(data[: m.HEADER.size])
    assert (request, size) == (Request.SET_FEATURES, 8) and flags & m.FLAG_NEED_REPLY
    assert m.decode(request, flags, data[m.HEADER.size :], []).need_reply


@pytest.mark.parametrize(
    "data, reason",
    [
        (header(1, 0)[:8], "truncated"),
        (header(1, 0, flags=0), "version"),
        (header(1, 0, flags=m.VERSION | 1 << 5), "unknown flags"),
        (header(1, 0, flags=m.VERSION | m.FLAG_REPLY), "reply"),
        (header(5, m.MAX_PAYLOAD + 1), "at most"),
    ],
)
def test_bad_headers_are_refused(data, reason):
    with pytest.raises(ProtocolError, match=reason):
        m.decode_header(data)


@pytest.mark.parametrize(
    "request_id, body, fds, reason",
    [
        (999, b"", [], "unknown request"),
        (Request.SET_FEATURES, b"\0" * 4, [], "needs 8"),  # truncated u64
        (Request.SET_FEATURES, b"\0" * 9, [], "at most 8"),  # oversize
        (Request.SET_VRING_ADDR, m.VringAddr(0, 0, 1, 2, 3, 4).encode()[:39], [], "needs 40"),
        (Request.SET_MEM_TABLE, m.MemTable.HEAD.pack(0, 0), [], "0 memory regions"),
        (Request.SET_MEM_TABLE, m.MemTable.HEAD.pack(9, 0) + region().encode() * 9, [], "at most|9 memory regions"),
        (Request.SET_MEM_TABLE, m.MemTable.HEAD.pack(2, 0) + region().encode(), [3, 4], "needs 72"),
        (Request.SET_MEM_TABLE, m.MemTable((region(),)).encode(), [], "0 file descriptors, needs 1"),
        (Request.SET_MEM_TABLE, m.MemTable((region(), region())).encode(), [3, 4], "overlap"),
        (Request.SET_MEM_TABLE, m.MemTable((region(size=0),)).encode(), [3], "empty"),
        (Request.SET_MEM_TABLE, m.MemTable((region(gpa=(1 << 64) - 4096, size=8192),)).encode(), [3], "wraps"),
        (Request.SET_VRING_KICK, m.U64.pack(0), [], "0 file descriptors, needs 1"),
        (Request.SET_VRING_KICK, m.U64.pack(0 | m.VRING_NOFD_MASK), [5], "1 file descriptors, needs 0"),
        (Request.SET_VRING_CALL, m.U64.pack(1 << 9), [5], "unknown bits"),
        (Request.SET_FEATURES, m.U64.pack(0), [5], "needs 0"),
        (Request.SET_LOG_BASE, m.LogArea(4096, 0).encode(), [], "needs 1"),
        (Request.SET_LOG_BASE, m.LogArea(0, 0).encode(), [5], "log of 0 bytes"),
        (Request.SET_CONFIG, m.Config.HEAD.pack(250, 10, 0) + bytes(10), [], "beyond"),
        (Request.SET_CONFIG, m.Config.HEAD.pack(0, 10, 0) + bytes(4), [], "needs 22"),
    ],
)
def test_bad_messages_are_refused(request_id, body, fds, reason):
    with pytest.raises(ProtocolError, match=reason):
        m.decode(request_id, m.VERSION, body, fds)


def test_kick_without_fd_when_nofd_bit():
    msg = m.decode(Request.SET_VRING_KICK, m.VERSION, m.U64.pack(1 | m.VRING_NOFD_MASK), [])
    assert msg.payload == 1 | m.VRING_NOFD_MASK


def test_requests_without_payload_tolerate_an_ignored_u64():
    assert m.decode(Request.GET_FEATURES, m.VERSION, bytes(8), []).payload is None
    with pytest.raises(ProtocolError):
        m.decode(Request.GET_FEATURES, m.VERSION, bytes(9), [])
