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
import time
from collections.abc import Sequence

import pytest

from vdpa_svq.vhost_user import testpmd

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
    counts = testpmd.accumulated(log)
    assert counts is not None, f"testpmd printed no accumulated statistics:\n{log[-3000:]}"
    return counts


def run_testpmd(binary: str, sock: str, packed: bool, tag: str, run_s: float = RUN_S,
                timeout_s: float = TIMEOUT_S, peer_mac: str | None = None, burst: int | None = None) -> str:
    """testpmd for `run_s` seconds, then SIGINT; its output. `peer_mac`: the destination of the
    first burst (io mode forwards frames unchanged), for devices that filter on it (vdpa_sim).
    `burst`: testpmd's --burst (frames per burst, and so in flight after --tx-first; default 32)."""
    run = testpmd.run_frontend(sock, packed, run_s, f"vdpasvq-{os.getpid()}-{tag}", peer_mac,
                               start_timeout=timeout_s - run_s, stop_timeout=max(1.0, timeout_s - run_s),
                               binary=binary, burst=burst)
    assert run.started, f"testpmd did not start forwarding within {timeout_s - run_s} s:\n{run.log[-3000:]}"
    return run.log


def port_mac(log: str) -> str:
    """The MAC address testpmd printed for port 0 at start ("Port 0: 52:54:00:12:34:56")."""
    found = re.search(r"^Port 0: ((?:[0-9A-F]{2}:){5}[0-9A-F]{2})$", log, re.MULTILINE)
    assert found, f"testpmd printed no MAC for port 0:\n{log[-3000:]}"
    return found.group(1)


def stop_serve(proc: subprocess.Popen) -> list[dict]:
    """SIGTERM to `vdpa-svq serve --json-stats`; its connection summaries (it must exit cleanly)."""
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    return [json.loads(line) for line in out.splitlines() if line.startswith("{")]


def start_serve(device: str, sock: str, impl: str = "auto", extra: Sequence[str] = ()) -> subprocess.Popen:
    """`vdpa-svq serve DEV --socket SOCK --json-stats --impl IMPL [EXTRA...]`, listening when this returns."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "vdpa_svq.cli", "serve", device, "--socket", sock, "--json-stats", "--impl", impl,
         *extra],
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
