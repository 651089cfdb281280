"""A serve-to-serve handover, as QEMU does it at a live migration's switchover: the frontend's guest
(memory, rings, driver) stays; the backend under it changes from serve A to serve B.

A stops when the frontend asks each ring's base (GET_VRING_BASE: A suspends the device, returns the
buffers it finished, rewinds those it had not, and syncs the dirty log before it answers). B gets
the same memory table and rings with SET_VRING_BASE from what A returned (packed: avail and used
halves, each with its wrap counter), the same kick and call eventfds, and enables them.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field

from tests.vhost_user.client import UADDR_OFFSET, VhostUserFrontend
from vdpa_svq.guest.frames import build_frame, parse_frame
from vdpa_svq.guest.net import NetDriver
from vdpa_svq.ring import Layout, RingState
from vdpa_svq.vhost_user import messages as m
from vdpa_svq.vhost_user.messages import Request

TIMEOUT = 60.0  # TCG: slow, never this slow
START_S = 120.0  # a Python process's start in the TCG guest, on a host busy with other work
NUM = 64  # ring size: the traffic below wraps the packed rings' counters
BEFORE = 70  # frames looped through A first: past one lap of a 64-entry ring, short of two
KICKED, UNKICKED = 24, 8  # then in flight at the switchover: sent and kicked, and only made available
LEFT_FOR_B = 8  # kicked once A stopped: frames A never took, waiting for B with their kick pending
TOTAL = 4 * NUM  # frames in all: B's part wraps the rings again


def connect(path: str) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect(path)
    s.settimeout(TIMEOUT)
    return s


class Serve:
    """`vdpa-svq serve DEV --json-stats` in its own process, as each side of a migration runs it."""

    def __init__(self, device: str, path: str) -> None:
        self.device, self.path = device, path
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "vdpa_svq.cli", "serve", device, "--socket", path, "--json-stats"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self.summaries: list[dict] = []
        self.stderr = ""
        self.stopped = False
        deadline = time.monotonic() + START_S
        while not os.path.exists(path):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                if self.proc.poll() is None:
                    self.proc.kill()
                _, self.stderr = self.proc.communicate()
                raise AssertionError(f"serve on {device} did not listen within {START_S} s: {self.stderr}")
            time.sleep(0.05)

    def kill(self) -> None:
        """Whatever happened, no serve outlives its test (it would hold the device)."""
        if self.proc.poll() is None:
            self.proc.kill()
            _, self.stderr = self.proc.communicate()

    def stop(self) -> list[dict]:
        """SIGTERM, then the summary of every connection it served (one JSON line each). Once."""
        if self.stopped:
            return self.summaries
        self.stopped = True
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            out, self.stderr = self.proc.communicate(timeout=TIMEOUT)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            out, self.stderr = self.proc.communicate()
            raise AssertionError(f"serve on {self.device} did not stop on SIGTERM: {self.stderr}") from None
        assert self.proc.returncode == 0, f"serve on {self.device} exited {self.proc.returncode}: {self.stderr}"
        self.summaries = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
        return self.summaries


def frame(seq: int) -> bytes:
    return build_frame(seq, 60 + (seq * 29) % 1400)


@dataclass
class Traffic:
    """Frames whose every byte derives from a sequence number, looped back by vdpa_sim."""

    drv: NetDriver
    sent: int = 0
    seqs: list[int] = field(default_factory=list)  # every frame received, in order, repeats included

    def send(self, count: int, *, kick: bool = True) -> None:
        """Queue `count` more frames (the TX ring must have room); kick unless told not to."""
        for _ in range(count):
            assert self.drv.send(frame(self.sent)), "TX ring full"
            self.sent += 1
        if kick:
            self.drv.flush()

    def room(self) -> int:
        """Frames the TX ring surely takes now (each is at most a header and a frame descriptor)."""
        return min(self.drv.tx_pool.available, self.drv.tx.num_free // 2)

    def reap(self) -> None:
        """Take back what the device finished; parse_frame raises FrameError on a damaged frame."""
        for frame in self.drv.reap():
            seq = parse_frame(frame)
            assert seq is not None, f"a foreign frame: {frame[:20].hex()}"
            self.seqs.append(seq)

    def run_until(self, total: int, *, batch: int = 16) -> None:
        """Send up to `total` frames, a batch at a time, until every one sent came back."""
        deadline = time.monotonic() + TIMEOUT
        while len(self.seqs) < total or self.drv.stats.tx_done < self.sent:
            assert time.monotonic() < deadline, (
                f"{len(self.seqs)} of {total} frames came back, {self.drv.stats.tx_done} of {self.sent} sent done; "
                f"missing {sorted(set(range(self.sent)) - set(self.seqs))[:10]}")
            for _ in range(min(batch, total - self.sent)):
                if not self.drv.send(frame(self.sent)):
                    break  # the TX ring is full: reap first
                self.sent += 1
            self.drv.flush()
            self.reap()
            if len(self.seqs) < total:
                self.drv.wait(0.05)

    def check_exactly_once(self) -> None:
        repeated = sorted({s for s in self.seqs if self.seqs.count(s) > 1})
        missing = sorted(set(range(self.sent)) - set(self.seqs))
        assert not repeated and not missing, f"repeated {repeated[:10]}, missing {missing[:10]} of {self.sent}"
        assert self.drv.stats.tx_done == self.sent


def stop_rings(fe: VhostUserFrontend) -> list[int]:
    """QEMU's vhost_virtqueue_stop for every ring: GET_VRING_BASE, queue 0 first."""
    return [fe.get_vring_base(i) for i in range(2)]


def stop_mid_traffic(fe: VhostUserFrontend) -> tuple[Traffic, list[int]]:
    """Set the rings up on A (fe's connection), loop BEFORE frames, send KICKED frames with a kick and
    UNKICKED more without one, and stop A's rings right away; then take back what A finished before
    it answered, and send LEFT_FOR_B frames that only B can take (as frames the guest kicked while
    A was stopping). The traffic, and the bases A returned."""
    drv = fe.setup()
    drv.rx_spans = []
    t = Traffic(drv)
    t.run_until(BEFORE)
    t.send(KICKED)
    t.send(UNKICKED, kick=False)
    bases = stop_rings(fe)
    t.reap()
    t.send(min(LEFT_FOR_B, t.room()))  # none when A took nothing: then its frames wait for B
    return t, bases


def driver_position(fe: VhostUserFrontend, index: int) -> RingState:
    """Where the frontend's driver expects the device's next used buffer, as a rewound RingState
    (avail = used): what a backend that stopped with nothing in flight must return."""
    ring = fe.rings[index]
    if fe.layout is Layout.SPLIT:
        return RingState(ring.last_used_idx, ring.last_used_idx)
    return RingState(ring.last_used_idx, ring.last_used_idx, ring.used_wrap_counter, ring.used_wrap_counter)


def resume_on(fe: VhostUserFrontend, sock: socket.socket, bases: list[int]) -> None:
    """The destination's vhost_dev_start on the same guest: features (no dirty log there), memory
    table, then each ring at `bases` with the same kick and call eventfds, enabled."""
    fe.sock = sock
    fe.log_all = False
    fe.negotiate()
    (region,) = fe.mem.regions
    table = m.MemTable((m.MemRegion(region.gpa, region.size, region.gpa + UADDR_OFFSET, 0),))
    fe.ack(Request.SET_MEM_TABLE, table.encode(), [region.fd])
    for i in range(2):
        addrs = fe.plan.rings[i]
        u = UADDR_OFFSET
        fe.ack(Request.SET_VRING_NUM, m.VringState(i, fe.num).encode())
        fe.ack(Request.SET_VRING_BASE, m.VringState(i, bases[i]).encode())
        fe.ack(Request.SET_VRING_ADDR, m.VringAddr(i, 0, addrs.desc + u, addrs.device + u, addrs.driver + u,
                                                   addrs.device).encode())
        fe.ack(Request.SET_VRING_CALL, m.U64.pack(i), [fe.call_fds[i]])
        fe.ack(Request.SET_VRING_KICK, m.U64.pack(i), [fe.kick_fds[i]])
    for i in range(2):
        fe.ack(Request.SET_VRING_ENABLE, m.VringState(i, 1).encode())


def pages(spans) -> set[int]:
    return {p for gpa, n in spans for p in range(gpa >> 12, (gpa + n - 1 >> 12) + 1)}


def used_entry_pages(fe: VhostUserFrontend, index: int) -> set[int]:
    """Pages the device writes used entries to: split's used ring (the device area), packed's
    descriptor ring (VIRTIO 1.2 2.7.8, 2.8.4)."""
    addrs = fe.plan.rings[index]
    if fe.layout is Layout.SPLIT:
        return pages([(addrs.device, 4 + 8 * fe.num)])
    return pages([(addrs.desc, 16 * fe.num)])

