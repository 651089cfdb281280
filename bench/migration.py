"""Live-migration downtime and total time: a real VM through `vdpa-svq serve` vs QEMU's own virtio-net.

Each round runs every configuration once (vdpa_svq.migration.run: boot on A, migrate A -> B -> A
at full traffic, RAM compared, traffic verified), interleaved (round 1: serve split, QEMU split,
serve packed, QEMU packed; round 2: the same ...), so that load on the machine hits all alike.
QMP's own figures per leg: downtime (the guest stopped) and total time (migrate to completed).
A run that fails its checks is reported as such and its legs are left out of the medians.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

from bench.sections import write_section
from bench.vhost_user import machine
from vdpa_svq.migration.run import Config, Result, run

BACKENDS = (("vdpa-svq", "vdpa-svq serve soft:net"), ("qemu", "QEMU virtio-net (UDP loop)"))


def configs(queues: list[int]) -> list[Config]:
    """Every (layout, queue pairs, backend) measured; QEMU's reference takes one queue pair only."""
    return [Config(backend=backend, packed=packed, queues=q)
            for q in queues for packed in (False, True) for backend, _ in BACKENDS
            if backend == "vdpa-svq" or q == 1]


def median_range(values: list[int]) -> str:
    if not values:
        return "-"
    return f"{statistics.median(values):.0f} ({min(values)}-{max(values)})"


def table(results: dict[str, list[Result]]) -> str:
    label = dict(BACKENDS)
    lines = ["| backend | ring | queue pairs | runs passed | legs | downtime ms, median (min-max) "
             "| total ms, median (min-max) | frames lost |",
             "|---|---|---:|---:|---:|---:|---:|---:|"]
    for name, runs in results.items():
        backend, ring, mq = name.split("/")[:3]
        good = [r for r in runs if r.ok or (backend == "qemu" and _only_udp_loss(r))]
        legs = [leg for r in good for leg in r.legs]
        lost = sum(r.final.get("missing", 0) for r in good)
        lines.append(f"| {label[backend]} | {ring} | {mq[2:] if mq != 'sq' else 1} | {len(good)} of {len(runs)} "
                     f"| {len(legs)} | {median_range([g.downtime_ms for g in legs if g.downtime_ms is not None])} "
                     f"| {median_range([g.total_ms for g in legs if g.total_ms is not None])} | {lost} |")
    return "\n".join(lines)


def _only_udp_loss(r: Result) -> bool:
    """QEMU's reference loses the frames in its host UDP socket at each switchover (nothing carries
    them over): a run whose only failed check is `missing` still measured its downtime."""
    f = r.final
    return (r.error is None and bool(f) and f.get("corrupt") == 0 and f.get("dup") == 0
            and all(leg.status == "completed" and leg.pages_differ == 0 for leg in r.legs))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3, help="interleaved runs of every configuration")
    ap.add_argument("--queues", default="1", help="queue pairs to measure serve with, comma-separated (e.g. 1,2)")
    ap.add_argument("--write", metavar="FILE", help="also put the table in FILE, in its own section")
    args = ap.parse_args(argv)
    command = " ".join(["python -m bench.migration", *(sys.argv[1:] if argv is None else argv)])
    mach = machine()
    todo = configs([int(q) for q in args.queues.split(",") if q])
    results: dict[str, list[Result]] = {c.name: [] for c in todo}
    for n in range(args.rounds):
        for config in todo:
            print(f"round {n + 1}/{args.rounds}: {config.name}", file=sys.stderr, flush=True)
            # Our own work directory: run() then reports only what failed (not a generic "checks
            # failed"), which tells the reference's UDP loss from a real failure.
            work = Path(tempfile.mkdtemp(prefix="bench-migration."))
            r = run(config, workdir=work, log=lambda s: print(f"  {s}", file=sys.stderr, flush=True))
            if r.ok or _only_udp_loss(r):
                shutil.rmtree(work, ignore_errors=True)
            else:
                print(f"  logs kept in {work}", file=sys.stderr, flush=True)
            note = " (counted: the reference's frames lost in its UDP socket)" if not r.ok and _only_udp_loss(r) else ""
            print(f"  {r.verdict()}{note}", file=sys.stderr, flush=True)
            results[config.name].append(r)
    text = f"""## Live migration: downtime and total time, `vdpa-svq serve` vs QEMU's own virtio-net

Produced by `{command}`. Host: {mach}.
QEMU 10.0.2 (TCG), the migration test's guest (docs/migration.md): netcheck at full traffic, two
legs per run (A -> B, B -> A), RAM of both stopped guests compared page by page, traffic verified.
{args.rounds} rounds, the configurations interleaved in each. QMP's figures per leg: downtime
(the guest stopped) and total time (`migrate` to completed, the RAM copy limited to 128 MiB/s).
"frames lost": netcheck's missing frames over the passing runs (QEMU's reference loses those in its
host UDP socket at each switchover; serve rewinds its in-flight buffers, so the destination
takes them again).

{table(results)}
"""
    print(text)
    if args.write:
        write_section(args.write, "migration", text)
    return 0 if all(r.ok or _only_udp_loss(r) for runs in results.values() for r in runs) else 1


if __name__ == "__main__":
    sys.exit(main())
