"""Relay throughput, in-process: chains per second with no relay, the Python relay, and the C relay.

    python -m bench.relay [--seconds S] [--out BENCHMARKS.md | --no-write]

The report goes into its own section of the file; the other benches' sections are left as they are.

One run measures, for each layout pair (guest ring -> shadow ring) and chain lengths 1 and 4:

  direct   the guest's driver ring straight against a device ring of the same (guest) layout,
           no relay: the floor. Both ends are the Python ring code (vdpa_svq.ring), so this is
           what the two ends of the in-process bench cost by themselves.
  py       guest driver -> ShadowVirtqueue (Python reference) -> shadow ring -> device.
  c        the same with the C relay (vdpa_svq._relay).

The workload is the same for all three: the guest adds a batch of chains (length 1: one
device-writable buffer; length 4: two readable then two writable), kicks if the ring says so;
the device pops everything, completes it at once (in order, full length written, no data copied)
and interrupts if the ring says so; the guest reaps everything. Relays log dirty pages. The
end-to-end numbers include the Python ends in every column, so they bound what any relay can
show; the "relay only" columns time just the relay's own calls (on_guest_kick and
on_device_call), which is where the C and the Python relays differ.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

from bench.sections import write_section
from vdpa_svq.dirty import DirtyBitmap
from vdpa_svq.memory import PAGE_SIZE, GuestMemory
from vdpa_svq.memory.iova import IovaMap
from vdpa_svq.relay_impl import AVAILABLE_IMPLS, describe, make_shadow_virtqueue
from vdpa_svq.ring import IndirectArea, Layout, device_ring, driver_ring, place_ring

RING = 256  # entries, both rings
BATCH = 64  # chains per guest kick
BUF = 256  # bytes per buffer
PAIRS = [(g, s) for g in Layout for s in Layout]
CHAIN_LENGTHS = (1, 4)
REPEATS = 9  # each cell: the median of this many timed slices, interleaved across the three columns


def _segments(length: int, base: int) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
    bufs = [(base + i * BUF, BUF) for i in range(length)]
    n_out = length // 2
    return bufs[:n_out], bufs[n_out:]


@dataclass
class Result:
    chains_per_s: float
    relay_chains_per_s: float | None = None  # chains per second of time spent inside the relay


class Bench:
    """One guest driver, optionally one relay, one device; memory as in tests/relay/harness.py."""

    def __init__(self, guest_layout: Layout, shadow_layout: Layout, length: int, impl: str | None) -> None:
        self.impl = impl
        self.length = length
        g_addrs, end = place_ring(guest_layout, RING, 0x1000, device_area_align=PAGE_SIZE)
        data = (end + 0xFFF) & ~0xFFF
        self.chains = [_segments(length, data + i * length * BUF) for i in range(BATCH)]
        self.guest_mem = GuestMemory.create(data + BATCH * length * BUF, name="bench-guest")
        self.drv = driver_ring(guest_layout, self.guest_mem, RING, g_addrs, name="guest-driver")
        self.closers: list[Callable[[], None]] = [self.drv.close]
        if impl is None:
            self.dev = device_ring(guest_layout, self.guest_mem, RING, g_addrs, name="device")
            self.svq = None
            self.closers.append(self.dev.close)
        else:
            iova = IovaMap()
            for r in self.guest_mem:
                iova.add(r.gpa, r.size, r.gpa)
            s_size = 0x4000 + 16 * RING * 2 + 8 * RING + IndirectArea.size(RING, 8)
            s_base = iova.alloc(s_size)
            self.shadow_mem = GuestMemory.create(s_size, gpa=s_base, name="bench-shadow")
            s_addrs, _ = place_ring(shadow_layout, RING, s_base, device_area_align=PAGE_SIZE)
            self.dev_mem = GuestMemory()
            self.dev_mem.add_region(0, self.guest_mem.regions[0].size, self.guest_mem.regions[0].fd)
            self.dev_mem.add_region(s_base, self.shadow_mem.regions[0].size, self.shadow_mem.regions[0].fd)
            self.dirty = DirtyBitmap(self.guest_mem.size)
            guest_side = device_ring(guest_layout, self.guest_mem, RING, g_addrs, name="guest")
            shadow_side = driver_ring(shadow_layout, self.shadow_mem, RING, s_addrs, name="shadow")
            self.dev = device_ring(shadow_layout, self.dev_mem, RING, s_addrs, name="device")
            self.svq = make_shadow_virtqueue(guest_side, shadow_side, iova, self.dirty, device_kick=_nothing,
                                             guest_call=_nothing, name="bench", impl=impl)
            self.closers += [getattr(self.svq, "close", _nothing), guest_side.close, shadow_side.close,
                             self.dev.close, self.dev_mem.close, self.shadow_mem.close]
        self.closers.append(self.guest_mem.close)
        self.relay_time = 0.0

    def batch(self) -> None:
        """BATCH chains there and back; the relay's own calls are timed separately."""
        drv, dev, svq, clock = self.drv, self.dev, self.svq, time.perf_counter
        for out, in_ in self.chains:
            drv.add(out, in_, 1)
        kick = drv.kick_needed()
        if svq is not None and kick:
            t = clock()
            svq.on_guest_kick()
            self.relay_time += clock() - t
        popped = []
        while (c := dev.pop()) is not None:
            popped.append(c)
        for c in popped:
            dev.push_used(c, c.writable_bytes)
        call = dev.need_notify()
        if svq is not None and call:
            t = clock()
            svq.on_device_call()
            self.relay_time += clock() - t
        n = 0
        while drv.get_used() is not None:
            n += 1
        if n != BATCH:
            raise RuntimeError(f"{n} of {BATCH} chains came back (a lost notification?)")

    def timed(self, seconds: float) -> tuple[float, float | None]:
        """Batches for about `seconds`: (chains per CPU second, chains per second inside the relay).

        End to end is divided by this process's CPU time, not wall time: on a shared machine,
        time spent descheduled is not the code's. The relay's calls are short (microseconds)
        and timed on the wall clock, whose reads cost far less than a CPU-time read.
        """
        self.relay_time = 0.0
        batches = 0
        cpu = time.process_time()
        deadline = time.perf_counter() + seconds
        while True:
            self.batch()
            batches += 1
            if time.perf_counter() >= deadline:
                break
        cpu = time.process_time() - cpu
        relay = batches * BATCH / self.relay_time if self.svq is not None else None
        return batches * BATCH / cpu, relay

    def close(self) -> None:
        for close in self.closers:
            close()


def _nothing() -> None:
    pass


def machine() -> str:
    model = "unknown CPU"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return (f"{os.cpu_count()} CPUs (nproc {len(os.sched_getaffinity(0))}), {model}; "
            f"Python {platform.python_version()} ({platform.python_implementation()}), {platform.machine()}; "
            f"relay: {describe()}; load average at start {os.getloadavg()[0]:.1f}")


def _k(x: float | None) -> str:
    return "-" if x is None else f"{x / 1000:,.1f}k"


def _ratio(a: float | None, b: float | None) -> str:
    return "-" if a is None or b is None else f"{a / b:.2f}x"


def run(seconds: float, log=print) -> str:
    impls = [i for i in ("py", "c") if i in AVAILABLE_IMPLS]
    header = ("| guest -> shadow | chain | direct | py relay | c relay | c/direct | c/py "
              "| py relay only | c relay only | c/py (relay only) |")
    rows = [header, "|" + "|".join("---" for _ in range(10)) + "|"]
    for row in rows:
        log(row)
    for g, s in PAIRS:
        for length in CHAIN_LENGTHS:
            benches = {impl: Bench(g, s, length, impl) for impl in (None, *impls)}
            try:
                for b in benches.values():
                    b.batch()  # warm up
                # Interleaved slices: whatever else runs on the machine slows all three alike.
                samples: dict[str | None, list[tuple[float, float | None]]] = {i: [] for i in benches}
                for _ in range(REPEATS):
                    for impl, b in benches.items():
                        samples[impl].append(b.timed(seconds / REPEATS))
            finally:
                for b in benches.values():
                    b.close()
            res = {impl: Result(statistics.median(x for x, _ in v),
                                None if impl is None else statistics.median(r for _, r in v))
                   for impl, v in samples.items()}
            direct, py, c = res[None], res.get("py"), res.get("c")
            row = (f"| {g.value} -> {s.value} | {length} | {_k(direct.chains_per_s)} "
                   f"| {_k(py and py.chains_per_s)} | {_k(c and c.chains_per_s)} "
                   f"| {_ratio(c and c.chains_per_s, direct.chains_per_s)} "
                   f"| {_ratio(c and c.chains_per_s, py and py.chains_per_s)} "
                   f"| {_k(py and py.relay_chains_per_s)} | {_k(c and c.relay_chains_per_s)} "
                   f"| {_ratio(c and c.relay_chains_per_s, py and py.relay_chains_per_s)} |")
            rows.append(row)
            log(row)
    return "\n".join(rows)


REPORT = """## Relay, in process: the shadow virtqueue between two rings, C vs Python vs no relay

Produced by `make bench` (`python -m bench.relay`), all numbers from one run.

Machine: {machine}

Chains per second (k = thousand), ring size {ring}, batches of {batch} chains, {seconds:g} s per cell:
the median of {repeats} slices, interleaved across the three columns of a row so that other load on
the machine hits them alike, each divided by the CPU time the bench process used (not wall time).
Ratios above 1.00x are noise: the relay columns do strictly more work than "direct".

- "direct" is the guest's driver ring straight against a device ring of the guest's layout, with no
  relay. Both ends are the project's Python ring code (vdpa_svq.ring), so it measures what the two
  ends of this in-process bench cost by themselves; every other column pays that cost too.
- "py relay" / "c relay" put the shadow virtqueue (Python reference / C extension) between the
  guest's driver and the device, with the dirty log on.
- "relay only" counts only the time spent inside the relay's calls (on_guest_kick and
  on_device_call, through the Python wrapper), which is where the two relays differ.

{table}

Targets (from the issue): c relay >= 0.5x direct, c relay >= 30x the Python relay.
{verdict}
"""


def verdict(table: str) -> str:
    c_direct, c_py, c_py_relay = [], [], []
    for line in table.splitlines()[2:]:
        cells = [x.strip() for x in line.strip("|").split("|")]
        if cells[5] != "-":
            c_direct.append(float(cells[5].rstrip("x")))
            c_py.append(float(cells[6].rstrip("x")))
            c_py_relay.append(float(cells[9].rstrip("x")))
    if not c_direct:
        return "The C relay is not available here: only the direct and Python columns were measured."
    lo = min(c_direct)
    out = [f"- c/direct: {lo:.2f}x to {max(c_direct):.2f}x: "
           + ("met everywhere." if lo >= 0.5 else "NOT met everywhere.")]
    out.append(f"- c/py end to end: {min(c_py):.1f}x to {max(c_py):.1f}x; relay only: "
               f"{min(c_py_relay):.1f}x to {max(c_py_relay):.1f}x: "
               + ("met (relay only)." if min(c_py_relay) >= 30 else "NOT met (relay only)."))
    out.append("  End to end, 30x cannot show: both ends are Python in every column, so the Python ring code"
               " the two ends run bounds the speed-up whatever the relay costs.")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.relay", description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=1.2, help="time per cell (default 1.2)")
    ap.add_argument("--out", default="BENCHMARKS.md",
                    help="the file to put the report in, in its own section (default BENCHMARKS.md)")
    ap.add_argument("--no-write", action="store_true", help="print only")
    args = ap.parse_args(argv)
    m = machine()
    print(m, flush=True)
    table = run(args.seconds, log=lambda row: print(row, flush=True))
    report = REPORT.format(machine=m, ring=RING, batch=BATCH, seconds=args.seconds, repeats=REPEATS, table=table,
                           verdict=verdict(table))
    print(verdict(table))
    if not args.no_write:
        write_section(args.out, "relay", report)
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
