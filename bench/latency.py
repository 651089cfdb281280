"""Round-trip latency and CPU per packet at fixed offered rates, and idle CPU: `vdpa-svq serve soft:net`
(default settings: adaptive polling, and --poll-us 0) beside DPDK's vhost PMD forwarding back (issue 15).

    python -m bench.latency [--rates 10000,100000,1000000] [--burst auto|K] [--seconds 3] [--slices 2]
                            [--frontend c|py] [--write BENCHMARKS.md]

The frontend is the project's own (tests/vhost_user/client.py sets up memory, rings and notifiers;
pinned to CPU 0 while it measures): on a busy clock it offers a burst of K 64-byte frames every K/rate
seconds, with one kick per burst (when the backend asked for one), and busy-polls the used rings (it
never sleeps on the call eventfd). Its datapath, measure()'s loop, runs in C by default
(vdpa_svq/guest/_burst.c through guest/burst.py: measure_c(), the GIL released for the whole run,
the same schedule, counts and checks); `--frontend py` runs measure() itself, in Python, whose
per-tick cost tops out near 44k pps. K is --burst; "auto" sends one frame at a time up to
ONE_BY_ONE pps and K = ceil(rate / ONE_BY_ONE) above it (at most 32, DPDK's default burst, as its
txonly engine sends): one frame at a time, Python's per-tick cost (clock, loop turn, kick) caps the
rate near 20k pps on a quiet machine. The table says which frontend ran.

A frame's round trip runs from just after its own descriptor is made available (before the rest of its
burst and the kick) to the first poll that sees it used in RX, so it includes the frontend's kick and
up to one turn of its polling loop, but not its frame building or reaping. How the burst shapes it: the
backend sees the frames of a burst together and returns them in order, so frame i of a burst also
waits for the i-1 before it; and the frontend polls only after posting the whole burst, so a frame
that came back early is seen only then (up to K-1 sends later; the frontend's cost per packet is in the
table). So at K > 1 the percentiles are those of a bursty source, as with DPDK's txonly, not of evenly
spaced frames; K is in the table beside each cell.

The frontend's own work per packet (send + kick + reap) is reported beside it; the Python ring code
costs tens of µs per frame, so bursts lift the rate it can offer only so far (the kick and the loop
are shared, the ring operations are not); the C loop's costs well under a µs. When it falls behind
its schedule it drops the backlog instead of bursting to catch up; "offered" and "returned" say what
it really sent and got back, and a cell below HELD of its rate (offered, or returned of those
offered) says "not held" in its RTT cells, with the reason in the notes: its figures are at the rate
reached, not the one asked. Cells are interleaved (slice, rate, backend); a cell's percentiles pool
its slices.

Idle: each backend with the frontend connected (rings set up, RX buffers posted, a few frames sent
first), then nothing for --idle-seconds: the backend process's CPU share.
"""

from __future__ import annotations

import argparse
import gc
import math
import os
import socket
import sys
import tempfile
import time
from dataclasses import dataclass, field

from bench.sections import write_section
from bench.vhost_user import VARIANTS_HELP, CpuMeter, backend, machine, serve_variants, stop
from tests.vhost_user.client import VhostUserFrontend
from vdpa_svq.guest.burst import BurstLoop
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
RING = 256  # descriptors per queue: room for bursts while earlier ones are in flight
MAX_BURST = 32  # frames per tick at most (DPDK's default burst)
ONE_BY_ONE = 10_000  # ticks per second the Python frontend holds on a loaded 2-CPU machine (--burst auto)
HELD = 0.95  # a cell holds its rate when it offered and got back at least this share of it
FRONTENDS = {"c": "C (vdpa_svq/guest/_burst.c, `--frontend c`)", "py": "Python (measure(), `--frontend py`)"}


@dataclass
class Cell:
    seconds: float = 0.0
    sent: int = 0
    returned: int = 0
    rtts: list[int] = field(default_factory=list)  # ns
    backend_cpu: float = 0.0  # s
    frontend_ns: int = 0  # in send + kick + reap
    late: int = 0  # frames of the ticks the frontend missed (behind its schedule)
    full: int = 0  # frames not offered because the TX ring was full (none returned in time)
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


def burst_for(rate: float, burst: str) -> int:
    """Frames per tick at `rate`: `burst` itself, or for "auto" the fewest that keep the ticks at or below
    ONE_BY_ONE per second (what the frontend holds one frame at a time), at most MAX_BURST."""
    if burst != "auto":
        return int(burst)
    return max(1, min(MAX_BURST, math.ceil(rate / ONE_BY_ONE)))


def measure(drv: NetDriver, frames: list[bytes], rate: float, burst: int, seconds: float, meter: CpuMeter,
            cell: Cell) -> None:
    """Offer `rate` frames per second for `seconds` (after WARMUP), `burst` frames per tick, one kick per tick."""
    clock = time.perf_counter_ns
    rx, tx = drv.rx, drv.tx
    period = int(1e9 * burst / rate)  # one tick per burst
    sent_at: dict[int, int] = {}
    begin = clock()
    t0 = begin + int(WARMUP * 1e9)
    end = t0 + int(seconds * 1e9)
    next_send = begin
    seq = 0
    counting = False
    kicks = 0
    rtts, fe_ns, sent, late, full = [], 0, 0, 0, 0
    while True:
        now = clock()
        if not counting and now >= t0:
            meter.start()
            counting = True
            kicks = drv.stats.kicks
        if now >= end:
            break
        if now >= next_send:
            if now - next_send >= period:  # behind: drop the backlog, do not burst to catch up
                if counting:
                    late += (now - next_send) // period * burst
                next_send = now
            for i in range(burst):
                k = seq % SEQS
                if not drv.send(frames[k]):  # ring full: the rest of this tick is not offered
                    if counting:
                        full += burst - i
                    break
                t = clock()  # each frame's round trip runs from its own availability
                if counting:
                    sent_at[k] = t
                    sent += 1
                seq += 1
            drv.flush()  # one kick per tick, if the backend asked for one
            if counting:
                fe_ns += clock() - now
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
    cell.full += full
    cell.kicks += kicks


def measure_c(drv: NetDriver, kick_fds: list[int], frames: bytes, rate: float, burst: int, seconds: float,
              meter: CpuMeter, cell: Cell) -> float:
    """measure() in C (guest/burst.py): the same schedule, checks and counts; `frames` is measure()'s list
    joined. The driver's rings are the C loop's afterwards. Returns the C loop's idle polling turn (µs)."""
    with BurstLoop.for_net_driver(drv, kick_fds, frames, FRAME, rate, burst) as loop:
        turn = loop.poll_turn_ns() / 1000
        loop.run(WARMUP)
        meter.start()
        loop.run(seconds, counting=True)
        meter.stop()
        loop.drain(DRAIN)  # in flight at the end: still a round trip
        counts, rtts = loop.counts(), loop.rtts()
    cell.seconds += seconds
    cell.sent += counts.sent
    cell.returned += counts.returned
    cell.rtts += rtts
    cell.backend_cpu += meter.result[1]
    cell.frontend_ns += counts.frontend_ns
    cell.late += counts.late
    cell.full += counts.full
    cell.kicks += counts.kicks
    return turn


def open_frontend(sock: str, layout: Layout) -> tuple[VhostUserFrontend, NetDriver]:
    fe = VhostUserFrontend(_connect(sock), layout, num=RING)
    try:
        return fe, fe.setup()
    except BaseException:
        fe.close()
        raise


def run_cell(kind: str, extra: tuple[str, ...], tree: str | None, sock: str, tag: str, layout: Layout,
             frames: list[bytes], rate: float, burst: int, seconds: float, cell: Cell,
             joined: bytes | None = None) -> float:
    """One backend, one frontend, one rate; returns the frontend's idle poll turn (µs). With `joined` (the
    frames as one bytes) the C loop measures (measure_c), else measure()."""
    proc = backend(kind, "soft:net", sock, tag, extra=extra, tree=tree)
    try:
        fe, drv = open_frontend(sock, layout)
        affinity = os.sched_getaffinity(0)
        try:
            if FRONTEND_CPU in affinity and len(affinity) > 1:
                os.sched_setaffinity(0, {FRONTEND_CPU})
            gc.collect()
            gc.disable()  # no collector pause inside the frontend's timings
            if joined is not None:
                return measure_c(drv, fe.kick_fds, joined, rate, burst, seconds, CpuMeter(proc.pid), cell)
            turn = poll_cost(drv)
            measure(drv, frames, rate, burst, seconds, CpuMeter(proc.pid), cell)
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


def _burst_arg(text: str) -> str:
    if text != "auto" and not (text.isdigit() and 1 <= int(text) <= MAX_BURST):
        raise argparse.ArgumentTypeError(f"'auto' or 1..{MAX_BURST}, not {text!r}")
    return text


def held(c: Cell, rate: float) -> bool:
    """Whether a cell offered its rate and got (nearly) all of it back: only then is its RTT a latency at that rate."""
    return c.sent >= HELD * rate * c.seconds and c.returned >= HELD * c.sent


def why_not_held(c: Cell, rate: float) -> str:
    asked = rate * c.seconds
    why = []
    if c.late:
        why.append(f"{c.late / asked:.0%} of the frames due were in ticks the frontend missed (behind its schedule)")
    if c.full:
        why.append(f"{c.full / asked:.0%} found the TX ring full (not returned in time)")
    if c.returned < HELD * c.sent:
        why.append(f"{1 - c.returned / max(1, c.sent):.0%} of those offered did not come back")
    return "; ".join(why) or "offered below the asked rate"


def rtt_cell(c: Cell, rate: float, value: float) -> str:
    return f"{value:.1f}" if held(c, rate) else f"not held ({value:.1f})"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rates", default="10000,100000,1000000", help="offered packets per second, comma-separated")
    ap.add_argument("--seconds", type=float, default=3.0, help="counted seconds per cell and slice")
    ap.add_argument("--slices", type=int, default=2, help="interleaved passes over every (rate, backend)")
    ap.add_argument("--idle-seconds", type=float, default=10.0)
    ap.add_argument("--layout", choices=["split", "packed"], default="split")
    ap.add_argument("--burst", default="auto", type=_burst_arg,
                    help=f"frames per tick (1..{MAX_BURST}), one kick per tick; 'auto' (default): "
                         f"ceil(rate / {ONE_BY_ONE:,}), at most {MAX_BURST}: one frame at a time up to "
                         f"{ONE_BY_ONE:,} pps")
    ap.add_argument("--frontend", choices=["c", "py"], default="c",
                    help="the frontend's datapath: c (default; vdpa_svq/guest/_burst.c, the GIL released) or py "
                         "(the Python loop, measure(), for comparison: it tops out near 44k pps)")
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
    joined = b"".join(frames) if args.frontend == "c" else None
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
                                          rate, burst_for(rate, args.burst), args.seconds, c, joined))
                    sent, back = c.sent - before[0], c.returned - before[1]
                    new = sorted(c.rtts[before[2]:])
                    print(f"slice {n}: {rate:>9,.0f} pps x{burst_for(rate, args.burst):<2} {label:40} "
                          f"offered {sent / args.seconds:>9,.0f} "
                          f"back {back / args.seconds:>9,.0f}  p50 {pct(new, 0.5):7.1f} µs  "
                          f"p99 {pct(new, 0.99):7.1f} µs", file=sys.stderr, flush=True)
        for i, (label, kind, extra, tree) in enumerate(backends):
            tag = f"{os.getpid()}-idle-{i}"
            idle[label] = idle_cpu(kind, extra, tree, os.path.join(tmp, f"{tag}.sock"), tag, layout, frames,
                                   args.idle_seconds)
            print(f"idle: {label:40} {idle[label] * 100:.2f}% of a CPU", file=sys.stderr, flush=True)
    lines = ["| offered pps (asked) | backend | burst | offered pps (reached) | returned pps | RTT p50 µs | RTT p99 µs "
             "| backend CPU µs/packet | frontend µs/packet | kicks/packet |",
             "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for rate in rates:
        for label, *_ in backends:
            c = cells[(rate, label)]
            rtts = sorted(c.rtts)
            per = max(1, c.returned)
            lines.append(f"| {rate:,.0f} | {label} | {burst_for(rate, args.burst)} | {c.sent / c.seconds:,.0f} | "
                         f"{c.returned / c.seconds:,.0f} | {rtt_cell(c, rate, pct(rtts, 0.5))} | "
                         f"{rtt_cell(c, rate, pct(rtts, 0.99))} | {c.backend_cpu * 1e6 / per:.2f} | "
                         f"{c.frontend_ns / 1000 / per:.2f} | {c.kicks / max(1, c.sent):.2f} |")
    table = "\n".join(lines)
    turns.sort()
    notes = [f"- Frontend: {FRONTENDS[args.frontend]}. Its idle polling turn: "
             f"{turns[len(turns) // 2]:.2f} µs (median over cells); the most the frontend offered in any cell: "
             f"{max(c.sent / c.seconds for c in cells.values()):,.0f} pps."]
    short = [f"{r:,.0f} pps to {label}: offered {c.sent / c.seconds:,.0f}, got back {c.returned / c.seconds:,.0f} "
             f"({why_not_held(c, r)})" for (r, label), c in cells.items() if not held(c, r)]
    if short:
        notes.append(f"- Rate not held (offered, or got back, < {HELD:.0%} of it; the RTT cells say \"not held\" and "
                     "their figures are at the rate reached, not the one asked): " + "; ".join(short) + ".")
    notes.append(f"- Idle, frontend connected and silent for {args.idle_seconds:g} s: "
                 + ", ".join(f"`{label}` {share * 100:.2f}% of a CPU" for label, share in idle.items()) + ".")
    print("\n" + table + "\n\n" + "\n".join(notes))
    if args.write:
        write_section(args.write, "latency-host", SECTION.format(
            machine=mach, serve=SERVE, command=command, frontend=FRONTENDS[args.frontend], seconds=args.seconds,
            slices=args.slices, ring=RING,
            one_by_one=ONE_BY_ONE, held=HELD,
            layout=args.layout, frame=FRAME, table=table, notes="\n".join(notes)))
        print(f"wrote {args.write}", file=sys.stderr)
    return 0


SECTION = """## Latency and CPU per packet at fixed offered rates, host: `vdpa-svq serve` vs DPDK's vhost PMD

Produced by `{command}` (`make bench-latency` runs it with the default rates). {machine}.
{layout} rings, EVENT_IDX, {frame}-byte frames; {slices} interleaved slices of {seconds:g} s per cell, percentiles
over the pooled round trips of a cell.

- The frontend is the project's own (tests/vhost_user/client.py sets it up), pinned to CPU 0, rings of
  {ring}; its datapath here: {frontend}: on a busy clock it offers a burst of K frames (column "burst")
  every K/rate s, one kick per burst, and busy-polls the used rings (no sleeping on the call eventfd, so
  no guest wake-up is in these figures). K = 1 up to {one_by_one:,} pps, else ceil(rate /
  {one_by_one:,}), at most 32 (`--burst`). Behind its schedule it drops the backlog rather than catch
  up: "offered (reached)" and "returned" are what it really sent and got back. Where either is below
  {held:.0%} of the asked rate the RTT cells say **not held** (their figures are at the rate reached)
  and the notes say why: such a cell measures the frontend (or a backend that could not keep up), not
  the latency at that rate.
- Round trip: from just after the frame's own descriptor is made available (before the rest of its
  burst and the kick) to the first poll that sees it used in RX. It includes the frontend's kick (an
  eventfd write, when the backend asked for one) and up to one turn of its polling loop
  (below), not its frame building or reaping. With K > 1 a frame also waits behind the frames before
  it in its burst (in the backend, and in the frontend, which polls only once the whole burst is
  posted): the figures are those of a bursty source, as DPDK's txonly is, not of evenly spaced frames.
- "backend CPU µs/packet": the backend process's CPU time (user + system, all threads) over the counted
  window, per packet returned. DPDK's vhost PMD busy-polls a CPU whatever the rate, so its figure is
  about 1e6 / rate; serve's default sleeps on eventfds between packets.
- "frontend µs/packet": the frontend's own work per packet returned (send, kick, reap and repost):
  what the frontend costs, and what bounds the rate it can offer. "kicks/packet": the eventfd
  writes it made (TX, and RX after reposting a buffer) per packet sent, each one a wake-up for a
  backend that sleeps; DPDK's PMD polls and asks for none.
- "dpdk-vhost": a testpmd with DPDK's vhost PMD, io forwarding back (lcore 1). "{serve}": the shadow
  virtqueues (C relay) in front of the software loopback device, with the default adaptive polling
  (`--poll-us auto`); "--poll-us 0": notifications only. serve is not pinned (the frontend has CPU 0).
- Not measured: rates above what the frontend can offer (the most it reached is below; "not held"
  rows measure the frontend, or a backend that could not keep up), a guest's interrupt
  path (the frontend never sleeps), a real device (soft:net loops back in serve's relay thread).
  p99 rests on 1% of a cell's samples (rate x seconds x slices) and moves between runs, most for a
  backend that sleeps: its wake-ups pay the host's scheduler (here a container in a virtual machine).

{table}

{notes}
"""


if __name__ == "__main__":
    sys.exit(main())
