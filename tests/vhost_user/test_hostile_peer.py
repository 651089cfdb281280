"""`serve` against frontends that misbehave (hostile.py): each bad connection ends with a reason,
the next frontend is served, and nothing the bad one made the server hold outlives it."""

from __future__ import annotations

import contextlib
import time

import pytest

from vdpa_svq.ring import Layout
from vdpa_svq.vhost_user.backend import KEPT_SUMMARIES

from .client import VhostUserFrontend
from .hostile import HOSTILE, HUGE_TX, ServeProcess
from .test_backend import loop_frames

# What the server's log says when it closes each one (one line, no traceback).
REASONS = {
    "full pipe as kick fd": "SET_VRING_KICK: queue 0: the fd is a pipe, not an eventfd",
    "pipe as call fd": "SET_VRING_CALL: queue 0: the fd is a pipe, not an eventfd",
    "memfd as kick fd": "SET_VRING_KICK: queue 0: the fd is a memfd:not-an-eventfd, not an eventfd",
    "hung-up socket as kick fd": "SET_VRING_KICK: queue 0: the fd is a socket, not an eventfd",
    "memory truncated under the relay": "guest memory at 0x0",
    "512 MiB TX chain": None,  # not an error: the device drops the frame, as a NIC drops an oversize one
}


@pytest.fixture
def serve(tmp_path):
    proc = ServeProcess(tmp_path)
    yield proc
    proc.stop()


def good_traffic(serve: ServeProcess, layout: Layout, frames: int = 50) -> None:
    fe = VhostUserFrontend(serve.connect(), layout)
    try:
        drv = fe.setup()
        assert sorted(loop_frames(drv, frames)) == list(range(frames))
    finally:
        fe.close()


@pytest.mark.parametrize("layout", [Layout.SPLIT, Layout.PACKED], ids=["split", "packed"])
@pytest.mark.parametrize("case", list(HOSTILE))
def test_a_hostile_frontend_ends_only_its_own_connection(serve, case, layout):
    good_traffic(serve, layout)  # warms up: what the first connection allocates for good
    serve.wait_connections(1)
    before = serve.settled_resources()
    fe = HOSTILE[case](serve.connect(), layout)
    try:
        if REASONS[case] is not None:  # the server hangs up on it
            with contextlib.suppress(ConnectionResetError):
                assert fe.sock.recv(64) == b"", "the server answered instead of closing the connection"
    finally:
        fe.close()
    serve.wait_connections(2)
    good_traffic(serve, layout)  # the next frontend is served as if nothing had happened
    serve.wait_connections(3)
    after = serve.settled_resources()
    log = serve.stderr()
    assert "Traceback" not in log and "internal error" not in log, log
    if REASONS[case] is not None:
        assert "connection 2: closing the connection: " in log and REASONS[case] in log, log
    assert after.fds == before.fds, f"fds {before.fds} -> {after.fds}"
    assert after.threads == before.threads, f"threads {before.threads} -> {after.threads}"
    # Frames, rings and the relay's tables take a few MiB; a staged 512 MiB chain took 808.
    assert after.rss_kib - before.rss_kib < 64 << 10, f"RSS {before.rss_kib} -> {after.rss_kib} KiB"


def test_the_huge_chain_is_dropped_unread(serve):
    """The 512 MiB chain comes back used with nothing written, counted as dropped by the device."""
    fe = HOSTILE["512 MiB TX chain"](serve.connect(), Layout.SPLIT)
    fe.close()
    serve.wait_connections(1)
    assert HUGE_TX > 64 << 20


def test_the_truncated_memory_error_names_the_cause(serve):
    fe = HOSTILE["memory truncated under the relay"](serve.connect(), Layout.SPLIT)
    try:
        deadline = time.monotonic() + 10
        while "shrank under the relay" not in serve.stderr():
            assert time.monotonic() < deadline, serve.stderr()
            time.sleep(0.02)
    finally:
        fe.close()
    line = next(x for x in serve.stderr().splitlines() if "shrank under the relay" in x)
    assert "F_SEAL_SHRINK" in line and "truncate" in line, line


def test_a_connection_loop_does_not_grow_the_server(server):
    """Case 7: a frontend that connects and hangs up in a loop; the server keeps the last
    KEPT_SUMMARIES summaries and counts the rest."""
    n = KEPT_SUMMARIES + 36
    for _ in range(n):
        server.connect().close()
    server.wait_connections(n, timeout=60)
    assert len(server.server.summaries) == KEPT_SUMMARIES
    assert server.server.connections == n
