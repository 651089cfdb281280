"""DPDK testpmd with virtio-user as a vhost-user frontend, against `vdpa-svq serve DEV`.

testpmd forwards in io mode after a first TX burst (--tx-first): every frame a loopback device
returns on RX is sent again on TX, so RX and TX counts grow together and differ by the frames in
flight. Needs dpdk-testpmd (Debian dpdk-dev, installed by `make test`): a missing binary FAILS.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time

import pytest

RUN_S = 6  # seconds of traffic per run; the whole run is bounded by TIMEOUT_S
TIMEOUT_S = 20
IN_FLIGHT = 2 * 256 + 32  # both rings' worth of buffers plus the first burst


def find_testpmd() -> str:
    path = shutil.which("dpdk-testpmd")
    if path is None:
        pytest.fail("dpdk-testpmd not found: `apt-get install -y dpdk-dev` (make test installs it)", pytrace=False)
    return path


def accumulated(log: str) -> tuple[int, int]:
    """(RX-packets, TX-packets) from testpmd's "Accumulated forward statistics for all ports"."""
    tail = log.split("Accumulated forward statistics", 1)
    assert len(tail) == 2, f"testpmd printed no accumulated statistics:\n{log[-3000:]}"
    rx = re.search(r"RX-packets:\s+(\d+)", tail[1])
    tx = re.search(r"TX-packets:\s+(\d+)", tail[1])
    assert rx and tx, tail[1][:500]
    return int(rx.group(1)), int(tx.group(1))


def run_testpmd(binary: str, sock: str, packed: bool, tag: str, run_s: float = RUN_S,
                timeout_s: float = TIMEOUT_S, peer_mac: str | None = None) -> str:
    """testpmd for `run_s` seconds, then SIGINT; its output. `peer_mac`: the destination of the
    first burst (io mode forwards frames unchanged), for devices that filter on it (vdpa_sim)."""
    cmd = [
        binary, "-l", "0,1", "--main-lcore", "1", "--no-huge", "-m", "512", "--no-pci",
        f"--file-prefix=vdpasvq-{os.getpid()}-{tag}",
        "--vdev", f"net_virtio_user0,path={sock},queues=1,packed_vq={int(packed)},server=0",
        "--", "--forward-mode=io", "--tx-first", "--stats-period", "1", "--nb-cores=1",
        "--total-num-mbufs=16384",
    ]
    if peer_mac is not None:
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
    started = time.monotonic()
    try:
        # EAL start-up takes seconds under TCG: count the run from when forwarding starts.
        if forwarding.wait(timeout_s - run_s):
            time.sleep(run_s)
        proc.send_signal(signal.SIGINT)  # testpmd stops forwarding and prints its statistics
        proc.wait(max(1.0, timeout_s - (time.monotonic() - started)))
    except BaseException:
        proc.kill()
        proc.wait()
        raise
    finally:
        reader.join(5)
    out = "".join(lines)
    assert forwarding.is_set(), f"testpmd did not start forwarding within {timeout_s - run_s} s:\n{out[-3000:]}"
    return out


def start_serve(device: str, sock: str, impl: str = "auto") -> subprocess.Popen:
    """`vdpa-svq serve DEV --socket SOCK --json-stats --impl IMPL`, listening when this returns."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "vdpa_svq.cli", "serve", device, "--socket", sock, "--json-stats", "--impl", impl],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    deadline = time.monotonic() + 60
    while not os.path.exists(sock):
        assert proc.poll() is None, f"vdpa-svq serve exited: {proc.communicate()}"
        assert time.monotonic() < deadline, "vdpa-svq serve did not listen within 60 s"
        time.sleep(0.05)
    return proc


def split_then_packed(binary: str, sock: str, proc: subprocess.Popen, run_s: float = RUN_S,
                      timeout_s: float = TIMEOUT_S, peer_mac: str | None = None) -> dict[str, tuple[int, int]]:
    """testpmd split, then packed (a reconnect); checks counts and the server's JSON summaries."""
    counts = {}
    for packed in (False, True):
        tag = "packed" if packed else "split"
        log = run_testpmd(binary, sock, packed, tag, run_s, timeout_s, peer_mac)
        rx, tx = accumulated(log)
        counts[tag] = (rx, tx)
        print(f"testpmd {tag}: RX {rx}, TX {tx} in {run_s} s ({rx / run_s:,.0f} pps)")
        if not rx:
            proc.kill()
            out, err = proc.communicate()
            pytest.fail(f"{tag}: testpmd received nothing (TX {tx})\n{log[-2000:]}\nvdpa-svq serve:\n{out}\n{err}")
        assert tx > 0, log[-3000:]
        assert 0 <= tx - rx <= IN_FLIGHT, f"{tag}: RX {rx} and TX {tx} differ by more than the in-flight window"
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    assert " stopped: " not in err, f"the relay stopped a queue:\n{err}"
    summaries = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    assert [s["guest_layout"] for s in summaries] == ["split", "packed"], out + err
    for s, (tag, (rx, tx)) in zip(summaries, counts.items(), strict=True):
        assert s["error"] is None, s
        # The relay returned at least what testpmd counted.
        assert s["queues"]["0"]["returned"] >= rx and s["queues"]["1"]["returned"] >= tx - IN_FLIGHT, (tag, s)
    return counts
