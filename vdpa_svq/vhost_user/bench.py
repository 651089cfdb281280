"""vhost-user throughput: DPDK testpmd's virtio-user through `vdpa-svq serve DEV`, beside DPDK's own
vhost PMD as the backend (no shadow relay, no device: the ceiling of the frontend on this machine).

Both backends loop frames back (soft:net and vdpa_sim net are loopback devices; the DPDK backend
forwards in io mode), the frontend forwards in io mode after a first burst. Slices are interleaved
(backend, layout, backend, layout, ...) and medians reported, because rates on a shared machine
swing widely within one run.

    python -m vdpa_svq.vhost_user.bench [--device soft:net] [--slices 3] [--seconds 5]
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time

EAL = ["--no-huge", "-m", "512", "--no-pci"]
# --stats-period keeps testpmd forwarding until a signal (without it, it exits when stdin ends).
TESTPMD_ARGS = ["--forward-mode=io", "--nb-cores=1", "--total-num-mbufs=16384", "--stats-period", "1"]


def _wait_socket(path: str, proc: subprocess.Popen, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not os.path.exists(path):
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"backend did not listen on {path}: {proc.communicate()[0][-2000:]}")
        time.sleep(0.05)


def frontend(sock: str, packed: bool, seconds: float, tag: str, peer_mac: str | None) -> tuple[int, int]:
    """(RX, TX) packets of one testpmd virtio-user run of `seconds` of forwarding."""
    cmd = ["dpdk-testpmd", "-l", "0,1", "--main-lcore", "1", *EAL, f"--file-prefix=fe-{tag}",
           "--vdev", f"net_virtio_user0,path={sock},queues=1,packed_vq={int(packed)},server=0",
           "--", *TESTPMD_ARGS, "--tx-first"]
    if peer_mac:
        cmd.append(f"--eth-peer=0,{peer_mac}")
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines: list[str] = []
    started = threading.Event()

    def read() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.append(line)
            if "start packet forwarding" in line:
                started.set()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    if started.wait(60):
        time.sleep(seconds)
    proc.send_signal(signal.SIGINT)
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    reader.join(5)
    out = "".join(lines).split("Accumulated forward statistics", 1)
    rx = re.search(r"RX-packets:\s+(\d+)", out[-1]) if len(out) == 2 else None
    tx = re.search(r"TX-packets:\s+(\d+)", out[-1]) if len(out) == 2 else None
    if not (rx and tx):
        raise RuntimeError(f"testpmd printed no statistics:\n{''.join(lines)[-2000:]}")
    return int(rx.group(1)), int(tx.group(1))


def backend(kind: str, device: str, sock: str, tag: str) -> subprocess.Popen:
    if kind == "dpdk-vhost":
        cmd = ["dpdk-testpmd", "-l", "0,1", *EAL, f"--file-prefix=be-{tag}",
               "--vdev", f"net_vhost0,iface={sock},queues=1", "--", *TESTPMD_ARGS]
    else:
        cmd = [sys.executable, "-m", "vdpa_svq.cli", "serve", device, "--socket", sock]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    _wait_socket(sock, proc, 60)
    return proc


def stop(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGINT)
    try:
        proc.communicate(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="soft:net", help="DEV for vdpa-svq serve (default soft:net)")
    ap.add_argument("--slices", type=int, default=3)
    ap.add_argument("--seconds", type=float, default=5.0)
    ap.add_argument("--peer-mac", default=None, help="first burst's destination (vdpa_sim filters on its MAC)")
    args = ap.parse_args(argv)
    if shutil.which("dpdk-testpmd") is None:
        print("dpdk-testpmd not found: apt-get install -y dpdk-dev", file=sys.stderr)
        return 1
    kinds = ("dpdk-vhost", f"vdpa-svq serve {args.device}")
    rates: dict[tuple[str, str], list[float]] = {}
    with tempfile.TemporaryDirectory(prefix="vdpa-svq-bench-") as tmp:
        for n in range(args.slices):
            for kind in kinds:
                for packed in (False, True):
                    layout = "packed" if packed else "split"
                    tag = f"{os.getpid()}-{n}-{kinds.index(kind)}-{layout}"
                    sock = os.path.join(tmp, f"{tag}.sock")
                    be = backend(kind, args.device, sock, tag)
                    try:
                        rx, tx = frontend(sock, packed, args.seconds, tag, args.peer_mac)
                    finally:
                        stop(be)
                    rates.setdefault((kind, layout), []).append(rx / args.seconds)
                    print(f"slice {n}: {kind:28} {layout:6} RX {rx:>10} TX {tx:>10}  {rx / args.seconds:>12,.0f} pps",
                          file=sys.stderr)
    print(f"\n| backend ({args.slices} slices of {args.seconds:g} s, median RX pps) | split | packed |")
    print("|---|---:|---:|")
    for kind in kinds:
        cells = [f"{statistics.median(rates[(kind, lay)]):,.0f}" for lay in ("split", "packed")]
        print(f"| {kind} | {cells[0]} | {cells[1]} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
