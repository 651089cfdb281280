"""Frontends that misbehave, one function each: what once hung, froze, killed or leaked `serve`.

Each takes a connected socket, does its one bad thing as an attacker would, and returns the
frontend (the caller closes it). The server must end that connection with a reason and go on
serving the next one; nothing it holds for the connection may outlive it. `serve` as a separate
process (ServeProcess) is the thing under test: a SIGBUS or a frozen message thread would kill or
hang a test process that ran the server in a thread.
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from vdpa_svq.ring import Layout

from .client import VhostUserFrontend

HUGE_TX = 512 << 20  # one TX chain this long, in two segments


def _full_pipe(queue: int) -> int:
    """The write end of a pipe nobody reads, filled up, left blocking: a write to it never returns."""
    r, w = os.pipe()
    os.set_blocking(w, False)
    with contextlib.suppress(BlockingIOError):
        while True:
            os.write(w, bytes(65536))
    os.set_blocking(w, True)
    _keep.append(r)  # the read end stays open (else writes fail with EPIPE instead of blocking)
    return w


def _memfd(queue: int) -> int:
    return os.memfd_create("not-an-eventfd", os.MFD_CLOEXEC)


def _hung_up_socket(queue: int) -> int:
    a, b = socket.socketpair()
    b.close()  # a reads 0 bytes forever, and epoll reports EPOLLHUP
    return a.detach()


_keep: list[int] = []  # read ends of the full pipes, closed by close_kept()


def close_kept() -> None:
    while _keep:
        os.close(_keep.pop())


def _setup_expecting_refusal(fe: VhostUserFrontend) -> VhostUserFrontend:
    with contextlib.suppress(ConnectionError, AssertionError, OSError):
        fe.setup()
    return fe


def full_pipe_kick(sock: socket.socket, layout: Layout) -> VhostUserFrontend:
    """Case 1: the kick "eventfd" is a full blocking pipe (serve writes kicks at start)."""
    return _setup_expecting_refusal(VhostUserFrontend(sock, layout, make_kick_fd=_full_pipe))


def pipe_call(sock: socket.socket, layout: Layout) -> VhostUserFrontend:
    """Case 2: the call "eventfd" is a pipe nobody reads (the relay writes an interrupt per burst)."""
    return _setup_expecting_refusal(VhostUserFrontend(sock, layout, make_call_fd=_full_pipe))


def memfd_kick(sock: socket.socket, layout: Layout) -> VhostUserFrontend:
    """Case 3: the kick "eventfd" is a memfd, which epoll cannot watch."""
    return _setup_expecting_refusal(VhostUserFrontend(sock, layout, make_kick_fd=_memfd))


def hung_up_kick(sock: socket.socket, layout: Layout) -> VhostUserFrontend:
    """Case 5: the kick "eventfd" is a socket whose peer hung up (readable, 0 bytes, forever)."""
    return _setup_expecting_refusal(VhostUserFrontend(sock, layout, make_kick_fd=_hung_up_socket))


def shrunk_memory(sock: socket.socket, layout: Layout) -> VhostUserFrontend:
    """Case 4: the frontend truncates its memory file once the relay runs, then sends traffic."""
    fe = VhostUserFrontend(sock, layout)
    drv = fe.setup()
    (region,) = fe.mem.regions
    os.ftruncate(region.fd, 0)  # our own accesses would SIGBUS too now: from here, only kicks
    for i in range(2):
        os.eventfd_write(fe.kick_fds[i], 1)
    del drv
    return fe


def huge_tx_chain(sock: socket.socket, layout: Layout) -> VhostUserFrontend:
    """Case 6: one TX chain of HUGE_TX bytes in two segments (sparse memory: costs us nothing)."""
    fe = VhostUserFrontend(sock, layout, extra_memory=HUGE_TX)
    fe.setup()
    base, half = fe.plan.size, HUGE_TX // 2
    fe.rings[1].add([(base, half), (base + half, half)], token="huge")
    if fe.rings[1].kick_needed():
        os.eventfd_write(fe.kick_fds[1], 1)
    deadline = time.monotonic() + 30
    while fe.rings[1].get_used() is None:  # the device completes it (dropped): it was not held
        assert time.monotonic() < deadline, "the huge TX chain was never completed"
        time.sleep(0.01)
    return fe


HOSTILE: dict[str, Callable[[socket.socket, Layout], VhostUserFrontend]] = {
    "full pipe as kick fd": full_pipe_kick,
    "pipe as call fd": pipe_call,
    "memfd as kick fd": memfd_kick,
    "hung-up socket as kick fd": hung_up_kick,
    "memory truncated under the relay": shrunk_memory,
    "512 MiB TX chain": huge_tx_chain,
}


@dataclass
class Resources:
    fds: int
    threads: int
    rss_kib: int


class ServeProcess:
    """`vdpa-svq serve soft:net` in a process of its own, its output in files (a pipe nobody reads
    would fill up and stall its logging)."""

    def __init__(self, tmp: Path, *extra: str) -> None:
        self.sock = str(tmp / "serve.sock")
        self.out_path, self.err_path = tmp / "serve.out", tmp / "serve.err"
        with open(self.out_path, "w") as out, open(self.err_path, "w") as err:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "vdpa_svq.cli", "serve", "soft:net", "--socket", self.sock, "--json-stats",
                 *extra], stdout=out, stderr=err)
        deadline = time.monotonic() + 60
        while not os.path.exists(self.sock):
            assert self.proc.poll() is None, f"serve exited: {self.stderr()}"
            assert time.monotonic() < deadline, "serve did not listen within 60 s"
            time.sleep(0.05)

    def connect(self) -> socket.socket:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.connect(self.sock)
        s.settimeout(10)
        return s

    def stderr(self) -> str:
        return self.err_path.read_text()

    def summaries(self) -> int:
        """Connections the server finished (one JSON line each)."""
        return sum(line.startswith("{") for line in self.out_path.read_text().splitlines())

    def wait_connections(self, n: int, timeout: float = 20) -> None:
        deadline = time.monotonic() + timeout
        while self.summaries() < n:
            assert self.proc.poll() is None, f"serve died (exit {self.proc.returncode}): {self.stderr()[-2000:]}"
            assert time.monotonic() < deadline, (
                f"serve finished {self.summaries()} of {n} connections in {timeout} s: {self.stderr()[-2000:]}")
            time.sleep(0.02)

    def settled_resources(self, timeout: float = 5, still: float = 0.2) -> Resources:
        """resources() once fds and threads stayed the same for `still` seconds: a finished
        connection's threads may still be exiting when its summary line is written (joined in
        Python, not yet gone from /proc), and a leak is what stays, not what is on its way out."""
        deadline = time.monotonic() + timeout
        last, since = self.resources(), time.monotonic()
        while time.monotonic() < deadline:
            time.sleep(0.02)
            now = self.resources()
            if (now.fds, now.threads) != (last.fds, last.threads):
                last, since = now, time.monotonic()
            elif time.monotonic() - since >= still:
                return now
        return last

    def resources(self) -> Resources:
        pid = self.proc.pid
        status = Path(f"/proc/{pid}/status").read_text()
        rss = int(status.split("VmRSS:")[1].split()[0])
        return Resources(len(os.listdir(f"/proc/{pid}/fd")), len(os.listdir(f"/proc/{pid}/task")), rss)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        close_kept()
