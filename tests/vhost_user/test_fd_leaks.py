"""No fd outlives its connection: serve's open fds are counted after connections that end in every
way, against the count of a server that never had one.

A fresh `serve soft:net` holds 4 fds (stdin, its two log files, the listening socket), and nothing a
connection opens (the frontend's memory, log and notifier fds, the session's error eventfds, the
device's duplicates of them, the relay's epoll) is kept for the next one: so every case compares
against the fresh server, not against a warmed-up one. A warmed-up baseline would hide a leak that
the next connection replaces (the device's copy of each error eventfd, 2 per relay run, was one:
433bbc0). vhost-user (QEMU docs/interop/vhost-user.rst) lets the frontend go away at any point;
VIRTIO 1.2 2.1.2 lets the device stop a queue (DEVICE_NEEDS_RESET): neither may cost the server fds.
"""

from __future__ import annotations

import array
import contextlib
import os
import select
import socket
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.vhost_user.client import UADDR_OFFSET, VhostUserFrontend, new_eventfd, send
from tests.vhost_user.conftest import RunningServer
from vdpa_svq.errors import GuestRingError
from vdpa_svq.loop import RelayLoops
from vdpa_svq.ring import Layout
from vdpa_svq.vhost_user import messages as m
from vdpa_svq.vhost_user.backend import MAX_RETIRED_FDS
from vdpa_svq.vhost_user.messages import Request

from .hostile import HOSTILE, ServeProcess
from .test_backend import loop_frames


def open_fds(pid: int | str) -> dict[int, str]:
    """fd number -> what it is (readlink of /proc/PID/fd/N)."""
    out = {}
    base = f"/proc/{pid}/fd"
    for name in os.listdir(base):
        with contextlib.suppress(FileNotFoundError):  # our own listdir's fd, closed meanwhile
            out[int(name)] = os.readlink(f"{base}/{name}")
    return out


def left_open(before: dict[int, str], after: dict[int, str]) -> list[str]:
    """The fds in `after` that `before` did not have (by number and target), described."""
    return [f"fd {n}: {what}" for n, what in sorted(after.items()) if before.get(n) != what]


# -- how a connection ends ---------------------------------------------------------------------
def clean_close(sock: socket.socket, layout: Layout) -> None:
    """Traffic with every fd a frontend can send (kick, call, err, the dirty log), then a clean close."""
    fe = VhostUserFrontend(sock, layout, log_all=True, err_fds=True)
    try:
        drv = fe.setup()  # the log too (log_all)
        assert sorted(loop_frames(drv, 50)) == list(range(50))
    finally:
        fe.close()


def notifiers_replaced_while_relaying(sock: socket.socket, layout: Layout) -> None:
    """Kick, call and err fds replaced under the running relay (the retired ones close at its stop)."""
    fe = VhostUserFrontend(sock, layout, err_fds=True)
    try:
        drv = fe.setup()
        assert sorted(loop_frames(drv, 20)) == list(range(20))
        for i in range(2):
            for request, fds in ((Request.SET_VRING_KICK, fe.kick_fds), (Request.SET_VRING_CALL, fe.call_fds),
                                 (Request.SET_VRING_ERR, fe.errs)):
                new = new_eventfd(i)
                fe.ack(request, m.U64.pack(i), [new])
                os.close(fds[i])
                fds[i] = new
        drv.call_fds = (fe.call_fds[0], fe.call_fds[1])
        assert sorted(loop_frames(drv, 20)) == list(range(20))
    finally:
        fe.close()


def stop_and_restart(sock: socket.socket, layout: Layout) -> None:
    """GET_VRING_BASE stops the relay, new kick fds restart it: two relay runs on one connection."""
    fe = VhostUserFrontend(sock, layout, err_fds=True)
    try:
        drv = fe.setup()
        assert sorted(loop_frames(drv, 10)) == list(range(10))
        for i in range(2):
            fe.get_vring_base(i)
        for i in range(2):
            new = new_eventfd(i)
            fe.ack(Request.SET_VRING_KICK, m.U64.pack(i), [new])
            os.close(fe.kick_fds[i])
            fe.kick_fds[i] = new
        for i in range(2):
            fe.ack(Request.SET_VRING_ENABLE, m.VringState(i, 1).encode())
        assert sorted(loop_frames(drv, 10)) == list(range(10))
    finally:
        fe.close()


def vanish_mid_setup(sock: socket.socket, layout: Layout) -> None:
    """Memory table, queue 0's notifiers and the log sent; the frontend vanishes before the rings start."""
    fe = VhostUserFrontend(sock, layout, log_all=True)
    try:
        fe.negotiate()
        (region,) = fe.mem.regions
        table = m.MemTable((m.MemRegion(region.gpa, region.size, region.gpa + UADDR_OFFSET, 0),))
        fe.ack(Request.SET_MEM_TABLE, table.encode(), [region.fd])
        fe.set_log_base()
        fe.kick_fds.append(new_eventfd(0))
        fe.call_fds.append(new_eventfd(0))
        fe.ack(Request.SET_VRING_CALL, m.U64.pack(0), [fe.call_fds[0]])
        fe.ack(Request.SET_VRING_KICK, m.U64.pack(0), [fe.kick_fds[0]])
    finally:
        fe.close()


def vanish_mid_traffic(sock: socket.socket, layout: Layout) -> None:
    """Frames queued and kicked, then the socket closed: nothing stopped or reaped."""
    fe = VhostUserFrontend(sock, layout, err_fds=True)
    try:
        drv = fe.setup()
        for seq in range(32):
            drv.send(bytes([seq]) * 256)
        drv.flush()
    finally:
        fe.close()


def _with_fds(sock: socket.socket, data: bytes, nfds: int) -> None:
    fds = [new_eventfd(0) for _ in range(nfds)]
    try:
        sock.sendmsg([data], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())])
    finally:
        for fd in fds:
            os.close(fd)
    with contextlib.suppress(ConnectionResetError, TimeoutError):
        sock.recv(64)  # the server hangs up on it
    sock.close()


def truncated_message_with_fds(sock: socket.socket, layout: Layout) -> None:
    """A SET_VRING_KICK header and its fd, half the payload, then a hang-up."""
    _with_fds(sock, m.HEADER.pack(Request.SET_VRING_KICK, m.VERSION, 8) + bytes(4), 1)


def garbage_with_fds(sock: socket.socket, layout: Layout) -> None:
    """A request number nobody defined, with fds attached."""
    _with_fds(sock, m.HEADER.pack(0xBEEF, m.VERSION, 8) + bytes(8), 3)


def too_many_fds(sock: socket.socket, layout: Layout) -> None:
    """More fds with one message than the protocol allows (the kernel truncates them: MSG_CTRUNC)."""
    _with_fds(sock, m.HEADER.pack(Request.SET_MEM_TABLE, m.VERSION, 8) + bytes(8), m.MAX_FDS + 4)


def bad_fd_for_its_message(sock: socket.socket, layout: Layout) -> None:
    """SET_VRING_CALL for a queue the device does not have, with an eventfd."""
    send(sock, Request.SET_OWNER)
    _with_fds(sock, m.HEADER.pack(Request.SET_VRING_CALL, m.VERSION, 8) + m.U64.pack(77), 1)


def _hostile(name: str) -> Callable[[socket.socket, Layout], None]:
    def run(sock: socket.socket, layout: Layout) -> None:
        fe = HOSTILE[name](sock, layout)
        with contextlib.suppress(ConnectionResetError, TimeoutError):
            fe.sock.recv(64)
        fe.close()

    run.__doc__ = HOSTILE[name].__doc__
    return run


ENDINGS: dict[str, Callable[[socket.socket, Layout], None]] = {
    "clean close": clean_close,
    "notifiers replaced while relaying": notifiers_replaced_while_relaying,
    "stopped and restarted": stop_and_restart,
    "vanishes mid-setup": vanish_mid_setup,
    "vanishes mid-traffic": vanish_mid_traffic,
    "hangs up mid-message, fd sent": truncated_message_with_fds,
    "garbage with fds": garbage_with_fds,
    "too many fds": too_many_fds,
    "bad queue, fd sent": bad_fd_for_its_message,
    **{name: _hostile(name) for name in HOSTILE if name != "512 MiB TX chain"},
}
# Endings that never start the relay: the ring layout changes nothing in them.
BEFORE_THE_RELAY = {"hangs up mid-message, fd sent", "garbage with fds", "too many fds", "bad queue, fd sent",
                    "full pipe as kick fd", "pipe as call fd", "memfd as kick fd", "hung-up socket as kick fd"}
CASES = [pytest.param(name, layout, "auto", id=f"{name}-{layout.value}") for name in ENDINGS
         for layout in (Layout.SPLIT, Layout.PACKED) if layout is Layout.SPLIT or name not in BEFORE_THE_RELAY]
# The Python relay too (serve --impl py) where the relay runs and its notifiers change.
CASES += [pytest.param(name, Layout.SPLIT, "py", id=f"{name}-split-py")
          for name in ("clean close", "notifiers replaced while relaying", "stopped and restarted")]


@pytest.mark.parametrize(("ending", "layout", "impl"), CASES)
def test_serve_holds_no_fd_after_a_connection_ends(tmp_path: Path, ending: str, layout: Layout, impl: str) -> None:
    """serve's fds after one connection that ends this way (then one good connection, which must
    be served) are the fds of serve before it had any."""
    serve = ServeProcess(tmp_path, "--impl", impl)
    try:
        fresh = open_fds(serve.proc.pid)
        ENDINGS[ending](serve.connect(), layout)
        serve.wait_connections(1)
        serve.settled_resources()
        assert left_open(fresh, open_fds(serve.proc.pid)) == [], f"after the connection that {ending}"
        clean_close(serve.connect(), layout)
        serve.wait_connections(2)
        serve.settled_resources()
        assert left_open(fresh, open_fds(serve.proc.pid)) == [], "after the good connection that followed"
        log = serve.stderr()
        assert "Traceback" not in log and "internal error" not in log, log[-3000:]
    finally:
        serve.stop()


@pytest.mark.parametrize("request_", [Request.SET_VRING_KICK, Request.SET_VRING_ERR], ids=["kick", "err"])
def test_a_frontend_that_keeps_replacing_a_notifier_does_not_run_serve_out_of_fds(
        tmp_path: Path, request_: Request) -> None:
    """Replaced kick and err fds stay open while the relay that may be reading them runs; a frontend
    replacing one in a loop (300 times here) would hold as many fds in serve, up to its limit and
    every other connection's failure. Past MAX_RETIRED_FDS the relay restarts instead (closing them),
    and frames still flow."""
    serve = ServeProcess(tmp_path)
    try:
        fresh = len(open_fds(serve.proc.pid))
        fe = VhostUserFrontend(serve.connect(), Layout.SPLIT, err_fds=True)
        try:
            drv = fe.setup()
            assert sorted(loop_frames(drv, 10)) == list(range(10))
            fds = fe.kick_fds if request_ is Request.SET_VRING_KICK else fe.errs
            most = 0
            for n in range(300):
                new = new_eventfd(n)
                fe.ack(request_, m.U64.pack(1), [new])
                os.close(fds[1])
                fds[1] = new
                if n % 25 == 0:
                    most = max(most, len(open_fds(serve.proc.pid)))
            # a connection's own fds (memory, 2 x kick/call/err, the session's, the device's, the
            # loop's) are a few dozen; the retired ones at most MAX_RETIRED_FDS on top, not 300
            assert MAX_RETIRED_FDS <= 64
            assert most - fresh < 64 + 40, f"serve held {most - fresh} fds more than when fresh"
            assert sorted(loop_frames(drv, 10)) == list(range(10))
        finally:
            fe.close()
        serve.wait_connections(1)
        serve.settled_resources()
        assert len(open_fds(serve.proc.pid)) == fresh
        assert "Traceback" not in serve.stderr()
    finally:
        serve.stop()


def break_tx(dev) -> None:
    """soft:net stops using its TX queue (index 1) with a reason, as for a ring error there."""
    with dev.lock:
        dev.break_queue(dev.queues[1], GuestRingError("tx", "injected"))


@pytest.mark.parametrize("impl", ["c", "py"])
def test_a_device_error_leaves_no_fd(tmp_path: Path, impl: str) -> None:
    """The device stops a queue while relaying (VIRTIO 1.2 2.1.2; soft:net signals the queue's error
    eventfd): the relay of that queue stops and the frontend is told, and once the connection ends
    the process holds the fds it held before it (the in-process Server: the test reaches the device)."""
    srv = RunningServer(str(tmp_path / "vu.sock"), impl=impl)
    try:
        before = open_fds("self")
        fe = VhostUserFrontend(srv.connect(), Layout.SPLIT, err_fds=True)
        try:
            drv = fe.setup()
            assert sorted(loop_frames(drv, 10)) == list(range(10))
            break_tx(srv.device)
            assert select.select([fe.errs[1]], [], [], 10)[0] == [fe.errs[1]], "the frontend was not told"
        finally:
            fe.close()
        srv.wait_connections(1)
        assert left_open(before, open_fds("self")) == []
    finally:
        srv.stop()


def test_a_kick_fd_the_running_loop_cannot_take_is_closed(tmp_path: Path, monkeypatch) -> None:
    """SET_VRING_KICK with a new eventfd while relaying, which the relay loop fails to watch (epoll_ctl
    can fail: ENOMEM, ENOSPC at max_user_watches): the connection ends with the reason, and the
    new fd, already taken off the message, is closed with the rest."""
    srv = RunningServer(str(tmp_path / "vu.sock"))
    try:
        before = open_fds("self")
        fe = VhostUserFrontend(srv.connect(), Layout.SPLIT)
        try:
            drv = fe.setup()
            assert sorted(loop_frames(drv, 10)) == list(range(10))

            def full(*args, **kwargs):
                raise OSError(28, "No space left on device")  # ENOSPC: epoll's max_user_watches

            monkeypatch.setattr(RelayLoops, "add_relay", full)
            new = new_eventfd(0)
            send(fe.sock, Request.SET_VRING_KICK, m.U64.pack(0), [new])
            os.close(new)
            with contextlib.suppress(ConnectionResetError):
                assert fe.sock.recv(64) == b"", "the server answered instead of closing the connection"
        finally:
            fe.close()
        srv.wait_connections(1)
        assert "No space left on device" in (srv.server.summaries[-1].error or "")
        assert left_open(before, open_fds("self")) == []
    finally:
        srv.stop()
