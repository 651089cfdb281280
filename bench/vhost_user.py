"""vhost-user throughput: DPDK testpmd's virtio-user through `vdpa-svq serve DEV`, beside DPDK's own
vhost PMD as the backend (no shadow relay, no device: the ceiling of the frontend on this machine).

Both backends loop frames back (soft:net and vdpa_sim net are loopback devices; the DPDK backend
forwards in io mode), the frontend forwards in io mode after a first burst. Slices are interleaved
(backend, layout, backend, layout, ...) and medians reported, because rates on a shared machine
swing widely within one run.

    python -m bench.vhost_user [--device soft:net] [--slices 3] [--seconds 5] [--write BENCHMARKS.md]

--kernel: the same frontend inside the kernel bench guest (tools/kbench), against a real vhost-vdpa device
(vdpa_sim net, loopback, split rings only): testpmd's virtio-user straight on /dev/vhost-vdpa-N (the
kernel's vhost-vdpa backend, no shadow virtqueue: the passthrough baseline) against the same testpmd
through `vdpa-svq serve /dev/vhost-vdpa-N` with each relay (--impl c, --impl py), slices interleaved.
The host side boots the guest with `tools/kbench run --out DIR -- ... --kernel-guest --json DIR/x.json`.

    python -m bench.vhost_user --kernel [--smp N] [--slices 3] [--seconds 5] [--write BENCHMARKS.md]

--smp N boots the guest with N vCPUs (testpmd's forwarding lcore always polls vCPU 0; serve's relay and
vdpa_sim's worker share the others), to see whether the vCPU count bounds the relay.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.sections import write_section
from vdpa_svq.vhost_user.testpmd import EAL, TESTPMD_ARGS, Window, accumulated, queue_args, run_frontend


def _wait_socket(path: str, proc: subprocess.Popen, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not os.path.exists(path):
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"backend did not listen on {path}: {proc.communicate()[0][-2000:]}")
        time.sleep(0.05)


def frontend(sock: str, packed: bool, seconds: float, tag: str, peer_mac: str | None,
             start_timeout: float = 60.0, burst: int | None = None,
             window: Window | None = None, tx_first: bool = True) -> tuple[int, int, float]:
    """(RX, TX, seconds forwarded) of one testpmd virtio-user run of about `seconds` of forwarding.
    `sock` is a vhost-user socket, or a /dev/vhost-vdpa-N node (virtio-user's vhost-vdpa backend)."""
    run = run_frontend(sock, packed, seconds, f"fe-{tag}", peer_mac, start_timeout=start_timeout, burst=burst,
                       stop_timeout=max(30.0, start_timeout / 2), window=window, tx_first=tx_first)
    counts = accumulated(run.log)
    if not (counts and run.started):
        raise RuntimeError(f"testpmd did not forward or printed no statistics:\n{run.log[-2000:]}")
    return counts[0], counts[1], run.forwarded


def backend(kind: str, device: str, sock: str, tag: str, impl: str = "auto",
            timeout: float = 60.0, extra: tuple[str, ...] = (), tree: str | None = None,
            queues: int = 1) -> subprocess.Popen:
    """A backend listening on `sock`: DPDK's vhost PMD (with `queues` queue pairs, all forwarded back by
    one lcore), or serve (from the checkout `tree`, if given: to compare a branch with another in one
    interleaved run; its queue pairs are the device's, e.g. soft:net,pairs=2)."""
    env, cwd = None, None
    if kind == "dpdk-vhost":
        cmd = ["dpdk-testpmd", "-l", "0,1", *EAL, f"--file-prefix=be-{tag}",
               "--vdev", f"net_vhost0,iface={sock},queues={queues}", "--", *TESTPMD_ARGS, *queue_args(queues)]
    else:
        cmd = [sys.executable, "-m", "vdpa_svq.cli", "serve", device, "--socket", sock, "--impl", impl, *extra]
        if tree is not None:  # python -m looks in the working directory first
            cwd = os.path.abspath(tree)
            env = {**os.environ, "PYTHONPATH": cwd}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=cwd)
    _wait_socket(sock, proc, timeout)
    return proc


VARIANTS_HELP = ("serve variants, ';'-separated: serve's arguments ('' for the defaults), each optionally "
                 "prefixed with 'DIR:' to run serve from the checkout DIR (its C extension built), e.g. "
                 "';--poll-us auto;/work/main:--poll-us auto'")


def serve_variants(spec: str, prefix: str) -> list[tuple[str, tuple[str, ...], str | None]]:
    """(row label, serve's extra arguments, checkout or None) for each ';'-separated `[DIR:]ARGS` of `spec`."""
    out = []
    for item in (i.strip() for i in spec.split(";")):
        tree, _, args = item.partition(":") if ":" in item and not item.startswith("-") else ("", "", item)
        extra = tuple(args.split())
        label = " ".join([prefix, *extra]) + (f" [{tree}]" if tree else "")
        out.append((label, extra, tree or None))
    return out


def stop(proc: subprocess.Popen) -> str:
    """SIGINT, then its output."""
    proc.send_signal(signal.SIGINT)
    try:
        return proc.communicate(timeout=30)[0] or ""
    except subprocess.TimeoutExpired:
        proc.kill()
        return proc.communicate()[0] or ""


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="soft:net", help="DEV for vdpa-svq serve (default soft:net)")
    ap.add_argument("--slices", type=int, default=3)
    ap.add_argument("--seconds", type=float, default=5.0)
    ap.add_argument("--burst", type=int, default=None,
                    help="testpmd --burst: packets per burst, and so in flight after --tx-first (default 32)")
    ap.add_argument("--peer-mac", default=None, help="first burst's destination (vdpa_sim filters on its MAC)")
    ap.add_argument("--write", metavar="FILE", help="also put the table in FILE, in its own section")
    ap.add_argument("--serve", default=";--poll-us 0;--poll-us 50 --cpus 1",
                    help="the rows of serve in front of DEV: " + VARIANTS_HELP)
    ap.add_argument("--via-dpdk", default="", help="the rows of serve in front of DPDK's vhost PMD (as "
                    "vhost-user:PATH): " + VARIANTS_HELP + "; 'none' for no such row")
    ap.add_argument("--kernel", action="store_true", help="passthrough vs serve, in the kernel bench")
    ap.add_argument("--impls", default="c,c/poll=0,c/poll=2000/cpus=1,py",
                    help="--kernel: serve variants to measure: a relay (c, py), '/poll=US' for --poll-us US, "
                         "'/cpus=LIST' for --cpus LIST (default c,c/poll=0,c/poll=2000/cpus=1,py)")
    ap.add_argument("--timeout", type=float, default=480.0, help="--kernel: bound for boot + the whole guest run")
    ap.add_argument("--smp", type=int, default=None,
                    help="--kernel: the guest's vCPU count (tools/kbench run --smp; its default: the host's CPUs, "
                         "at most 4). Under TCG each vCPU is a host thread: more vCPUs than host CPUs "
                         "oversubscribe them")
    ap.add_argument("--kernel-guest", action="store_true", help=argparse.SUPPRESS)  # inside the guest
    ap.add_argument("--json", help=argparse.SUPPRESS)  # --kernel-guest: where the host reads the rates
    args = ap.parse_args(argv)
    if args.kernel_guest:
        return kernel_guest(args)
    if args.smp is not None and not args.kernel:
        ap.error("--smp: only with --kernel (the guest's vCPUs)")
    if args.smp is not None and args.smp < 1:
        ap.error(f"--smp: a guest has at least 1 vCPU, not {args.smp}")
    if args.kernel:
        return kernel_host(args)
    if shutil.which("dpdk-testpmd") is None:
        print("dpdk-testpmd not found: apt-get install -y dpdk-dev", file=sys.stderr)
        return 1
    default = f"vdpa-svq serve {args.device}"
    # Polling on CPU 1 (the default third row): the CPU the DPDK backend's forwarding lcore gets in
    # the first row (the frontend's forwarding lcore is on CPU 0 in every row).
    serve_args = {label: (extra, tree) for label, extra, tree in serve_variants(args.serve, default)}
    via_dpdk = {} if args.via_dpdk == "none" else {
        label: (extra, tree)
        for label, extra, tree in serve_variants(args.via_dpdk, "vdpa-svq serve vhost-user:(DPDK vhost PMD)")}
    kinds = ("dpdk-vhost", *serve_args, *via_dpdk)
    rates: dict[tuple[str, str], list[float]] = {}
    serve_cpu: dict[tuple[str, str], list[float]] = {}  # serve's CPU µs per received packet
    with tempfile.TemporaryDirectory(prefix="vdpa-svq-bench-") as tmp:
        for n in range(args.slices):
            for kind in kinds:
                for packed in (False, True):
                    layout = "packed" if packed else "split"
                    tag = f"{os.getpid()}-{n}-{kinds.index(kind)}-{layout}"
                    sock = os.path.join(tmp, f"{tag}.sock")
                    procs = []
                    try:
                        if kind in via_dpdk:  # the same DPDK backend as the first row, as serve's device
                            dev_sock = os.path.join(tmp, f"{tag}-dev.sock")
                            procs.append(backend("dpdk-vhost", "", dev_sock, f"{tag}-dev"))
                            extra, tree = via_dpdk[kind]
                            procs.append(backend("serve", f"vhost-user:{dev_sock}", sock, tag, extra=extra,
                                                 tree=tree))
                        else:
                            extra, tree = serve_args.get(kind, ((), None))
                            procs.append(backend(kind, args.device, sock, tag, extra=extra, tree=tree))
                        meter = CpuMeter(procs[-1].pid if kind != "dpdk-vhost" else None)
                        rx, tx, secs = frontend(sock, packed, args.seconds, tag, args.peer_mac, burst=args.burst,
                                                window=meter)
                    finally:
                        for proc in reversed(procs):
                            stop(proc)
                    rates.setdefault((kind, layout), []).append(rx / secs)
                    if kind != "dpdk-vhost":
                        serve_cpu.setdefault((kind, layout), []).append(meter.result[1] / max(rx, 1) * 1e6)
                    print(f"slice {n}: {kind:50} {layout:6} RX {rx:>10} TX {tx:>10}  {rx / secs:>12,.0f} pps",
                          file=sys.stderr)
        idle = {layout: idle_cpu(default_kind=serve_args.get(default, ((), None))[0], device=args.device, tmp=tmp,
                                 packed=packed)
                for layout, packed in (("split", False), ("packed", True))}
    lines = [f"| backend ({args.slices} slices of {args.seconds:g} s, median RX pps) | split | packed "
             "| serve CPU µs/packet (split / packed) |",
             "|---|---:|---:|---:|"]
    for kind in kinds:
        cells = [f"{statistics.median(rates[(kind, lay)]):,.0f}" for lay in ("split", "packed")]
        cpu = " / ".join(f"{statistics.median(serve_cpu[(kind, lay)]):.3f}" for lay in ("split", "packed")) \
            if kind != "dpdk-vhost" else "-"
        lines.append(f"| {kind} | {cells[0]} | {cells[1]} | {cpu} |")
    table = "\n".join(lines)
    # The targets of issue 15: the default >= 0.7x, polling by hand >= 0.8x.
    targets = {default: 0.7, f"{default} --poll-us 50 --cpus 1": 0.8}
    verdict = ["Targets (issue 15): the default >= 0.7x DPDK's vhost PMD, polled by hand >= 0.8x (medians, "
               "per layout); the other rows for comparison."]
    for kind in kinds[1:]:
        ratios = [statistics.median(rates[(kind, lay)]) / statistics.median(rates[(kinds[0], lay)])
                  for lay in ("split", "packed")]
        target = targets.get(kind)
        met = "" if target is None else (": met" if min(ratios) >= target else f": NOT met (target {target}x)")
        verdict.append(f"- {kind}: {ratios[0]:.3f}x split, {ratios[1]:.3f}x packed{met}.")
    verdict.append(f"- idle: `{default}` with testpmd connected and sending nothing for {IDLE_SECONDS:g} s used "
                   + ", ".join(f"{idle[lay] * 100:.2f}% of a CPU ({lay})" for lay in ("split", "packed")) + ".")
    print("\n" + table + "\n\n" + "\n".join(verdict))
    if args.write:
        write_section(args.write, "vhost-user-host", HOST_SECTION.format(
            machine=machine(), slices=args.slices, seconds=args.seconds, device=args.device, table=table,
            verdict="\n".join(verdict)))
        print(f"wrote {args.write}", file=sys.stderr)
    return 0


HOST_SECTION = """## vhost-user, host: testpmd virtio-user through `vdpa-svq serve` vs DPDK's vhost PMD

Produced by `make bench` (`python -m bench.vhost_user --write BENCHMARKS.md`). {machine}.
io forwarding after a first burst; {slices} interleaved slices of {seconds:g} s each; median RX pps.

- "dpdk-vhost": the frontend straight to DPDK's vhost PMD (a second testpmd forwarding back): the ceiling.
  The two forwarding lcores have a CPU each.
- "vdpa-svq serve {device}": vdpa-svq's shadow virtqueues (C relay) with the default settings
  (adaptive polling, `--poll-us auto`: polls while polling pays, see pump.py) in front of the built-in
  software loopback device, whose datapath runs in C (vdpa_svq/softdev/_netloop.c) in the relay's own thread: the
  relay's kick is served inline, so one thread moves each frame guest -> shadow -> device -> shadow -> guest.
- "... --poll-us 0": the same with notifications only (no polling).
- "... --poll-us 50 --cpus 1": polling tuned by hand, pinned to CPU 1, the CPU the DPDK backend's
  forwarding lcore has in the first row (the frontend's forwarding lcore is on CPU 0 in every row).
- "serve CPU µs/packet": serve's CPU time (user + system, all threads) over the counted forwarding, per
  received packet: a polling relay spends a CPU whatever the rate, so this falls as the rate rises.
- "vdpa-svq serve vhost-user:(DPDK vhost PMD)": the shadow virtqueues in front of the first row's DPDK
  backend, as the device (`vhost-user:PATH`): the relay's own cost, against a device in C. Three parties
  on two CPUs: the relay shares a CPU with the device's busy-polling lcore, so every wake-up waits for it.

{table}

{verdict}
"""

KERNEL_SECTION = """## vhost-user, kernel bench: testpmd virtio-user on vhost-vdpa directly vs through `vdpa-svq serve`

Produced by `make bench` (`python -m bench.vhost_user --kernel --write BENCHMARKS.md`). Host: {machine}.
Guest: tools/kbench, Linux {kernel}, **{accel}** ({smp} vCPUs): absolute rates under TCG mean little, the ratio
is the point. Device: vdpa_sim net (loopback, split rings only), {device}.

- "passthrough": DPDK testpmd's virtio-user on the vhost-vdpa node itself
  (`--vdev net_virtio_user0,path={device},queues=1,packed_vq=0`): the kernel's vhost-vdpa, no shadow virtqueue.
- "vdpa-svq serve --impl X": the same testpmd over vhost-user (split rings) to `vdpa-svq serve {device}`,
  whose shadow virtqueues (relay X) drive the device; the C relay runs in the C loop (no Python per wake-up),
  with the default adaptive polling (`--poll-us auto`: polls while polling pays, see pump.py).
  "--poll-us US": after each burst the relay keeps notifications off and polls the rings for US µs
  (yielding the vCPU while idle, so that vdpa_sim's kthread still gets it) before sleeping again; 0:
  notifications only. Under TCG everything in the guest runs tens of times slower than on the host, so
  2000 µs is 50 µs in host time. "--cpus 1": the serve process on vCPU 1, away from testpmd's polling lcore.
- "vdpa_sim worker" / "vdpa-svq serve": vCPU time per received packet of vdpa_sim's kernel worker and of
  the whole serve process (/proc, user + system); "vCPUs busy": the share of each vCPU that was not idle
  (vCPU 0 / vCPU 1 / ...). A relay that costs little but leaves vCPU time idle loses to latency (the extra hop
  each way), not to its own work.
- io forwarding after a first burst (--tx-first, --eth-peer set to the device's MAC, which vdpa_sim filters on);
  {slices} slices of {seconds:g} s, interleaved (passthrough, c, py, passthrough, ...); the rate is RX packets over
  the time from "start packet forwarding" to SIGINT (EAL start-up under TCG is not counted); median per row.
- The guest has {smp} vCPUs and testpmd's forwarding lcore busy-polls one of them. In passthrough the rest is
  vdpa_sim's kernel worker; through serve the relay process (eventfd wake-ups, the C or Python hot loop,
  all emulated) runs beside that worker: the columns say how much vCPU time each takes, and how much
  of each vCPU was left idle.{smp_note}

{table}

{verdict}
"""


def machine() -> str:
    import platform
    load = os.getloadavg()[0]
    return (f"{os.cpu_count()} CPUs, {platform.python_implementation()} {platform.python_version()}, "
            f"{time.strftime('%Y-%m-%d')}, load average at start {load:.1f}")


IDLE_SECONDS = 10.0


def idle_cpu(default_kind: tuple[str, ...], device: str, tmp: str, packed: bool) -> float:
    """Share of a CPU that serve (default settings) uses while a frontend is connected, its rings set
    up and armed, and nothing is sent: what an idle VM's queue costs."""
    tag = f"{os.getpid()}-idle-{int(packed)}"
    sock = os.path.join(tmp, f"{tag}.sock")
    proc = backend("serve", device, sock, tag, extra=default_kind)
    try:
        meter = CpuMeter(proc.pid)
        run_frontend(sock, packed, IDLE_SECONDS, f"fe-{tag}", window=meter, tx_first=False)
    finally:
        stop(proc)
    return meter.result[1] / IDLE_SECONDS


def _cpu_seconds(pid: int) -> float:
    """CPU time (user + system) of process `pid` so far: all its threads, those that have exited too
    (a relay thread that ends before the meter reads it still counts); 0 once it is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (FileNotFoundError, ProcessLookupError):
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime, stime: fields 14, 15


def _device_worker_pids() -> list[int]:
    """vdpa_sim's kernel workers ("vDPA sim worker: <name>", one per device; comm keeps 15 chars)."""
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                if Path(f"/proc/{entry}/comm").read_text().startswith("vDPA sim worker"):
                    pids.append(int(entry))
            except FileNotFoundError:
                continue
    return pids


def _cpu_times() -> list[tuple[int, int]]:
    """(busy, total) jiffies of each CPU so far, from /proc/stat (idle and iowait are not busy)."""
    out = []
    for line in Path("/proc/stat").read_text().splitlines():
        name, *values = line.split()
        if name.startswith("cpu") and name != "cpu":
            v = [int(x) for x in values]
            out.append((sum(v) - v[3] - v[4], sum(v)))
    return out


class CpuMeter:
    """Between start() and stop() (the frontend's counted forwarding): the vCPU time of the device's
    kernel worker and of vdpa-svq's process, and how busy each vCPU was."""

    def __init__(self, relay_pid: int | None) -> None:
        self.workers = _device_worker_pids()
        self.relay_pid = relay_pid
        self.result: tuple[float, float, list[float]] = (0.0, 0.0, [])  # (worker s, relay s, busy per vCPU)

    def _now(self) -> tuple[float, float, list[tuple[int, int]]]:
        worker = sum(_cpu_seconds(p) for p in self.workers)
        return worker, _cpu_seconds(self.relay_pid) if self.relay_pid else 0.0, _cpu_times()

    def start(self) -> None:
        self._t0 = self._now()

    def stop(self) -> None:
        w, r, cpus = self._now()
        busy = [(b1 - b0) / max(1, t1 - t0) for (b0, t0), (b1, t1) in zip(self._t0[2], cpus, strict=True)]
        self.result = (w - self._t0[0], r - self._t0[1], busy)


def kernel_guest(args: argparse.Namespace) -> int:
    """Inside the kbench guest: passthrough and serve --impl X slices, interleaved; rates to --json."""
    device = os.environ.get("KBENCH_VDPA_SIM_NET")
    mac = os.environ.get("KBENCH_VDPA_SIM_NET_MAC")
    if not (os.environ.get("KBENCH") and device and mac):
        print("--kernel-guest runs inside tools/kbench (KBENCH_VDPA_SIM_NET unset)", file=sys.stderr)
        return 1
    if shutil.which("dpdk-testpmd") is None:
        print("dpdk-testpmd not found: apt-get install -y dpdk-dev", file=sys.stderr)
        return 1
    variants = [serve_variant(v) for v in args.impls.split(",") if v]
    kinds = ["passthrough", *(label for label, _, _ in variants)]
    rates: dict[str, list[float]] = {k: [] for k in kinds}
    # vCPU microseconds per received packet: (vdpa_sim's worker, the serve process), per slice;
    # and how busy each vCPU was, per slice.
    cpu: dict[str, list[tuple[float, float]]] = {k: [] for k in kinds}
    busy: dict[str, list[list[float]]] = {k: [] for k in kinds}
    errors: list[str] = []
    notes: list[str] = []
    t_start = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="vdpa-svq-kbench-") as tmp:
        for n in range(args.slices):
            for k, kind in enumerate(kinds):
                tag = f"{os.getpid()}-{n}-{k}"
                t0 = time.monotonic()
                be = None
                try:
                    if kind == "passthrough":
                        path = device
                    else:
                        path = os.path.join(tmp, f"{tag}.sock")
                        _, impl, extra = variants[k - 1]
                        be = backend("serve", device, path, tag, impl=impl, timeout=120, extra=("-v", *extra))
                    meter = CpuMeter(be.pid if be is not None else None)
                    rx, tx, secs = frontend(path, False, args.seconds, tag, mac, start_timeout=180, burst=args.burst,
                                            window=meter)
                    worker_s, relay_s, vcpu_busy = meter.result
                except Exception as e:  # noqa: BLE001 -- reported, the other rows still run
                    errors.append(f"slice {n} {kind}: {e}")
                    print(f"slice {n}: {kind}: FAILED {e}", file=sys.stderr, flush=True)
                    continue
                finally:
                    if be is not None:
                        # A queue the relay stopped (the frontend's traffic then stalls) is worth saying.
                        for line in stop(be).splitlines():
                            if " stopped: " in line or "error" in line.lower():
                                notes.append(f"slice {n} {kind}: {line.strip()}")
                                print(f"slice {n}: {kind}: {line.strip()}", file=sys.stderr, flush=True)
                            elif line.lstrip().startswith(("queue ", "relay loop:")):
                                print(f"slice {n}: {kind}: {line.strip()}", file=sys.stderr, flush=True)
                rates[kind].append(rx / secs)
                if rx:
                    cpu[kind].append((worker_s * 1e6 / rx, relay_s * 1e6 / rx))
                busy[kind].append(vcpu_busy)
                print(f"slice {n}: {kind:26} RX {rx:>9} TX {tx:>9} in {secs:5.2f} s {rx / secs:>10,.0f} pps "
                      f"(cell {time.monotonic() - t0:.0f} s)", file=sys.stderr, flush=True)
    result = {"device": device, "kernel": os.uname().release, "smp": os.cpu_count(), "slices": args.slices,
              "seconds": args.seconds, "kinds": kinds, "rates": rates, "cpu": cpu, "busy": busy,
              "errors": errors, "notes": notes,
              "guest_seconds": time.monotonic() - t_start}
    if args.json:
        Path(args.json).write_text(json.dumps(result))
    print(kernel_table(result)[0])
    return 0 if all(rates.values()) else 1


def serve_variant(spec: str) -> tuple[str, str, tuple[str, ...]]:
    """"c" / "py" / "c/poll=50" / "c/poll=50/cpus=0" -> (row label, relay impl, extra serve arguments)."""
    impl, *opts = spec.split("/")
    extra: list[str] = []
    for opt in opts:
        key, _, value = opt.partition("=")
        if key not in ("poll", "cpus") or not value:
            raise SystemExit(f"--impls: {spec!r}: options are /poll=US and /cpus=LIST")
        extra += ["--poll-us" if key == "poll" else "--cpus", value]
    return " ".join(["vdpa-svq serve --impl", impl, *extra]), impl, tuple(extra)


def kernel_table(r: dict) -> tuple[str, str]:
    """The markdown table and the verdict line of a --kernel-guest result."""
    kinds, rates = r["kinds"], r["rates"]
    base = statistics.median(rates["passthrough"]) if rates.get("passthrough") else None
    lines = [f"| path ({r['slices']} slices of {r['seconds']:g} s) | median RX pps | min | max | slices | "
             "/ passthrough (medians) | vdpa_sim worker, vCPU µs/packet | vdpa-svq serve, vCPU µs/packet | "
             "vCPUs busy |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    cpu = r.get("cpu", {})

    def vcpus_busy(kind: str) -> str:
        slices = r.get("busy", {}).get(kind) or []
        if not slices:
            return "-"
        return " / ".join(f"{statistics.median(s[i] for s in slices):.0%}" for i in range(len(slices[0])))

    def per_packet(kind: str, i: int) -> str:
        v = [c[i] for c in cpu.get(kind, [])]
        return f"{statistics.median(v):.1f}" if v and (i == 0 or kind != "passthrough") else "-"

    ratios = {}
    for kind in kinds:
        v = rates.get(kind) or []
        if not v:
            lines.append(f"| {kind} | failed in every slice | | | 0 | |")
            continue
        med = statistics.median(v)
        ratio = f"{med / base:.2f}x" if base else "-"
        if base and kind != "passthrough":
            ratios[kind] = med / base
        stalled = sum(1 for x in r.get("notes", []) if f" {kind}: " in x)
        label = f"{kind} (relay stopped a queue in {stalled} slice(s): traffic stalled)" if stalled else kind
        lines.append(f"| {label} | {med:,.0f} | {min(v):,.0f} | {max(v):,.0f} | {len(v)} | {ratio} | "
                     f"{per_packet(kind, 0)} | {per_packet(kind, 1)} | {vcpus_busy(kind)} |")
    verdict = ["Target (issue 15): the default (`vdpa-svq serve --impl c`) >= 0.8x passthrough; "
               "the other rows for comparison."]
    worker = [c[0] for c in cpu.get("passthrough", [])]
    for kind, x in ratios.items():
        met = (": met" if x >= 0.8 else ": NOT met") if kind == "vdpa-svq serve --impl c" else ""
        line = f"- {kind}: {x:.2f}x{met}."
        relay = [c[1] for c in cpu.get(kind, [])]
        if worker and relay:
            # Sharing one vCPU with a busy device worker, the relay's time per packet is the worker's loss.
            w, q = statistics.median(worker), statistics.median(relay)
            line += (f" The relay spends {q:.1f} vCPU µs per packet, the device's worker {w:.1f} (in passthrough): "
                     f"where the two share a saturated vCPU, that bounds the rate at about {w / (w + q):.2f}x.")
        verdict.append(line)
    for e in r.get("errors", []):
        verdict.append(f"- failed: {e.splitlines()[0]}")
    counts: dict[str, int] = {}
    for note in r.get("notes", []):  # "slice N KIND: vdpa-svq: connection M: queue ..." -> once per message
        key = re.sub(r"^slice \d+ |connection \d+: | at index \d+", "", note)
        counts[key] = counts.get(key, 0) + 1
    for key, n in counts.items():
        verdict.append(f"- in {n} slice(s): {key}")
    return "\n".join(lines), "\n".join(verdict)


def smp_note(smp: int, accel: str) -> str:
    """What a guest with more vCPUs than the host has CPUs means for the figures (TCG: a host thread each)."""
    host = os.cpu_count() or 1
    if accel != "TCG" or smp <= host:
        return ""
    return (f"\n- {smp} vCPUs on {host} host CPUs: under TCG each vCPU is a host thread, so they take turns on the"
            "\n  host's CPUs. A busy-polling vCPU (testpmd's) then takes host time from the others; what a vCPU"
            "\n  gains is the guest scheduler's freedom to run serve and vdpa_sim's worker at once, not more CPU.")


def kernel_host(args: argparse.Namespace) -> int:
    """Boot the kbench guest once, run --kernel-guest there, print (and --write) the table."""
    repo = Path(__file__).resolve().parents[1]
    with tempfile.TemporaryDirectory(prefix="vdpa-svq-kbench-out-", dir=repo.parent) as out:
        res = Path(out) / "kernel-bench.json"
        cmd = [sys.executable, str(repo / "tools" / "kbench"), "run", "--timeout", f"{args.timeout:g}",
               *(["--smp", str(args.smp)] if args.smp else []), "--out", out,
               "--", sys.executable, "-m", "bench.vhost_user", "--kernel-guest",
               "--slices", str(args.slices), "--seconds", f"{args.seconds:g}", "--impls", args.impls,
               "--json", str(res), *(["--burst", str(args.burst)] if args.burst else [])]
        print("$ " + " ".join(cmd), file=sys.stderr, flush=True)
        rc = subprocess.call(cmd, cwd=repo)
        if not res.exists():
            print(f"kernel bench produced no result (kbench run exited {rc})", file=sys.stderr)
            return rc or 1
        r = json.loads(res.read_text())
    accel = subprocess.run([sys.executable, str(repo / "tools" / "kbench"), "status"], capture_output=True,
                           text=True, cwd=repo).stdout
    accel = "KVM" if "accel  KVM" in accel else "TCG"
    table, verdict = kernel_table(r)
    print("\n" + table + "\n\n" + verdict)
    if args.write:
        # A run with --smp gets its own section, beside the default guest's.
        section = "vhost-user-kernel" + (f"-smp{args.smp}" if args.smp else "")
        write_section(args.write, section, KERNEL_SECTION.format(
            machine=machine(), kernel=r["kernel"], accel=accel, smp=r["smp"], smp_note=smp_note(r["smp"], accel),
            device=r["device"],
            slices=r["slices"], seconds=r["seconds"], table=table, verdict=verdict))
        print(f"wrote {args.write}", file=sys.stderr)
    return rc


if __name__ == "__main__":
    sys.exit(main())
