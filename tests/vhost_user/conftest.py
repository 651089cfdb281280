from __future__ import annotations

import socket
import threading
from collections.abc import Iterator
from typing import Any

import pytest

from vdpa_svq.devices import open_device
from vdpa_svq.relay_impl import AVAILABLE_IMPLS
from vdpa_svq.vhost_user.backend import Server


class RunningServer:
    def __init__(self, path: str, impl: str = "auto", device: Any = None, poll_us: int = 0,
                 accept_backoff: bool = False, relay_threads: int | None = None) -> None:
        """`device`: an open device the server takes over (closed by stop()); soft:net by default.
        `poll_us`: the relay loop's busy polling, as `serve --poll-us`. `accept_backoff`: off, so
        that tests of many short connections do not wait between them (tests/vhost_user/test_backoff.py
        tests it)."""
        self.device = open_device("soft:net") if device is None else device
        self.server = Server(self.device, path, impl=impl, poll_us=poll_us, accept_backoff=accept_backoff,
                             relay_threads=relay_threads)
        self.path = path
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def connect(self) -> socket.socket:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.connect(self.path)
        s.settimeout(10)
        return s

    def wait_connections(self, n: int, timeout: float = 10) -> None:
        import time

        deadline = time.monotonic() + timeout
        while self.server.connections < n:
            assert time.monotonic() < deadline, f"{self.server.connections} of {n} connections finished"
            time.sleep(0.01)

    def stop(self) -> None:
        self.server.stop()
        self.thread.join(10)
        assert not self.thread.is_alive()
        self.device.close()


@pytest.fixture
def server(tmp_path) -> Iterator[RunningServer]:
    srv = RunningServer(str(tmp_path / "vu.sock"))
    yield srv
    srv.stop()


@pytest.fixture(params=AVAILABLE_IMPLS)
def server_impl(request, tmp_path) -> Iterator[RunningServer]:
    """The server with each relay implementation that was built (C and the Python reference)."""
    srv = RunningServer(str(tmp_path / "vu.sock"), impl=request.param)
    yield srv
    srv.stop()
