"""The migration test: a guest at full traffic, migrated A -> B and back B -> A, its traffic verified.

One run, for one configuration (backend, ring layout, queue pairs):

1. two backends: `vdpa-svq serve soft:net` A and B (or, for the reference, QEMU's own virtio-net on
   two UDP loops), each its own process;
2. the source QEMU on A boots the guest; netcheck runs at once and reports every second;
3. a destination QEMU (-incoming) on B; QMP `migrate`, then `query-migrate` until completed; the
   source quits, the guest must keep running on the destination (its counters move on);
   the destination starts paused (-S): once it has loaded everything, QEMU saves both guests' RAM
   (pmemsave) and every page must be equal (the dirty log's direct check), then it runs (`cont`);
4. the same back: a new destination on A, migrated from B;
5. `stop`: netcheck drains and prints its final counts, which must be corrupt = 0, missing = 0,
   dup = 0 for vdpa-svq (for the reference, frames in flight in the host's UDP socket at the
   switchover are lost: counted, and reported as such).

QMP's own figures are recorded per leg: downtime, total-time, setup-time, RAM transferred.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from vdpa_svq.memory.guest import PAGE_SIZE
from vdpa_svq.migration.guest import guest_image
from vdpa_svq.migration.vm import MEM_BYTES, NetBackend, Report, Vm, VmError
from vdpa_svq.vhost_user.backend import FAULT_ENV  # serve's test-only hook: a dead dirty log

BOOT_S = 120.0  # TCG boot to the first report, on a busy 2-CPU host
MIGRATE_S = 120.0
PROGRESS_S = 60.0
MAX_BANDWIDTH = 128 << 20  # bytes/s: the RAM copy takes a while with the guest running (see migrate())
WARMUP_FRAMES = 2000  # frames verified before the first migration
COMPARE_BLOCK = 1 << 20


@dataclass
class Config:
    backend: str = "vdpa-svq"  # or "qemu": QEMU's own userspace virtio-net (the reference)
    packed: bool = False
    queues: int = 1
    fault: bool = False  # the dirty-log fault hook on the source serve (A)
    legs: int = 2  # A -> B, then B -> A
    rate: int = 0  # frames/s per stream (0: as fast as it goes)
    # False: the guest's NIC without MRG_RXBUF (QEMU's mrg_rxbuf=off), so Linux receives into whole
    # pages only the device writes. With mergeable buffers Linux builds its skbs around the buffers
    # and writes into the same pages, so QEMU resends them for the guest's own writes: a dead dirty
    # log then goes unseen (the fault test passed a migration with it).
    mrg_rxbuf: bool = True

    @property
    def name(self) -> str:
        mq = f"mq{self.queues}" if self.queues > 1 else "sq"
        return f"{self.backend}/{'packed' if self.packed else 'split'}/{mq}" + ("/fault" if self.fault else "")


@dataclass
class Leg:
    src: str
    dst: str
    status: str
    downtime_ms: int | None
    total_ms: int | None
    setup_ms: int | None
    ram_mb: float | None
    dirty_syncs: int | None
    frames_before: int  # verified frames on the source's last report before migrating
    frames_after: int  # on the destination's first report after it (the guest runs there)
    pages_differ: int | None = None  # guest pages not equal between the stopped source and destination
    differing: list[str] = field(default_factory=list)  # the first few of them (guest-physical)


@dataclass
class Result:
    config: str
    legs: list[Leg] = field(default_factory=list)
    final: dict[str, Any] = field(default_factory=dict)
    corrupt_reports: list[dict[str, Any]] = field(default_factory=list)
    serve: dict[str, list[str]] = field(default_factory=dict)
    seconds: float = 0.0
    error: str | None = None

    @property
    def ok(self) -> bool:
        f = self.final
        return (self.error is None and bool(f) and f.get("ok", 0) > 0
                and f.get("corrupt") == 0 and f.get("missing") == 0 and f.get("dup") == 0
                and all(leg.status == "completed" and leg.frames_after > leg.frames_before and leg.pages_differ == 0
                        for leg in self.legs))

    def verdict(self) -> str:
        f = self.final
        counts = (f"ok {f.get('ok')} corrupt {f.get('corrupt')} missing {f.get('missing')} dup {f.get('dup')}"
                  if f else "no final counts")
        legs = "; ".join(f"{leg.src}->{leg.dst} {leg.status} downtime {leg.downtime_ms} ms total {leg.total_ms} ms, "
                         f"{leg.pages_differ} pages differ" for leg in self.legs)
        why = f" ({self.error.splitlines()[0]})" if self.error else ""
        return f"{'PASS' if self.ok else 'FAIL'} {self.config}: {counts}; {legs}{why}"

    def to_json(self) -> dict[str, Any]:
        return {"config": self.config, "ok": self.ok, "legs": [asdict(leg) for leg in self.legs],
                "final": self.final, "corrupt_reports": self.corrupt_reports, "serve": self.serve,
                "seconds": round(self.seconds, 1), "error": self.error}


def device_spec(pairs: int) -> str:
    """soft:net with `pairs` queue pairs (multiqueue, its control queue driven by serve, when > 1)."""
    return "soft:net" if pairs == 1 else f"soft:net,pairs={pairs}"


class Serve:
    """`vdpa-svq serve soft:net` in its own process (as a VMM host runs it), one per side."""

    def __init__(self, name: str, workdir: Path, *, fault: bool = False, pairs: int = 1) -> None:
        self.name = name
        self.socket = str(workdir / f"serve-{name}.sock")
        self.log_path = workdir / f"serve-{name}.log"
        env = dict(os.environ)
        env.pop(FAULT_ENV, None)
        if fault:
            env[FAULT_ENV] = "1"
        with open(self.log_path, "wb") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "vdpa_svq.cli", "serve", device_spec(pairs), "--socket", self.socket, "-v"],
                stdout=out, stderr=subprocess.STDOUT, env=env)
        deadline = time.monotonic() + 30
        while not os.path.exists(self.socket):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise VmError(f"serve {name} did not start (exit {self.proc.poll()}):\n{self.log()}")
            time.sleep(0.05)

    def backend(self) -> NetBackend:
        return NetBackend("vhost-user", socket=self.socket)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def _frames(r: Report) -> int:
    return int(r.data.get("ok", 0))


def migrate(src: Vm, dst: Vm, uri: str) -> dict[str, Any]:
    """QMP migrate, then query-migrate until it ends; QEMU's own figures."""
    src.cmd("migrate-set-parameters", **{"max-bandwidth": MAX_BANDWIDTH})
    src.cmd("migrate", uri=uri)
    deadline = time.monotonic() + MIGRATE_S
    while True:
        info = src.cmd("query-migrate")
        if info.get("status") in ("completed", "failed", "cancelled"):
            return info
        if time.monotonic() > deadline:
            with contextlib.suppress(VmError):
                src.cmd("migrate_cancel")
            raise VmError(f"migration {src.name} -> {dst.name} not done after {MIGRATE_S:.0f} s: {info}")
        time.sleep(0.05)


def wait_incoming(dst: Vm) -> None:
    """The destination's side of the migration done: all of RAM loaded (the source's "completed"
    comes first, while the last pages may still be on their way)."""
    deadline = time.monotonic() + MIGRATE_S
    while (status := dst.cmd("query-migrate").get("status")) != "completed":
        if status in ("failed", "cancelled") or time.monotonic() > deadline:
            raise VmError(f"{dst.name}: incoming migration {status}\n{dst.tail()}")
        time.sleep(0.05)


def compare_memory(src: Vm, dst: Vm, work: Path) -> tuple[int, list[str]]:
    """Guest pages that differ between the stopped source and the not yet started destination.

    Both are stopped, so their RAM must be equal byte for byte: a page the device wrote that the
    dirty log missed is the source's newer content against the destination's older one. QEMU
    itself writes both files (pmemsave): the comparison trusts nothing of vdpa-svq's.
    """
    files = []
    for vm in (src, dst):
        path = work / f"{vm.name}.ram"
        vm.cmd("pmemsave", val=0, size=MEM_BYTES, filename=str(path))
        files.append(path)
    differ: list[int] = []
    try:
        with open(files[0], "rb") as a, open(files[1], "rb") as b:
            offset = 0
            while block_a := a.read(COMPARE_BLOCK):
                block_b = b.read(COMPARE_BLOCK)
                if block_a != block_b:
                    differ += [offset + o for o in range(0, len(block_a), PAGE_SIZE)
                               if block_a[o : o + PAGE_SIZE] != block_b[o : o + PAGE_SIZE]]
                offset += len(block_a)
    finally:
        for path in files:
            path.unlink(missing_ok=True)
    return len(differ), [hex(gpa) for gpa in differ[:8]]


def run(config: Config, *, workdir: Path | None = None, log=None) -> Result:
    """One configuration through config.legs migrations; never raises for a failed check (see Result)."""
    say = log or (lambda _msg: None)
    t0 = time.monotonic()
    result = Result(config.name)
    own_dir = workdir is None
    work = Path(tempfile.mkdtemp(prefix="migrate-test.")) if workdir is None else workdir
    image = guest_image()
    serves: list[Serve] = []
    vms: list[Vm] = []
    try:
        if config.backend == "vdpa-svq":
            serves = [Serve("A", work, fault=config.fault, pairs=config.queues),
                      Serve("B", work, pairs=config.queues)]
            backends = [s.backend() for s in serves]
        elif config.backend == "qemu":
            base = 20000 + os.getpid() % 20000
            backends = [NetBackend("qemu", port=base), NetBackend("qemu", port=base + 1)]
        else:
            raise ValueError(f"backend is vdpa-svq or qemu, not {config.backend!r}")
        smp = max(1, config.queues)
        kw = {"packed": config.packed, "queues": config.queues, "streams": config.queues, "smp": smp,
              "rate": config.rate, "mrg_rxbuf": config.mrg_rxbuf}
        names = ["A", "B"]
        vm = Vm("vm-A", image, backends[0], work, **kw)
        vms.append(vm)
        say(f"{config.name}: booting on A")
        vm.wait_report(lambda r: r.tag == "NETCHECK" and _frames(r) >= WARMUP_FRAMES, BOOT_S,
                       f"{WARMUP_FRAMES} verified frames on A")
        for leg in range(config.legs):
            src_side, dst_side = leg % 2, (leg + 1) % 2
            uri_path = work / f"migrate-{leg}.sock"
            dst = Vm(f"vm-{names[dst_side]}{leg}", image, backends[dst_side], work, incoming=f"unix:{uri_path}",
                     paused=True, **kw)
            vms.append(dst)
            before = vm.last_report()
            frames_before = _frames(before) if before else 0
            say(f"{config.name}: migrating {names[src_side]} -> {names[dst_side]} at {frames_before} frames")
            info = migrate(vm, dst, f"unix:{uri_path}")
            ram = info.get("ram", {})
            record = Leg(names[src_side], names[dst_side], info.get("status", "?"), info.get("downtime"),
                         info.get("total-time"), info.get("setup-time"),
                         round(ram["transferred"] / 2**20, 1) if "transferred" in ram else None,
                         ram.get("dirty-sync-count"), frames_before, 0)
            result.legs.append(record)
            if record.status != "completed":
                raise VmError(f"migration {names[src_side]} -> {names[dst_side]}: {info}\n{vm.tail()}\n{dst.tail()}")
            wait_incoming(dst)
            record.pages_differ, record.differing = compare_memory(vm, dst, work)
            dst.cmd("cont")  # the destination was started paused (-S) for the comparison
            vm.quit()
            vm = dst
            last = frames_before
            after = vm.wait_report(lambda r, last=last: r.tag == "NETCHECK" and _frames(r) > last, PROGRESS_S,
                                   f"traffic to go on after the migration to {names[dst_side]}")
            record.frames_after = _frames(after)
            say(f"{config.name}: {record.status}, downtime {record.downtime_ms} ms, total {record.total_ms} ms; "
                f"the guest runs on {names[dst_side]} ({record.frames_after} frames)")
        vm.send("stop")
        final = vm.wait_report(lambda r: r.tag == "NETCHECK-FINAL", PROGRESS_S, "netcheck's final counts")
        result.final = final.data
        result.corrupt_reports = [r.data for v in vms for r in v.reports if r.tag == "NETCHECK-CORRUPT"]
        vm.send("exit")
    except VmError as e:
        result.error = str(e)
    finally:
        for v in vms:
            v.quit()
        for s in serves:
            s.stop()
            result.serve[s.name] = s.log().splitlines()[-80:]  # a connection: ~20 lines at -v
        result.seconds = time.monotonic() - t0
        if own_dir and result.ok:
            shutil.rmtree(work, ignore_errors=True)
        elif own_dir:
            result.error = (result.error or "checks failed") + f"\n(logs kept in {work})"
    return result


def main(argv: list[str] | None = None) -> int:
    import argparse
    import json

    ap = argparse.ArgumentParser(description="live migration of a real VM through vdpa-svq")
    ap.add_argument("--backend", choices=["vdpa-svq", "qemu"], default="vdpa-svq")
    ap.add_argument("--packed", action="store_true")
    ap.add_argument("--queues", type=int, default=1)
    ap.add_argument("--fault", action="store_true")
    ap.add_argument("--legs", type=int, default=2)
    ap.add_argument("--rate", type=int, default=0, help="frames/s per stream (default: as fast as it goes)")
    a = ap.parse_args(argv)
    config = Config(backend=a.backend, packed=a.packed, queues=a.queues, fault=a.fault, legs=a.legs, rate=a.rate)
    r = run(config, log=lambda s: print(s, file=sys.stderr))
    print(json.dumps(r.to_json()))
    print(r.verdict())
    return 0 if r.ok else 1


if __name__ == "__main__":
    sys.exit(main())
