"""The backend against a Python vhost-user frontend (tests/vhost_user/client.py) over soft:net."""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Iterator

import pytest

from vdpa_svq.dirty import pages_of
from vdpa_svq.guest.frames import build_frame, parse_frame
from vdpa_svq.guest.net import NetDriver
from vdpa_svq.relay_impl import AVAILABLE_IMPLS
from vdpa_svq.ring import Layout
from vdpa_svq.vhost_user import messages as m
from vdpa_svq.vhost_user.backend import BackendError
from vdpa_svq.vhost_user.messages import Request

from .client import VhostUserFrontend, recv_reply, send
from .conftest import RunningServer


def loop_frames(drv: NetDriver, count: int, timeout: float = 10) -> list[int]:
    """Send `count` frames and collect the loopback's copies; the sequence numbers received."""
    seqs: list[int] = []
    sent = 0
    deadline = time.monotonic() + timeout
    while len(seqs) < count:
        assert time.monotonic() < deadline, f"{len(seqs)} of {count} frames came back ({sent} sent)"
        while sent < count and drv.send(build_frame(sent, 64 + sent % 1400)):
            sent += 1
        drv.flush()
        for frame in drv.reap():
            seq = parse_frame(frame)
            assert seq is not None
            seqs.append(seq)
        if len(seqs) < count:
            drv.wait(0.05)
    return seqs


def traffic_then_log(fe: VhostUserFrontend, layout: Layout, frames: int) -> set[int]:
    """Loop `frames` frames, stop the rings (GET_VRING_BASE: the frontend's last sync), and check that
    the shared log has every RX buffer page the device wrote and the page used entries went to;
    the logged pages."""
    drv = fe.setup()
    drv.rx_spans = []
    loop_frames(drv, frames)
    for i in range(2):
        fe.get_vring_base(i)
    assert fe.log_mm is not None
    logged = set(pages_of(bytes(fe.log_mm)))
    wanted = {p for gpa, n in drv.rx_spans for p in range(gpa >> 12, (gpa + n - 1 >> 12) + 1)}
    # Where used entries go: split's used ring (device area), packed's descriptor ring (2.8.4).
    rx = fe.plan.rings[0]
    wanted.add((rx.device if layout is Layout.SPLIT else rx.desc) >> 12)
    assert wanted <= logged, f"pages missing from the log: {sorted(wanted - logged)[:10]}"
    return logged


def stop_and_restart_three_times(server: RunningServer, layout: Layout):
    """One connection: traffic, then GET_VRING_BASE (the relay stops) and SET_VRING_BASE/KICK/ENABLE
    from what it returned (the relay restarts), three times; then several rings' worth of traffic.
    The connection's summary, once the server saw it close."""
    fe = VhostUserFrontend(server.connect(), layout)
    try:
        drv = fe.setup()
        for _ in range(3):
            assert sorted(loop_frames(drv, 30)) == list(range(30))
            bases = [fe.get_vring_base(i) for i in range(2)]
            for i in range(2):
                fe.ack(Request.SET_VRING_BASE, m.VringState(i, bases[i]).encode())
                fe.ack(Request.SET_VRING_KICK, m.U64.pack(i), [fe.kick_fds[i]])
                fe.ack(Request.SET_VRING_ENABLE, m.VringState(i, 1).encode())
        assert sorted(loop_frames(drv, 3 * fe.num)) == list(range(3 * fe.num))
    finally:
        fe.close()
    server.wait_connections(1)
    (summary,) = server.server.summaries
    return summary


@pytest.mark.parametrize("event_idx", [True, False], ids=["event_idx", "no_event_idx"])
@pytest.mark.parametrize("layout", [Layout.SPLIT, Layout.PACKED], ids=["split", "packed"])
def test_frames_loop_back_through_the_relay(server_impl, layout, event_idx):
    server = server_impl
    fe = VhostUserFrontend(server.connect(), layout, event_idx=event_idx)
    try:
        drv = fe.setup()
        assert sorted(loop_frames(drv, 500)) == list(range(500))
    finally:
        fe.close()
    server.wait_connections(1)
    (summary,) = server.server.summaries
    assert summary.error is None
    assert summary.guest_layout == layout.value
    assert summary.queues[1]["forwarded"] >= 500 and summary.queues[0]["returned"] >= 500


def test_reconnect_serves_the_next_frontend(server):
    for n, layout in enumerate([Layout.SPLIT, Layout.PACKED, Layout.SPLIT], 1):
        fe = VhostUserFrontend(server.connect(), layout)
        try:
            assert sorted(loop_frames(fe.setup(), 100)) == list(range(100))
        finally:
            fe.close()
        server.wait_connections(n)
    assert all(s.error is None and s.started == 1 for s in server.server.summaries)


@pytest.mark.parametrize("layout", [Layout.SPLIT, Layout.PACKED], ids=["split", "packed"])
def test_dirty_log_holds_every_page_the_device_wrote(server_impl, layout):
    """VHOST_F_LOG_ALL + SET_LOG_BASE: after GET_VRING_BASE (the frontend's last sync of a stopped
    ring), the shared log has every RX buffer page the device wrote and the RX device area."""
    fe = VhostUserFrontend(server_impl.connect(), layout, log_all=True)
    try:
        logged = traffic_then_log(fe, layout, 200)
        # Only pages the device or the relay wrote: no TX buffer page (the device only reads them).
        tx_pool = fe.plan.pools[1]
        tx_pages = set(range(tx_pool.gpa >> 12, (tx_pool.gpa + tx_pool.size) >> 12))
        assert not logged & tx_pages
    finally:
        fe.close()


def test_notifiers_replaced_while_relaying(server):
    """New kick and call eventfds for a running ring (QEMU does this, e.g. when irqfds change):
    traffic goes on through the new ones, and the frontend is interrupted on the new call fd."""
    fe = VhostUserFrontend(server.connect(), Layout.PACKED)
    try:
        drv = fe.setup()
        assert sorted(loop_frames(drv, 50)) == list(range(50))
        for i in range(2):
            for request, fds in ((Request.SET_VRING_KICK, fe.kick_fds), (Request.SET_VRING_CALL, fe.call_fds)):
                new = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
                fe.ack(request, m.U64.pack(i), [new])
                os.close(fds[i])
                fds[i] = new
        drv.call_fds = (fe.call_fds[0], fe.call_fds[1])
        assert sorted(loop_frames(drv, 100)) == list(range(100))
        assert drv.stats.calls > 0
    finally:
        fe.close()
    server.wait_connections(1)
    assert server.server.summaries[0].started == 1  # no restart was needed


def test_dirty_log_started_mid_traffic(server):
    """QEMU's migration order: the rings run, then SET_FEATURES adds LOG_ALL and SET_LOG_BASE
    hands over the log; pages the device writes from then on reach the log (synced every
    LOG_SYNC_S, and before GET_VRING_BASE answers). Changing ring features while running is refused."""
    fe = VhostUserFrontend(server.connect(), Layout.SPLIT)
    try:
        drv = fe.setup()
        loop_frames(drv, 50)
        fe.ack(Request.SET_FEATURES, m.U64.pack(fe.features | 1 << m.VHOST_F_LOG_ALL))
        fe.set_log_base()
        drv.rx_spans = []
        loop_frames(drv, 100)
        deadline = time.monotonic() + 5
        wanted = {gpa >> 12 for gpa, _ in drv.rx_spans}
        while not wanted <= set(pages_of(bytes(fe.log_mm))):
            assert time.monotonic() < deadline, "the periodic sync did not bring the pages to the log"
            time.sleep(0.01)
        fe.get_vring_base(0)
        fe.get_vring_base(1)
    finally:
        fe.close()
    server.wait_connections(1)
    assert server.server.summaries[0].log_syncs > 0


def test_ring_features_cannot_change_while_relaying(server):
    fe = VhostUserFrontend(server.connect(), Layout.SPLIT)
    try:
        loop_frames(fe.setup(), 10)
        send(fe.sock, Request.SET_FEATURES, m.U64.pack(fe.features ^ 1 << 29))
        with contextlib.suppress(ConnectionResetError):
            assert fe.sock.recv(64) == b""
    finally:
        fe.close()
    server.wait_connections(1)
    assert "while the rings run" in server.server.summaries[0].error


@pytest.mark.parametrize("layout", [Layout.SPLIT, Layout.PACKED], ids=["split", "packed"])
def test_stop_and_restart_keeps_every_buffer(server, layout):
    """GET_VRING_BASE stops the rings (the device is reset); SET_VRING_BASE with what it returned,
    a new kick and enable restart them. Buffers the device held (every posted RX buffer) are read
    again from the guest ring: traffic of several rings' worth goes on after three restarts."""
    summary = stop_and_restart_three_times(server, layout)
    assert summary.started == 4
    assert summary.error is None


def test_get_vring_base_returns_the_ring_state(server):
    fe = VhostUserFrontend(server.connect(), Layout.SPLIT)
    try:
        loop_frames(fe.setup(), 10)
        # TX: 10 chains used. RX: 10 used; the others the relay took are given back (rewound).
        assert fe.get_vring_base(1) == 10
        assert fe.get_vring_base(0) == 10
    finally:
        fe.close()


@pytest.mark.parametrize(
    "bad",
    [
        pytest.param(m.HEADER.pack(Request.SET_FEATURES, 1, 4) + b"\0" * 4, id="short-u64"),
        pytest.param(m.HEADER.pack(999, 1, 0), id="unknown-request"),
        pytest.param(m.HEADER.pack(Request.SET_FEATURES, 2, 8) + bytes(8), id="bad-version"),
        pytest.param(m.HEADER.pack(Request.SET_MEM_TABLE, 1, 8) + bytes(8), id="zero-regions"),
        pytest.param(m.HEADER.pack(Request.SET_VRING_NUM, 1, 8) + m.VringState(7, 64).encode(), id="bad-queue"),
        pytest.param(m.HEADER.pack(Request.SET_VRING_KICK, 1, 8) + m.U64.pack(0), id="kick-without-fd"),
        pytest.param(m.HEADER.pack(Request.GET_FEATURES, 1, 1 << 20), id="oversize"),
    ],
)
def test_malformed_message_closes_the_connection_server_survives(server, bad):
    s = server.connect()
    s.sendall(bad)
    # The backend hangs up without answering (a reset when the rest of our message is unread).
    with contextlib.suppress(ConnectionResetError):
        assert s.recv(64) == b""
    s.close()
    server.wait_connections(1)
    assert server.server.summaries[0].error is not None
    fe = VhostUserFrontend(server.connect(), Layout.PACKED)
    try:
        assert sorted(loop_frames(fe.setup(), 50)) == list(range(50))
    finally:
        fe.close()


@pytest.mark.parametrize("request_id", [Request.SET_MEM_TABLE, Request.SET_LOG_BASE], ids=["mem", "log"])
def test_mapping_past_the_end_of_the_file_is_refused(server, request_id):
    """Touching such a mapping raises SIGBUS, which would kill the server: refused up front."""
    fd = os.memfd_create("short", os.MFD_CLOEXEC)
    os.ftruncate(fd, 4096)
    try:
        s = server.connect()
        if request_id is Request.SET_MEM_TABLE:
            payload = m.MemTable((m.MemRegion(0, 1 << 20, 0x7F0000000000, 0),)).encode()
        else:
            payload = m.LogArea(1 << 20, 0).encode()
        send(s, request_id, payload, [fd])
        with contextlib.suppress(ConnectionResetError):
            assert s.recv(64) == b""
        s.close()
    finally:
        os.close(fd)
    server.wait_connections(1)
    assert "past the end" in server.server.summaries[0].error


def test_frontend_stalled_mid_message_is_dropped(server, monkeypatch):
    from vdpa_svq.vhost_user import backend

    monkeypatch.setattr(backend, "MESSAGE_TIMEOUT_S", 0.2)
    s = server.connect()
    s.sendall(m.HEADER.pack(Request.SET_VRING_NUM, 1, 8) + b"\0\0")  # and nothing more, but stay connected
    server.wait_connections(1)
    assert "timed out" in server.server.summaries[0].error
    s.close()


def test_ring_outside_the_memory_table_is_refused(server):
    fe = VhostUserFrontend(server.connect(), Layout.SPLIT, ring_uaddr_offset=0x100000000)
    try:
        with pytest.raises((ConnectionError, AssertionError, OSError)):
            fe.setup()
    finally:
        fe.close()
    server.wait_connections(1)
    assert "is not in the memory table" in server.server.summaries[0].error


def test_user_addresses_translate_through_every_region():
    """SET_VRING_ADDR carries the frontend's virtual addresses; each region maps its own range."""
    from types import SimpleNamespace

    from vdpa_svq.vhost_user.backend import Connection

    table = (m.MemRegion(0x0, 0x10000, 0x7F0000000000, 0), m.MemRegion(0x100000, 0x10000, 0x7E0000000000, 0))
    conn = SimpleNamespace(table=table)
    assert Connection.to_gpa(conn, 0x7F0000001000, 0x100, "ring") == 0x1000
    assert Connection.to_gpa(conn, 0x7E0000002000, 0x100, "ring") == 0x102000
    with pytest.raises(BackendError, match="not in the memory table"):
        Connection.to_gpa(conn, 0x7E000000FF00, 0x200, "ring")  # runs off the end of its region


def test_truncated_message_then_hangup(server):
    s = server.connect()
    s.sendall(m.HEADER.pack(Request.SET_VRING_NUM, 1, 8) + b"\0\0")
    s.close()
    server.wait_connections(1)
    assert "truncated" in server.server.summaries[0].error


def test_get_features_offers_what_the_relay_serves(server):
    s = server.connect()
    try:
        send(s, Request.GET_FEATURES)
        features = m.U64.unpack(recv_reply(s, Request.GET_FEATURES))[0]
        for b in (32, 34, 29, 28, 30, 26):
            assert features >> b & 1
    finally:
        s.close()


# -- busy polling (serve --poll-us): the pump (C, or pump.py for the Python relay) polls the rings with
# notifications off ---------------------------------------------------------------------------------
# Long enough to see soft:net (a Python thread) answer a burst within one polling phase: at 200 us
# it never does here, and every phase ends with no round (this frontend sends a burst, then waits).
POLL_US = 5000


@pytest.fixture(params=AVAILABLE_IMPLS)
def polling_server(request, tmp_path) -> Iterator[RunningServer]:
    """A server whose relay busy-polls, with each relay implementation that was built."""
    srv = RunningServer(str(tmp_path / "vu.sock"), impl=request.param, poll_us=POLL_US)
    yield srv
    srv.stop()


@pytest.mark.parametrize("event_idx", [True, False], ids=["event_idx", "no_event_idx"])
@pytest.mark.parametrize("layout", [Layout.SPLIT, Layout.PACKED], ids=["split", "packed"])
def test_frames_loop_back_through_the_polling_relay(polling_server, layout, event_idx):
    """A stream of frames, then short bursts after idle gaps far longer than poll_us: each gap ends
    a polling phase, so the next burst must wake the pump through the notifications it turned back
    on (in the guest's ring, with and without event_idx; and in the shadow ring for the device)."""
    server = polling_server
    fe = VhostUserFrontend(server.connect(), layout, event_idx=event_idx)
    try:
        drv = fe.setup()
        assert sorted(loop_frames(drv, 500)) == list(range(500))
        for _ in range(5):
            time.sleep(0.05)  # 10 x poll_us: the phase ends, the pump sleeps in epoll
            assert sorted(loop_frames(drv, 20, timeout=5)) == list(range(20))
    finally:
        fe.close()
    server.wait_connections(1)
    (summary,) = server.server.summaries
    assert summary.error is None, summary.error
    assert summary.guest_layout == layout.value
    assert summary.queues[1]["forwarded"] >= 600 and summary.queues[0]["returned"] >= 600, summary.queues
    for q in summary.queues.values():
        assert {"device_kicks", "guest_calls"} <= q.keys(), q
    loop = summary.relay_loop
    assert loop["poll_rounds"] > 0, f"the pump never polled: {loop}"
    assert 0 < loop["poll_phases"] <= loop["wakeups"], loop


@pytest.mark.parametrize("layout", [Layout.SPLIT, Layout.PACKED], ids=["split", "packed"])
def test_stop_and_restart_while_polling_keeps_every_buffer(polling_server, layout):
    """GET_VRING_BASE right after traffic, while the pump may still be in its polling phase: the
    pump stops, every buffer is accounted for, and the restarted relay (a new pump) polls again."""
    summary = stop_and_restart_three_times(polling_server, layout)
    assert summary.started == 4 and summary.error is None, summary
    assert summary.relay_loop["poll_phases"] >= 4, summary.relay_loop  # at least one per relay run


def test_dirty_log_holds_every_page_the_device_wrote_while_polling(polling_server):
    """The pages the device writes while the pump polls (no wake-up to mark them) reach the log."""
    fe = VhostUserFrontend(polling_server.connect(), Layout.PACKED, log_all=True)
    try:
        traffic_then_log(fe, Layout.PACKED, 300)
    finally:
        fe.close()
    polling_server.wait_connections(1)
    assert polling_server.server.summaries[0].relay_loop["poll_rounds"] > 0




# -- the listening socket ---------------------------------------------------------------------------
def test_the_socket_path_appears_only_once_it_listens(tmp_path, monkeypatch):
    """A frontend that connects as soon as the path exists (as a VMM waiting for it does) must not
    be refused: the path is made only after listen(), and a stale socket is replaced, not reused."""
    import socket

    from vdpa_svq.devices import open_device
    from vdpa_svq.vhost_user import backend

    path = str(tmp_path / "vu.sock")
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(path)  # a previous run's socket, nobody listening
    stale.close()
    bound_at_listen = []

    class WatchedSocket(socket.socket):
        def listen(self, *args: int) -> None:
            bound_at_listen.append(self.getsockname())
            super().listen(*args)

    monkeypatch.setattr(backend.socket, "socket", WatchedSocket)
    dev = open_device("soft:net")
    try:
        server = backend.Server(dev, path)
        monkeypatch.undo()
        (bound,) = bound_at_listen
        assert bound != path, "the socket listened only after the path was made: a connect in between is refused"
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        probe.connect(path)  # accepted into the backlog: the path is the listening socket, not the stale one
        probe.close()
        server.listener.close()
        assert [p for p in os.listdir(tmp_path) if p != "vu.sock"] == [], "the pending name was left behind"
    finally:
        dev.close()
