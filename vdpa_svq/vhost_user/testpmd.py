"""DPDK testpmd's virtio-user as a vhost-user frontend (or straight on /dev/vhost-vdpa-N): one run.

io forwarding after a first burst (--tx-first); the run counts from "start packet forwarding" (EAL
start-up takes seconds, tens under TCG), then SIGINT makes testpmd print its accumulated statistics.
Used by the vhost-user benchmark and by the tests.
"""

from __future__ import annotations

import re
import signal
import subprocess
import threading
import time
from dataclasses import dataclass
from typing import Protocol

EAL = ["--no-huge", "-m", "512", "--no-pci"]
# --stats-period keeps testpmd forwarding until a signal (without it, it exits when stdin ends).
TESTPMD_ARGS = ["--forward-mode=io", "--nb-cores=1", "--total-num-mbufs=16384", "--stats-period", "1"]


def queue_args(queues: int) -> list[str]:
    """testpmd's own arguments for `queues` RX and TX queues per port (none for 1, its default). One
    forwarding lcore (--nb-cores=1) then polls every queue: one stream per queue."""
    return [f"--rxq={queues}", f"--txq={queues}"] if queues > 1 else []


class Window(Protocol):
    def start(self) -> None: ...
    def stop(self) -> None: ...


@dataclass
class FrontendRun:
    log: str
    forwarded: float  # seconds between "start packet forwarding" and SIGINT; 0 when it never started

    @property
    def started(self) -> bool:
        return self.forwarded > 0


def run_frontend(path: str, packed: bool, seconds: float, prefix: str, peer_mac: str | None = None, *,
                 start_timeout: float = 60.0, stop_timeout: float = 30.0,
                 binary: str = "dpdk-testpmd", burst: int | None = None,
                 window: Window | None = None, tx_first: bool = True, queues: int = 1) -> FrontendRun:
    """testpmd virtio-user on `path` (a vhost-user socket, or a /dev/vhost-vdpa-N node) for about
    `seconds` of forwarding. `peer_mac`: the destination of the first burst, for devices that filter
    on it (vdpa_sim); io mode forwards frames unchanged after that. `window` is told when the
    forwarding that is counted starts and ends (a meter of CPU time, say). Without `tx_first`
    nothing is ever sent: the rings are set up and stay idle (for a backend's idle cost). `queues`:
    queue pairs (virtio-user negotiates MQ and enables them through its control queue)."""
    vdev = f"net_virtio_user0,path={path},queues={queues},packed_vq={int(packed)}"
    if not path.startswith("/dev/"):
        vdev += ",server=0"
    cmd = [binary, "-l", "0,1", "--main-lcore", "1", *EAL, f"--file-prefix={prefix}",
           "--vdev", vdev, "--", *TESTPMD_ARGS, *queue_args(queues), *(["--tx-first"] if tx_first else [])]
    if burst is not None:  # packets per burst, and so in flight after --tx-first (testpmd's default: 32)
        cmd.append(f"--burst={burst}")
    if peer_mac:
        cmd.append(f"--eth-peer=0,{peer_mac}")
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines: list[str] = []
    forwarding = threading.Event()

    def read() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.append(line)
            if "start packet forwarding" in line:
                forwarding.set()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    forwarded = 0.0
    try:
        if forwarding.wait(start_timeout):
            t0 = time.monotonic()
            if window is not None:
                window.start()
            time.sleep(seconds)
            forwarded = time.monotonic() - t0
            if window is not None:
                window.stop()
        proc.send_signal(signal.SIGINT)  # testpmd stops forwarding and prints its statistics
        try:
            proc.wait(stop_timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    except BaseException:
        proc.kill()
        proc.wait()
        raise
    finally:
        reader.join(5)
    return FrontendRun("".join(lines), forwarded)


def accumulated(log: str) -> tuple[int, int] | None:
    """(RX-packets, TX-packets) from testpmd's "Accumulated forward statistics for all ports", or None."""
    tail = log.split("Accumulated forward statistics", 1)
    if len(tail) != 2:
        return None
    rx = re.search(r"RX-packets:\s+(\d+)", tail[1])
    tx = re.search(r"TX-packets:\s+(\d+)", tail[1])
    return (int(rx.group(1)), int(tx.group(1))) if rx and tx else None


STREAM = re.compile(r"Forward Stats for RX Port=\s*(\d+)/Queue=\s*(\d+) -> TX Port=\s*\d+/Queue=\s*\d+ -+\s*"
                    r"RX-packets:\s+(\d+)\s+TX-packets:\s+(\d+)")


def per_queue(log: str) -> dict[int, tuple[int, int]]:
    """{RX queue: (RX-packets, TX-packets)} of port 0, from the per-stream statistics testpmd prints when it
    stops with more streams than ports (io mode: stream q receives on queue q and sends on queue q).
    testpmd leaves out a stream that moved nothing; with one queue it prints none (see accumulated())."""
    out: dict[int, tuple[int, int]] = {}
    for port, queue, rx, tx in STREAM.findall(log):
        if int(port) == 0:
            out[int(queue)] = (int(rx), int(tx))
    return out
