"""Fuzz target: serve's vhost-user message handler, and the relay it starts, driven by a frontend script.

Input: one byte of options (bit 0: the Python relay instead of C; bit 1: --poll-us auto), then
records, each an op byte and its operands (see encode_* below, which fuzz/make_seeds.py uses):

    MSG    request u16, flags u8, fd mask u8, payload length u16, payload: one message, with the
           pool fds whose bits are set (0 guest memory, 1/2 kick/call of queue 0, 3/4 of queue 1,
           5 a log memfd, 6 a pipe, 7 a small unsealed memfd)
    KICK   queue u8: the frontend's kick eventfd written
    POKE   offset u32, length u16, bytes: written into guest memory (rings, descriptors, frames)
    SETTLE n u8: let the relay thread run for n/2 ms

Each MSG is handled at once by Connection.handle_one in this thread, as serve's loop would. A bug
is: an exception serve would log as an "internal error" (anything but the protocol, backend, OS and
value errors that close a connection with a reason); a sanitizer report from the C relay; or, once
the connection is closed, an fd or a thread more than before it opened.
"""

from __future__ import annotations

import mmap
import os
import socket
import struct
import threading
import time

from fuzz._target import fuzz, instrumented

with instrumented():
    from vdpa_svq.devices import open_device
    from vdpa_svq.errors import VdpaSvqError
    from vdpa_svq.session import DeviceSession
    from vdpa_svq.vhost_user import messages as m
    from vdpa_svq.vhost_user.backend import BackendError, Connection, ConnectionClosed

MEM_SIZE = 0x110000  # the seeds' guest memory: 8-entry rings after their RX/TX buffers (make_seeds.py)
LOG_SIZE = 4096
OP_MSG, OP_KICK, OP_POKE, OP_SETTLE = range(4)
MSG = struct.Struct("<HBBH")
POKE = struct.Struct("<IH")
CLOSES_CONNECTION = (ConnectionClosed, m.ProtocolError, BackendError, OSError, VdpaSvqError, ValueError)

_session: DeviceSession | None = None


def session() -> DeviceSession:
    """One soft:net device for every input, as serve has one for every connection."""
    global _session
    if _session is None:
        _session = DeviceSession(open_device("soft:net"))
    return _session


# -- the input format ------------------------------------------------------------------------------
def encode_msg(request: int, payload: bytes = b"", fds: int = 0, flags: int = m.VERSION) -> bytes:
    return bytes([OP_MSG]) + MSG.pack(request, flags, fds, len(payload)) + payload


def encode_kick(queue: int) -> bytes:
    return bytes([OP_KICK, queue])


def encode_poke(offset: int, data: bytes) -> bytes:
    return bytes([OP_POKE]) + POKE.pack(offset, len(data)) + data


def encode_settle(n: int) -> bytes:
    return bytes([OP_SETTLE, n])


class Script:
    def __init__(self, data: bytes) -> None:
        self.data, self.pos = data, 0

    def take(self, n: int) -> bytes | None:
        if self.pos + n > len(self.data):
            return None
        self.pos += n
        return self.data[self.pos - n : self.pos]


# -- the frontend's side ---------------------------------------------------------------------------
class Pool:
    """The fds a frontend can send; the connection gets duplicates (SCM_RIGHTS), these stay ours."""

    def __init__(self) -> None:
        self.mem_fd = os.memfd_create("fuzz-guest", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        os.ftruncate(self.mem_fd, MEM_SIZE)
        self.mem = mmap.mmap(self.mem_fd, MEM_SIZE)
        log_fd = os.memfd_create("fuzz-log", os.MFD_CLOEXEC)
        os.ftruncate(log_fd, LOG_SIZE)
        small = os.memfd_create("fuzz-small", os.MFD_CLOEXEC)
        os.ftruncate(small, 4096)
        pipe_r, pipe_w = os.pipe()
        evs = [os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK) for _ in range(4)]
        self.fds = [self.mem_fd, *evs, log_fd, pipe_w, small]
        self.kicks = (evs[0], evs[2])
        self.extra = [pipe_r]

    def pick(self, mask: int) -> list[int]:
        return [fd for i, fd in enumerate(self.fds) if mask >> i & 1]

    def close(self) -> None:
        self.mem.close()
        for fd in self.fds + self.extra:
            os.close(fd)


def drain(sock: socket.socket) -> None:
    try:
        while sock.recv(65536):
            pass
    except BlockingIOError:
        pass


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def run(data: bytes) -> None:
    opts, script = data[0], Script(data[1:])
    fds_before, threads_before = open_fds(), threading.active_count()
    pool = Pool()
    frontend, backend = socket.socketpair()
    frontend.setblocking(False)
    conn = Connection(session(), backend, impl="py" if opts & 1 else "c", poll_us="auto" if opts & 2 else 0,
                      peer="fuzz")
    try:
        while (op := script.take(1)) is not None:
            kind = op[0] % 4
            if kind == OP_MSG:
                if (head := script.take(MSG.size)) is None:
                    break
                request, flags, mask, size = MSG.unpack(head)
                payload = script.take(size) or b""
                frame = m.HEADER.pack(request, flags, len(payload)) + payload
                fds = pool.pick(mask)
                anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, struct.pack(f"{len(fds)}i", *fds))] if fds else []
                frontend.sendmsg([frame], anc)
                try:
                    conn.handle_one()
                    conn._check_memory()
                    conn._maybe_sync_log()
                except CLOSES_CONNECTION:
                    break  # serve closes this connection with a reason: not a bug
                drain(frontend)
            elif kind == OP_KICK:
                if (q := script.take(1)) is None:
                    break
                os.eventfd_write(pool.kicks[q[0] % 2], 1)
            elif kind == OP_POKE:
                if (head := script.take(POKE.size)) is None:
                    break
                offset, size = POKE.unpack(head)
                chunk = script.take(size) or b""
                offset %= MEM_SIZE
                chunk = chunk[: MEM_SIZE - offset]
                pool.mem[offset : offset + len(chunk)] = chunk
            else:
                if (n := script.take(1)) is None:
                    break
                time.sleep((n[0] % 8) / 2000)
    finally:
        conn.close()
        frontend.close()
        pool.close()
    leaked = open_fds() - fds_before
    assert leaked <= 0, f"{leaked} fd(s) left open after the connection closed"
    threads = threading.active_count() - threads_before
    assert threads <= 0, f"{threads} thread(s) still running after the connection closed"


def test_one_input(data: bytes) -> None:
    if data:
        run(data)


if __name__ == "__main__":
    fuzz(test_one_input)
