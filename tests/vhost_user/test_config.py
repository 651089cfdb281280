"""vhost-user CONFIG (protocol feature 9) and the virtio-net bits that describe config fields,
against the Python frontend (client.py) over soft devices.

docs/interop/vhost-user.rst, VHOST_USER_GET_CONFIG: the reply is the config header (offset, size,
flags) and `size` bytes; "vhost-user back-end uses zero length of payload to indicate an error".
"""

from __future__ import annotations

import contextlib
import struct

import pytest

from kernel_iface import uapi
from vdpa_svq.ring import Layout
from vdpa_svq.softdev import SoftBlkDevice, SoftNetDevice
from vdpa_svq.softdev.net import DEFAULT_MAC
from vdpa_svq.vhost_user import messages as m
from vdpa_svq.vhost_user.messages import ProtocolFeature, Request

from .client import VhostUserFrontend, bit, send
from .conftest import RunningServer
from .test_backend import loop_frames

MAC, MTU, STATUS = uapi.VIRTIO_NET_F_MAC, uapi.VIRTIO_NET_F_MTU, uapi.VIRTIO_NET_F_STATUS
NET_CONFIG_SIZE = 24  # soft:net, like vdpa_sim net


class StatusOnlyNet(SoftNetDevice):
    """A net device with a link status but no MAC or MTU to tell."""

    DEVICE_FEATURES = 1 << STATUS


class ReadOnlyBlk(SoftBlkDevice):
    """A block device offering VIRTIO_BLK_F_RO: bit 5, the number VIRTIO_NET_F_MAC has for net."""

    DEVICE_FEATURES = SoftBlkDevice.DEVICE_FEATURES | 1 << uapi.VIRTIO_BLK_F_RO


class NoConfigNet(SoftNetDevice):
    """A device without a config space (VHOST_VDPA_GET_CONFIG_SIZE 0)."""

    DEVICE_FEATURES = 0

    def config(self) -> bytes:
        return b""


class WritableMacNet(SoftNetDevice):
    """A net device whose mac field takes writes (as legacy virtio-net's did); records each write."""

    def __init__(self, **kwargs: object) -> None:
        super().__init__(**kwargs)  # type: ignore[arg-type]
        self.writes: list[tuple[int, bytes]] = []

    def write_config(self, offset: int, data: bytes) -> None:
        self.writes.append((offset, data))
        cfg = bytearray(self.config())
        cfg[offset : offset + len(data)] = data
        self.mac = bytes(cfg[:6])


@pytest.fixture
def make_server(tmp_path):
    servers: list[RunningServer] = []

    def make(device) -> RunningServer:
        srv = RunningServer(str(tmp_path / f"vu{len(servers)}.sock"), device=device)
        servers.append(srv)
        return srv

    yield make
    for srv in servers:
        srv.stop()


@contextlib.contextmanager
def frontend(server: RunningServer, **kwargs):
    fe = VhostUserFrontend(server.connect(), Layout.SPLIT, **kwargs)
    try:
        yield fe
    finally:
        fe.close()


def config_reply(body: bytes) -> tuple[tuple[int, int, int], bytes]:
    """(offset, size, flags) and the data of a GET_CONFIG reply; its size must match the header's."""
    assert len(body) >= m.Config.HEAD.size, f"reply of {len(body)} bytes, no config header"
    head = m.Config.HEAD.unpack_from(body)
    data = body[m.Config.HEAD.size :]
    assert len(data) == head[1], f"header says {head[1]} bytes, {len(data)} follow"
    return head, data


def assert_closed_with(server: RunningServer, fe: VhostUserFrontend, reason: str, kind: str) -> None:
    """The backend hung up without answering, and its summary names the reason (no traceback)."""
    with contextlib.suppress(ConnectionResetError):
        assert fe.sock.recv(64) == b""
    server.wait_connections(1)
    error = server.server.summaries[0].error
    assert error is not None and error.startswith(f"{kind}: ") and reason in error, error


# -- GET_CONFIG --------------------------------------------------------------------------------
def test_get_config_returns_the_device_mac(server):
    """The reply is the config header (offset, size, flags echoed) then the bytes asked for."""
    with frontend(server, config=True) as fe:
        fe.negotiate()
        head, mac = config_reply(fe.get_config(0, 6))
        assert head == (0, 6, 0)
        assert mac == DEFAULT_MAC == bytes.fromhex("525400000001")
        # status (le16 at 6): VIRTIO_NET_S_LINK_UP; the flags field comes back as sent.
        head, status = config_reply(fe.get_config(6, 2, flags=1))
        assert head == (6, 2, 1) and struct.unpack("<H", status) == (1,)
        _, whole = config_reply(fe.get_config(0, NET_CONFIG_SIZE))
        assert whole == server.device.config()


@pytest.mark.parametrize(
    "offset, size",
    [(0, NET_CONFIG_SIZE + 1), (NET_CONFIG_SIZE, 1), (20, 8), (100, 156)],
    ids=["one-past", "at-the-end", "straddling", "far-past"],
)
def test_get_config_past_the_config_size_is_refused_with_an_empty_reply(server, offset, size):
    """A range past the device's config space gets the spec's error answer, a reply with no
    payload (not zeros, which would read as the device's values); the connection goes on."""
    with frontend(server, config=True) as fe:
        fe.negotiate()
        assert fe.get_config(offset, size) == b""
        _, mac = config_reply(fe.get_config(0, 6))
        assert mac == DEFAULT_MAC
    server.wait_connections(1)
    assert server.server.summaries[0].error is None


def test_get_config_while_the_rings_run(server):
    """Config reads go to the device while the relay runs, and do not disturb it."""
    with frontend(server, config=True) as fe:
        drv = fe.setup()
        assert sorted(loop_frames(drv, 50)) == list(range(50))
        _, mac = config_reply(fe.get_config(0, 6))
        assert mac == DEFAULT_MAC
        assert sorted(loop_frames(drv, 50)) == list(range(50))
    server.wait_connections(1)
    assert server.server.summaries[0].error is None


# -- SET_CONFIG --------------------------------------------------------------------------------
def test_set_config_is_forwarded_to_the_device(make_server):
    dev = WritableMacNet()
    server = make_server(dev)
    new_mac = bytes.fromhex("02aabbccddee")
    with frontend(server, config=True) as fe:
        fe.negotiate()
        fe.set_config(0, new_mac)  # acked (REPLY_ACK): status 0
        assert dev.writes == [(0, new_mac)]
        _, mac = config_reply(fe.get_config(0, 6))
        assert mac == new_mac


def test_set_config_the_device_refuses_closes_the_connection(server):
    """The device refuses a write past its config (E2BIG): one line naming the request, no traceback."""
    with frontend(server, config=True) as fe:
        fe.negotiate()
        send(fe.sock, Request.SET_CONFIG, m.Config(20, 8, 0, bytes(8)).encode())
        assert_closed_with(server, fe, "SET_CONFIG: the device refused 8 bytes at offset 20", "BackendError")


# -- negotiation -------------------------------------------------------------------------------
@pytest.mark.parametrize("request_id", [Request.GET_CONFIG, Request.SET_CONFIG], ids=["get", "set"])
def test_config_requests_without_negotiating_config_are_refused(server, request_id):
    """CONFIG offered but not acked: GET_CONFIG/SET_CONFIG break the protocol, the connection closes."""
    with frontend(server) as fe:
        fe.negotiate()
        send(fe.sock, request_id, m.Config(0, 6, 0, bytes(6)).encode())
        assert_closed_with(server, fe, f"{request_id.name}: protocol feature CONFIG was not negotiated",
                           "BackendError")


def test_config_is_not_offered_without_a_config_space(make_server):
    server = make_server(NoConfigNet())
    with frontend(server) as fe:
        pf = fe.get_u64(Request.GET_PROTOCOL_FEATURES)
        assert not pf & bit(ProtocolFeature.CONFIG)
        assert pf & bit(ProtocolFeature.REPLY_ACK)
        send(fe.sock, Request.GET_CONFIG, m.Config(0, 6, 0, bytes(6)).encode())
        assert_closed_with(server, fe, "protocol feature CONFIG was not offered", "BackendError")


@pytest.mark.parametrize(
    "body, reason",
    [
        (m.Config.HEAD.pack(0, 6, 0)[:8], "needs 12"),  # no whole config header
        (m.Config.HEAD.pack(0, 10, 0) + bytes(4), "needs 22"),  # fewer bytes than `size`
        (m.Config.HEAD.pack(250, 10, 0) + bytes(10), "beyond 256"),  # past VHOST_USER_MAX_CONFIG_SIZE
        (m.Config.HEAD.pack(0, 300, 0) + bytes(300), "at most"),  # larger than any config message
    ],
    ids=["short-header", "short-data", "past-max-config", "oversize"],
)
@pytest.mark.parametrize("request_id", [Request.GET_CONFIG, Request.SET_CONFIG], ids=["get", "set"])
def test_malformed_config_payloads_close_the_connection(server, request_id, body, reason):
    with frontend(server, config=True) as fe:
        fe.negotiate()
        send(fe.sock, request_id, body)
        assert_closed_with(server, fe, reason, "ProtocolError")


# -- device-specific feature bits --------------------------------------------------------------
@pytest.mark.parametrize(
    "device, passed",
    [
        (SoftNetDevice, {MAC, MTU, STATUS}),
        (StatusOnlyNet, {STATUS}),
        (ReadOnlyBlk, set()),  # bit 5 of a block device is RO, not MAC: never passed through
    ],
    ids=["net", "net-without-mac", "blk"],
)
def test_device_specific_bits_are_offered_only_when_the_device_offers_them(make_server, device, passed):
    server = make_server(device())
    with frontend(server) as fe:
        offered = fe.get_u64(Request.GET_FEATURES)
        assert {b for b in (MAC, MTU, STATUS) if offered >> b & 1} == passed
        if MAC not in passed:
            send(fe.sock, Request.SET_FEATURES, m.U64.pack(offered | bit(MAC)))
            assert_closed_with(server, fe, f"bits {bit(MAC):#x} were not offered", "BackendError")


def test_acked_bits_are_negotiated_with_the_device(server):
    """The bits the frontend acked reach the device when the relay starts; frames still loop.
    The next connection, without them, negotiates them no more."""
    with frontend(server, config=True, extra_features=bit(MAC) | bit(STATUS)) as fe:
        assert sorted(loop_frames(fe.setup(), 50)) == list(range(50))
        features = server.server.session.features
        assert features & bit(MAC) and features & bit(STATUS) and not features & bit(MTU)
        assert server.device.acked_features == features
    server.wait_connections(1)
    with frontend(server) as fe:
        assert sorted(loop_frames(fe.setup(), 50)) == list(range(50))
        assert not server.server.session.features & (bit(MAC) | bit(STATUS))
    server.wait_connections(2)
    assert [s.error for s in server.server.summaries] == [None, None]
    assert server.server.summaries[0].features & bit(MAC)

