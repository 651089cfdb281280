"""Round-trip latency and CPU per packet at fixed offered rates, and idle CPU: `vdpa-svq serve soft:net`
(default settings: adaptive polling, and --poll-us 0) beside DPDK's vhost PMD forwarding back (issue 15).

    python -m bench.latency [--rates 10000,100000,1000000] [--seconds 3] [--slices 2] [--write BENCHMARKS.md]

The frontend is the project's own (tests/vhost_user/client.py, in Python, pinned to CPU 0 while it
measures): it offers one 64-byte frame every 1/rate seconds on a busy clock and busy-polls the used
rings (it never sleeps on the call eventfd). A frame's round trip runs from just after its descriptor
is made available (before the kick) to the first poll that sees a used RX entry, so it includes the
frontend's kick and up to one turn of its polling loop, but not its frame building or reaping. The
frontend's own work per packet (send + kick + reap) is reported beside it. When the frontend falls
behind its schedule it drops the backlog instead of bursting to catch up, and "offered" says what it
really offered. Cells are interleaved (slice, rate, backend); a cell's percentiles pool its slices.

Idle: each backend with the frontend connected (rings set up, RX buffers posted, a few frames sent
first), then nothing for --idle-seconds: the backend process's CPU share.
"""

from __future__ import annotations

import argparse
import gc
import os
import socket
import sys
import tempfile
import time
from dataclasses import dataclass, field

from bench.vhost_user import VARIANTS_HELP, CpuMeter, backend, machine, serve_variants, stop, write_section
from tests.vhost_user.client import VhostUserFrontend
from vdpa_svq.guest.frames import ETH_HEADER, FRAME_HEADER, build_frame
from vdpa_svq.guest.net import NetDriver
from vdpa_svq.ring import Layout

SERVE = "vdpa-svq serve soft:net"
SERVE_VARIANTS = ";--poll-us 0"  # the serve rows beside DPDK's (--serve)
FRAME = 64
SEQS = 1 << 16  # frames built in advance, one per sequence number mod SEQS (far more than can be in flight)
WARMUP = 0.3  # seconds of traffic at the rate before the counted window
DRAIN = 0.05  # seconds after the window for frames still in flight
FRONTEND_CPU = 0  # DPDK's backend (-l 0,1) forwards on lcore 1; serve is left to the scheduler


@dataclass
class Cell:
    seconds: float = 0.0
    sent: int = 0
    returned: int = 0
    rtts: list[int] = field(default_factory=list)  # ns
    backend_cpu: float = 0.0  # s
    frontend_ns: int = 0  # in send + kick + reap
    late: int = 0  # schedule slots the frontend missed
    kicks: int = 0  # eventfd writes the frontend made (TX and RX refills), when the backend asked for them


def _connect(path: str, timeout: float = 10.0) -> socket.socket:
    deadline = time.monotonic() + timeout
    while True:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            s.connect(path)
            s.settimeout(10)
            return s
        except (ConnectionRefusedError, FileNotFoundError):
            s.close()
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def _seq(frame: bytes) -> int:
    return FRAME_HEADER.unpack_from(frame, ETH_HEADER.size)[1]


def poll_cost(drv: NetDriver, n: int = 20000) -> float:
    """µs of one idle turn of the measuring loop (clock + two has_used): the polling resolution."""
    clock, rx, tx = time.perf_counter_ns, drv.rx, drv.tx
    t0 = clock()
    for _ in range(n):
        if clock() < 0 or rx.has_used() or tx.has_used():
            break
    return (clock() - t0) / n / 1000


def measure(drv: NetDriver, frames: list[bytes], rate: float, seconds: float, meter: CpuMeter, cell: Cell) -> None:
    clock = time.perf_counter_ns
    rx, tx = drv.rx, drv.tx
    period = int(1e9 / rate)
    sent_at: dict[int, int] = {}
    begin = clock()
    t0 = begin + int(WARMUP * 1e9)
    end = t0 + int(seconds * 1e9)
    next_send = begin
    seq = 0
    counting = False
    kicks = 0
    rtts, fe_ns, sent, late = [], 0, 0, 0
    while True:
        now = clock()
        if not counting and now >= t0:
            meter.start()
            counting = True
            kicks = drv.stats.kicks
        if now >= end:
            break
        if now >= next_send:
            if now - next_send >= period:  # behind: drop the backlog, do not burst
                late += (now - next_send) // period
                next_send = now
            k = seq % SEQS
            if drv.send(frames[k]):
                t = clock()
                drv.flush()
                if counting:
                    sent_at[k] = t
                    sent += 1
                    fe_ns += clock() - now
                seq += 1
                next_send += period
        if rx.has_used() or tx.has_used():
            got = clock()
            for frame in drv.reap():
                k = _seq(frame)
                if frame != frames[k]:
                    raise RuntimeError(f"frame {k} came back damaged")
                t = sent_at.pop(k, None)
                if t is not None:
                    rtts.append(got - t)
            if counting:
                fe_ns += clock() - got
    meter.stop()
    kicks = drv.stats.kicks - kicks
    drain = clock() + int(DRAIN * 1e9)
    while sent_at and clock() < drain:  # in flight at the end: still a round trip
        if rx.has_used():
            got = clock()
            for frame in drv.reap():
                t = sent_at.pop(_seq(frame), None)
                if t is not None:
                    rtts.append(got - t)
    cell.seconds += seconds
    cell.sent += sent
    cell.returned += len(rtts)
    cell.rtts += rtts
    cell.backend_cpu += meter.result[1]
    cell.frontend_ns += fe_ns
    cell.late += late
    cell.kicks += kicks


def open_frontend(sock: str, layout: Layout) -> tuple[VhostUserFrontend, NetDriver]:
    fe = VhostUserFrontend(_connect(sock), layout)
    try:
        return fe, fe.setup()
    except BaseException:
        fe.close()
        raise


def run_cell(kind: str, extra: tuple[str, ...], tree: str | None, sock: str, tag: str, layout: Layout,
             frames: list[bytes], rate: float, seconds: float, cell: Cell) -> float:
    """One backend, one frontend, one rate; returns the frontend's idle poll turn (µs)."""
    proc = backend(kind, "soft:net", sock, tag, extra=extra, tree=tree)
    try:
        fe, drv = open_frontend(sock, layout)
        affinity = os.sched_getaffinity(0)
        try:
            if FRONTEND_CPU in affinity and len(affinity) > 1:
                os.sched_setaffinity(0, {FRONTEND_CPU})
            gc.collect()
            gc.disable()  # no collector pause inside the frontend's timings
            turn = poll_cost(drv)
            measure(drv, frames, rate, seconds, CpuMeter(proc.pid), cell)
            return turn
        finally:
            gc.enable()
            os.sched_setaffinity(0, affinity)
            fe.close()
    finally:
        stop(proc)


def idle_cpu(kind: str, extra: tuple[str, ...], tree: str | None, sock: str, tag: str, layout: Layout,
             frames: list[bytes], seconds: float) -> float:
    """Share of a CPU the backend used with the frontend connected and silent for `seconds`, after a
    short burst of traffic (so that an adaptive poller has something to forget)."""
    proc = backend(kind, "soft:net", sock, tag, extra=extra, tree=tree)
    try:
        fe, drv = open_frontend(sock, layout)
        try:
            back = 0
            for k in range(1000):
                while not drv.send(frames[k]):
                    back += len(drv.reap())
                drv.flush()
            deadline = time.monotonic() + 2
            while back < 1000 and time.monotonic() < deadline:
                back += len(drv.reap())
            time.sleep(1.0)
            meter = CpuMeter(proc.pid)
            meter.start()
            time.sleep(seconds)
            meter.stop()
            return meter.result[1] / seconds
        finally:
            fe.close()
    finally:
        stop(proc)


def pct(sorted_ns: list[int], q: float) -> float:
    if not sorted_ns:
        return float("nan")
    return sorted_ns[min(len(sorted_ns) - 1, int(len(sorted_ns) * q))] / 1000


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rates", default="10000,100000,1000000", help="offered packets per second, comma-separated")
    ap.add_argument("--seconds", type=float, default=3.0, help="counted seconds per cell and slice")
    ap.add_argument("--slices", type=int, default=2, help="interleaved passes over every (rate, backend)")
    ap.add_argument("--idle-seconds", type=float, default=10.0)
    ap.add_argument("--layout", choices=["split", "packed"], default="split")
    ap.add_argument("--serve", default=SERVE_VARIANTS, help="the rows of serve: " + VARIANTS_HELP)
    ap.add_argument("--write", metavar="FILE", help="also put the table in FILE, in its own section")
    args = ap.parse_args(argv)
    backends = [("dpdk-vhost", "dpdk-vhost", (), None)] + [
        (label, "serve", extra, tree) for label, extra, tree in serve_variants(args.serve, SERVE)]
    command = " ".join(["python -m bench.latency", *(sys.argv[1:] if argv is None else argv)])
    layout = Layout.PACKED if args.layout == "packed" else Layout.SPLIT
    rates = [float(r) for r in args.rates.split(",") if r]
    mach = machine()
    print(f"{mach}; building frames", file=sys.stderr, flush=True)
    frames = [build_frame(k, FRAME) for k in range(SEQS)]
    cells = {(rate, label): Cell() for rate in rates for label, *_ in backends}
    turns: list[float] = []
    idle: dict[str, float] = {}
    with tempfile.TemporaryDirectory(prefix="vdpa-svq-latency-") as tmp:
        for n in range(args.slices):
            for rate in rates:
                for i, (label, kind, extra, tree) in enumerate(backends):
                    tag = f"{os.getpid()}-{n}-{int(rate)}-{i}"
                    c = cells[(rate, label)]
                    before = (c.sent, c.returned, len(c.rtts))
                    turns.append(run_cell(kind, extra, tree, os.path.join(tmp, f"{tag}.sock"), tag, layout, frames,
                                          rate, args.seconds, c))
                    sent, back = c.sent - before[0], c.returned - before[1]
                    new = sorted(c.rtts[before[2]:])
                    print(f"slice {n}: {rate:>9,.0f} pps  {label:40} offered {sent / args.seconds:>9,.0f} "
                          f"back {back / args.seconds:>9,.0f}  p50 {pct(new, 0.5):7.1f} µs  "
                          f"p99 {pct(new, 0.99):7.1f} µs", file=sys.stderr, flush=True)
        for i, (label, kind, extra, tree) in enumerate(backends):
            tag = f"{os.getpid()}-idle-{i}"
            idle[label] = idle_cpu(kind, extra, tree, os.path.join(tmp, f"{tag}.sock"), tag, layout, frames,
                                   args.idle_seconds)
            print(f"idle: {label:40} {idle[label] * 100:.2f}% of a CPU", file=sys.stderr, flush=True)
    lines = ["| offered pps (asked) | backend | offered pps (reached) | returned pps | RTT p50 µs | RTT p99 µs "
             "| backend CPU µs/packet | frontend µs/packet | kicks/packet |",
             "|---:|---|---:|---:|---:|---:|---:|---:|---:|"]
    for rate in rates:
        for label, *_ in backends:
            c = cells[(rate, label)]
            rtts = sorted(c.rtts)
            per = max(1, c.returned)
            lines.append(f"| {rate:,.0f} | {label} | {c.sent / c.seconds:,.0f} | {c.returned / c.seconds:,.0f} | "
                         f"{pct(rtts, 0.5):.1f} | {pct(rtts, 0.99):.1f} | {c.backend_cpu * 1e6 / per:.2f} | "
                         f"{c.frontend_ns / 1000 / per:.2f} | {c.kicks / max(1, c.sent):.2f} |")
    table = "\n".join(lines)
    turns.sort()
    notes = [f"- The frontend's idle polling turn: {turns[len(turns) // 2]:.2f} µs (median over cells); "
             f"the most it offered in any cell: {max(c.sent / c.seconds for c in cells.values()):,.0f} pps."]
    short = [f"{r:,.0f} pps to {label} ({c.sent / c.seconds:,.0f})" for (r, label), c in cells.items()
             if c.sent < 0.95 * r * c.seconds]
    if short:
        notes.append("- Frontend-bound (offered < 95% of asked): " + "; ".join(short) + ".")
    notes.append(f"- Idle, frontend connected and silent for {args.idle_seconds:g} s: "
                 + ", ".join(f"`{label}` {share * 100:.2f}% of a CPU" for label, share in idle.items()) + ".")
    print("\n" + table + "\n\n" + "\n".join(notes))
    if args.write:
        write_section(args.write, "latency-host", SECTION.format(
            machine=mach, serve=SERVE, command=command, seconds=args.seconds, slices=args.slices,
            layout=args.layout, frame=FRAME, table=table, notes="\n".join(notes)))
        print(f"wrote {args.write}", file=sys.stderr)
    return 0


SECTION = """## Latency and CPU per packet at fixed offered rates, host: `vdpa-svq serve` vs DPDK's vhost PMD

Produced by `{command}` (`make bench-latency` runs it with the default rates). {machine}.
{layout} rings, EVENT_IDX, {frame}-byte frames; {slices} interleaved slices of {seconds:g} s per cell, percentiles
over the pooled round trips of a cell.

- The frontend is the project's own, in Python (tests/vhost_user/client.py), pinned to CPU 0: it offers
  one frame per 1/rate s on a busy clock and busy-polls the used rings (no sleeping on the call eventfd,
  so no guest wake-up is in these figures). Behind its schedule it drops the backlog rather than burst:
  "offered (reached)" is what it really sent, and where that is below the asked rate the cell measures
  the frontend, not the backend.
- Round trip: from just after the frame's descriptor is made available (before the kick) to the first
  poll that sees it used in RX. It includes the frontend's kick (an eventfd write from Python, when the
  backend asked for one) and up to one turn of its polling loop (below), not its frame building or reaping.
- "backend CPU µs/packet": the backend process's CPU time (user + system, all threads) over the counted
  window, per packet returned. DPDK's vhost PMD busy-polls a CPU whatever the rate, so its figure is
  about 1e6 / rate; serve's default sleeps on eventfds between packets.
- "frontend µs/packet": the frontend's own work per packet returned (send, kick, reap and repost):
  what the Python frontend costs, and what bounds the rate it can offer. "kicks/packet": the eventfd
  writes it made (TX, and RX after reposting a buffer) per packet sent, each one a wake-up for a
  backend that sleeps; DPDK's PMD polls and asks for none.
- "dpdk-vhost": a testpmd with DPDK's vhost PMD, io forwarding back (lcore 1). "{serve}": the shadow
  virtqueues (C relay) in front of the software loopback device, with the default adaptive polling
  (`--poll-us auto`); "--poll-us 0": notifications only. serve is not pinned (the frontend has CPU 0).
- Not measured: rates above what the Python frontend can offer (the most it reached is below; rows
  asking for more measure the frontend, and need a native frontend, e.g. testpmd's txonly with
  timestamps), a guest's interrupt path (the frontend never sleeps), a real device (soft:net loops back
  in serve's relay thread). p99 rests on 1% of a cell's samples (rate x seconds x slices) and moves
  between runs, most for a backend that sleeps: its wake-ups pay the host's scheduler (here a container
  in a virtual machine).

{table}

{notes}
"""


if __name__ == "__main__":
    sys.exit(main())
