"""Multiqueue scaling: testpmd's virtio-user with 1 and 2 queue pairs through `vdpa-svq serve soft:net,pairs=N`
beside DPDK's vhost PMD with N queue pairs, total and per-queue RX rates (issue 15).

    python -m bench.scaling [--pairs 1,2] [--layouts split] [--slices 3] [--seconds 5] [--serve ';--poll-us 0']
                            [--write BENCHMARKS.md]

The setup, the same for every N and every backend, so that N is the only thing that changes:
- frontend: testpmd virtio-user, `queues=N`, `--rxq=N --txq=N`, io forwarding after a first burst on every
  queue, ONE forwarding lcore on CPU 0 (`-l 0,1 --main-lcore 1 --nb-cores=1`) polling all N queues in turn
  (one stream per queue). Its own cost per packet is then the same for N = 1 and 2, and it never competes
  with itself for a CPU;
- DPDK's vhost PMD (the ceiling): `queues=N`, `--rxq=N --txq=N`, likewise one forwarding lcore (CPU 1) for
  all N queues;
- serve: `soft:net,pairs=N`, not pinned: its relay thread(s) get what the scheduler gives (mostly CPU 1,
  beside the main lcore's sleeps; CPU 0 is the frontend's busy poller). serve runs one relay thread per
  CPU of --cpus, else half the CPUs (here: one thread for every pair); `--serve '--cpus 0,1'` gives it two,
  pinned, the first on the frontend's CPU.
The machine has 2 CPUs and the frontend busy-polls one, so no row can give each queue a CPU on both
sides: the figures say what a second pair costs or gains at a fixed CPU budget (one CPU for the frontend,
about one for the backend), and how evenly the pairs are served, not how far throughput grows with CPUs.

Per queue: the RX packets of each of testpmd's streams (the "Forward Stats for RX Port= 0/Queue= q"
blocks it prints when it stops with more streams than ports) over the forwarding time. "serve CPU
µs/packet": serve's CPU time (all threads) over the counted forwarding per received packet;
"serve threads": the CPU share of each serve thread that used at least 5% of a CPU in that window
(one figure per busy thread, largest first).
Slices are interleaved (slice, N, layout, backend); medians over slices.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from bench.sections import write_section
from bench.vhost_user import VARIANTS_HELP, CpuMeter, backend, machine, serve_variants, stop
from vdpa_svq.vhost_user.testpmd import accumulated, per_queue, run_frontend

DEVICE = "soft:net"
BUSY_THREAD = 0.05  # share of a CPU from which a serve thread counts as busy


def device_for(pairs: int) -> str:
    return DEVICE if pairs == 1 else f"{DEVICE},pairs={pairs}"


def _thread_times(pid: int) -> dict[int, float]:
    """CPU seconds (user + system) of each thread of `pid` so far."""
    out = {}
    tick = os.sysconf("SC_CLK_TCK")
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except FileNotFoundError:
        return out
    for tid in tids:
        try:
            fields = Path(f"/proc/{pid}/task/{tid}/stat").read_text().rsplit(")", 1)[1].split()
        except (FileNotFoundError, ProcessLookupError):
            continue
        out[int(tid)] = (int(fields[11]) + int(fields[12])) / tick
    return out


class Meter(CpuMeter):
    """CpuMeter (the whole process) and, beside it, each thread's CPU share over the window."""

    def __init__(self, pid: int | None) -> None:
        super().__init__(pid)
        self.threads: list[float] = []

    def start(self) -> None:
        super().start()
        self._t = (time.monotonic(), _thread_times(self.relay_pid) if self.relay_pid else {})

    def stop(self) -> None:
        super().stop()
        if not self.relay_pid:
            return
        t1, after = time.monotonic(), _thread_times(self.relay_pid)
        t0, before = self._t
        shares = [(after[tid] - before.get(tid, 0.0)) / max(1e-9, t1 - t0) for tid in after]
        self.threads = sorted((s for s in shares if s >= BUSY_THREAD), reverse=True)


@dataclass
class Cell:
    total: list[float] = field(default_factory=list)  # RX pps per slice
    queues: list[list[float]] = field(default_factory=list)  # per slice: RX pps of each queue
    cpu: list[float] = field(default_factory=list)  # serve CPU µs per received packet, per slice
    threads: list[list[float]] = field(default_factory=list)  # per slice: busy serve threads' CPU shares


def run_cell(kind: str, extra: tuple[str, ...], tree: str | None, pairs: int, packed: bool, seconds: float,
             tmp: str, tag: str, cell: Cell) -> tuple[int, int, float]:
    sock = os.path.join(tmp, f"{tag}.sock")
    proc = backend(kind, device_for(pairs), sock, tag, extra=extra, tree=tree, queues=pairs)
    try:
        meter = Meter(proc.pid if kind != "dpdk-vhost" else None)
        run = run_frontend(sock, packed, seconds, f"fe-{tag}", window=meter, queues=pairs)
    finally:
        stop(proc)
    counts = accumulated(run.log)
    if not (counts and run.started):
        raise RuntimeError(f"testpmd did not forward or printed no statistics:\n{run.log[-2000:]}")
    rx, tx = counts
    secs = run.forwarded
    streams = per_queue(run.log) if pairs > 1 else {0: counts}
    cell.total.append(rx / secs)
    cell.queues.append([streams.get(q, (0, 0))[0] / secs for q in range(pairs)])
    if kind != "dpdk-vhost":
        cell.cpu.append(meter.result[1] / max(rx, 1) * 1e6)
        cell.threads.append(meter.threads)
    return rx, tx, secs


def _median_threads(slices: list[list[float]]) -> str:
    """Busy threads' shares, slice by slice median per rank (the busiest, the next, ...)."""
    if not slices:
        return "-"
    ranks = max(len(s) for s in slices)
    cols = [statistics.median(s[i] if i < len(s) else 0.0 for s in slices) for i in range(ranks)]
    return " / ".join(f"{c:.0%}" for c in cols) or "none busy"


def tables(cells: dict[tuple[int, str, str], Cell], pairs: list[int], layouts: list[str], kinds: list[str],
           slices: int, seconds: float) -> str:
    out = []
    for n in pairs:
        out.append(f"{n} queue pair{'s' if n > 1 else ''} ({slices} slices of {seconds:g} s, median RX pps):\n")
        q_head = " / ".join(f"q{q}" for q in range(n))
        out.append(f"| backend | ring | total RX pps | per queue RX pps ({q_head}) | / dpdk-vhost "
                   "| serve CPU µs/packet | serve threads (CPU share each) |")
        out.append("|---|---|---:|---:|---:|---:|---|")
        for layout in layouts:
            base = statistics.median(cells[(n, layout, kinds[0])].total)
            for kind in kinds:
                c = cells[(n, layout, kind)]
                total = statistics.median(c.total)
                per_q = " / ".join(f"{statistics.median(s[q] for s in c.queues):,.0f}" for q in range(n))
                cpu = f"{statistics.median(c.cpu):.3f}" if c.cpu else "-"
                threads = _median_threads(c.threads) if kind != "dpdk-vhost" else "-"
                out.append(f"| {kind} | {layout} | {total:,.0f} | {per_q} | {total / base:.2f}x | {cpu} | {threads} |")
        out.append("")
    if len(pairs) > 1:
        lo, hi = pairs[0], pairs[-1]
        out.append(f"Total RX at {hi} pairs over {lo} (medians), per backend and ring:")
        for layout in layouts:
            for kind in kinds:
                a = statistics.median(cells[(lo, layout, kind)].total)
                b = statistics.median(cells[(hi, layout, kind)].total)
                out.append(f"- {kind}, {layout}: {b / a:.2f}x")
    return "\n".join(out).rstrip()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pairs", default="1,2", help="queue pairs to measure, comma-separated (default 1,2)")
    ap.add_argument("--layouts", default="split", help="split, packed or both, comma-separated (default split)")
    ap.add_argument("--slices", type=int, default=3)
    ap.add_argument("--seconds", type=float, default=5.0)
    ap.add_argument("--serve", default=";--poll-us 0", help="the rows of serve: " + VARIANTS_HELP)
    ap.add_argument("--write", metavar="FILE", help="also put the tables in FILE, in their own section")
    args = ap.parse_args(argv)
    try:
        pairs = [int(p) for p in args.pairs.split(",") if p]
    except ValueError:
        ap.error(f"--pairs: numbers, comma-separated, not {args.pairs!r}")
    if not pairs or any(p < 1 for p in pairs):
        ap.error(f"--pairs: at least one, each >= 1, not {args.pairs!r}")
    layouts = [x for x in args.layouts.split(",") if x]
    if not layouts or any(x not in ("split", "packed") for x in layouts):
        ap.error(f"--layouts: split and/or packed, not {args.layouts!r}")
    if shutil.which("dpdk-testpmd") is None:
        print("dpdk-testpmd not found: apt-get install -y dpdk-dev", file=sys.stderr)
        return 1
    command = " ".join(["python -m bench.scaling", *(sys.argv[1:] if argv is None else argv)])
    serves = serve_variants(args.serve, f"vdpa-svq serve {DEVICE},pairs=N")
    kinds = ["dpdk-vhost", *(label for label, _, _ in serves)]
    how = {label: ("serve", extra, tree) for label, extra, tree in serves} | {"dpdk-vhost": ("dpdk-vhost", (), None)}
    mach = machine()
    cells = {(n, lay, k): Cell() for n in pairs for lay in layouts for k in kinds}
    with tempfile.TemporaryDirectory(prefix="vdpa-svq-scaling-") as tmp:
        for s in range(args.slices):
            for n in pairs:
                for layout in layouts:
                    for i, kind in enumerate(kinds):
                        backend_kind, extra, tree = how[kind]
                        tag = f"{os.getpid()}-{s}-{n}-{layout}-{i}"
                        c = cells[(n, layout, kind)]
                        rx, tx, secs = run_cell(backend_kind, extra, tree, n, layout == "packed", args.seconds, tmp,
                                                tag, c)
                        queues = " / ".join(f"{q:,.0f}" for q in c.queues[-1])
                        busy = " / ".join(f"{t:.0%}" for t in c.threads[-1]) if c.cpu else "-"
                        print(f"slice {s}: {n} pair(s) {layout:6} {kind:45} RX {rx / secs:>12,.0f} pps "
                              f"(per queue {queues}; serve threads {busy})", file=sys.stderr, flush=True)
    text = tables(cells, pairs, layouts, kinds, args.slices, args.seconds)
    print("\n" + text)
    if args.write:
        write_section(args.write, "scaling-host", SECTION.format(machine=mach, command=command, tables=text))
        print(f"wrote {args.write}", file=sys.stderr)
    return 0


SECTION = """## Multiqueue scaling, host: testpmd virtio-user with N queue pairs, `vdpa-svq serve` vs DPDK's vhost PMD

Produced by `{command}` (`make bench-scaling`). {machine}.

- Every row: testpmd virtio-user with `queues=N`, `--rxq=N --txq=N`, io forwarding after a first burst on
  every queue, one forwarding lcore on CPU 0 polling all N queues (one stream per queue), so the
  frontend's cost per packet is the same for every N. "dpdk-vhost": DPDK's vhost PMD with N queues, one
  forwarding lcore on CPU 1 for all of them (the ceiling). "vdpa-svq serve soft:net,pairs=N": the shadow
  virtqueues in front of the software loopback device with N pairs, serve not pinned.
- 2 CPUs, and the frontend busy-polls one: no row can give each queue pair a CPU on both sides, so these
  figures show what a second pair costs or gains at a fixed CPU budget and how evenly the pairs are
  served, not how throughput grows with CPUs.
- "per queue": the RX packets of each queue's stream (testpmd's per-stream statistics) over the
  forwarding time. "serve CPU µs/packet": serve's CPU time, all threads, per received packet. "serve
  threads": the CPU share of each serve thread busy (>= 5% of a CPU) in the window, largest first (one
  relay thread for all pairs, or one per pair).

{tables}
"""


if __name__ == "__main__":
    sys.exit(main())
