"""One QEMU guest of the migration test: its command line, its serial console, its QMP monitor.

The guest's net device is virtio-net-pci on one of two backends:

- vhost-user (`vdpa-svq serve`): guest memory is a shared memfd (`memory-backend-memfd,share=on`),
  so serve maps it; the device has `vectors=0` (INTx): QEMU 7.2 under TCG crashes in
  msix_set_vector_notifiers with a vhost-user net device that has MSI-X vectors.
- QEMU's own userspace virtio-net, the reference: `-netdev socket,udp=` sending to its own
  address, so every frame the guest sends comes back to it (as soft:net loops TX to RX).

The console (ttyS0) is QEMU's stdio: netcheck's report lines come out of it and its commands go in.
QMP is a unix socket, driven with the qemu.qmp package's synchronous client.
"""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import subprocess
import threading
import time
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

from vdpa_svq.errors import VdpaSvqError
from vdpa_svq.migration.guest import GuestImage, kbench

MEM_BYTES = 256 << 20
MEM = f"{MEM_BYTES >> 20}M"
MAC = "52:54:00:12:34:70"
# Jumbo. Without MRG_RXBUF Linux receives into chains of whole pages (its big-packets mode) that only
# the device writes; with it (soft:net offers it), into page fragments that it then builds its skbs
# around, writing into the same pages itself (see migration/run.py's Config.mrg_rxbuf).
MTU = 9000


class VmError(VdpaSvqError):
    """QEMU failed, or the guest did not do what the test waits for; the message has the console tail."""


QEMU_ENV = "VDPA_SVQ_QEMU"


@cache
def qemu_binary() -> str:
    """The QEMU the test runs: $VDPA_SVQ_QEMU, else the backports QEMU `tools/kbench setup` unpacked.

    Not the host's bookworm QEMU 7.2: its TCG live migration loses guest-CPU writes (a stopped source
    and its destination differ in a few pages, kernel stacks and page-allocator lists among them, with
    QEMU's own virtio-net as with vhost-user), and the guest dies on the destination.
    """
    if os.environ.get(QEMU_ENV):
        return os.environ[QEMU_ENV]
    kb = kbench()
    found = kb.Layout(kb.cache_dir()).qemu_binary()
    if found is None:
        raise VmError(f"no backports QEMU in the kernel bench's cache: run `.venv/bin/python tools/kbench setup` "
                      f"(make test does), or point {QEMU_ENV} at a QEMU >= 8")
    return str(found)


@dataclass(frozen=True)
class NetBackend:
    """How the guest's NIC is backed: vhost-user on `socket`, or QEMU's own virtio-net on UDP `port`."""

    kind: str  # "vhost-user" or "qemu"
    socket: str = ""
    port: int = 0

    def argv(self, packed: bool, queues: int, mrg_rxbuf: bool = True) -> list[str]:
        # vectors=0 on both backends: the same interrupt path (INTx) for the measured guest and the reference.
        dev = (f"virtio-net-pci,netdev=net0,packed={'on' if packed else 'off'},event_idx=on,disable-legacy=on,"
               f"romfile=,mac={MAC},host_mtu={MTU},vectors=0,mq={'on' if queues > 1 else 'off'}"
               + ("" if mrg_rxbuf else ",mrg_rxbuf=off"))
        if self.kind == "vhost-user":
            return ["-chardev", f"socket,id=chr0,path={self.socket}",
                    "-netdev", f"vhost-user,id=net0,chardev=chr0,queues={queues}", "-device", dev]
        if queues > 1:
            raise VmError("QEMU's own backend takes one queue pair here (-netdev socket has no multiqueue)")
        addr = f"127.0.0.1:{self.port}"
        return ["-netdev", f"socket,id=net0,udp={addr},localaddr={addr}", "-device", dev]


@dataclass
class Report:
    """One line netcheck printed: its tag (NETCHECK, NETCHECK-FINAL, ...) and its JSON."""

    tag: str
    data: dict[str, Any]
    at: float = field(default_factory=time.monotonic)


class Vm:
    """A QEMU process with the test guest; `incoming` makes it a migration destination."""

    def __init__(self, name: str, image: GuestImage, net: NetBackend, workdir: Path, *, packed: bool,
                 queues: int = 1, streams: int = 1, smp: int = 1, incoming: str | None = None,
                 paused: bool = False, rate: int = 0, mrg_rxbuf: bool = True) -> None:
        self.name = name
        self.workdir = workdir
        self.qmp_path = str(workdir / f"{name}.qmp")
        self.console: list[str] = []
        self.reports: list[Report] = []
        self._cond = threading.Condition()
        cmdline = f"console=ttyS0 quiet loglevel=3 panic=-1 netcheck_streams={streams} netcheck_rate={rate}"
        self.argv = [
            qemu_binary(), "-name", name, "-machine", "q35", "-accel", "tcg,thread=multi", "-cpu", "max",
            "-m", MEM, "-smp", str(smp), "-nodefaults", "-no-reboot", "-display", "none", "-vga", "none",
            "-serial", "stdio", "-monitor", "none", "-qmp", f"unix:{self.qmp_path},server=on,wait=off",
            "-object", f"memory-backend-memfd,id=mem0,size={MEM},share=on", "-numa", "node,memdev=mem0",
            *net.argv(packed, queues, mrg_rxbuf),
            "-kernel", str(image.kernel), "-initrd", str(image.initrd), "-append", cmdline,
            *(["-incoming", incoming] if incoming else []),
            *(["-S"] if paused else []),  # a destination that stays stopped after the migration (`cont` runs it)
        ]
        self.stderr_path = workdir / f"{name}.stderr"
        with open(self.stderr_path, "wb") as err:
            self.proc = subprocess.Popen(self.argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=err)
        self._reader = threading.Thread(target=self._read_console, daemon=True, name=f"{name}-console")
        self._reader.start()
        self.qmp = self._connect_qmp()

    # -- console -------------------------------------------------------------------------------
    def _read_console(self) -> None:
        assert self.proc.stdout is not None
        with open(self.workdir / f"{self.name}.console", "w") as keep:  # kept with the logs of a failed run
            for raw in self.proc.stdout:
                line = raw.decode("utf-8", "replace").rstrip("\r\n")
                keep.write(line + "\n")
                with self._cond:
                    self.console.append(line)
                    tag, _, rest = line.partition(" ")
                    if tag.startswith("NETCHECK") and rest.startswith("{"):
                        with contextlib.suppress(ValueError):  # a line the console garbled: not a report
                            self.reports.append(Report(tag, json.loads(rest)))
                    self._cond.notify_all()
        with self._cond:
            self._cond.notify_all()

    def tail(self, n: int = 25) -> str:
        err = self.stderr_path.read_text(errors="replace").strip() if self.stderr_path.exists() else ""
        with self._cond:
            lines = self.console[-n:]
        return "\n".join(lines) + (f"\n[{self.name} stderr] {err[-1500:]}" if err else "")

    def wait_report(self, pred, timeout: float, what: str) -> Report:
        """The first report (from now or already seen) for which pred(report) holds."""
        deadline = time.monotonic() + timeout
        seen = 0
        with self._cond:
            while True:
                for r in self.reports[seen:]:
                    if r.tag in ("NETCHECK-FATAL", "NETCHECK-EXIT"):
                        raise VmError(f"{self.name}: the guest gave up: {r.tag} {r.data}\n{self.tail()}")
                    if pred(r):
                        return r
                seen = len(self.reports)
                fatal = next((c for c in self.console if c.startswith(("NETCHECK-FATAL", "Kernel panic"))), None)
                if fatal:
                    raise VmError(f"{self.name}: {fatal}\n{self.tail()}")
                left = deadline - time.monotonic()
                if left <= 0 or self.proc.poll() is not None:
                    state = "timed out" if left <= 0 else f"QEMU exited {self.proc.returncode}"
                    raise VmError(f"{self.name}: {state} waiting for {what}\n{self.tail()}")
                self._cond.wait(min(left, 0.5))

    def last_report(self) -> Report | None:
        with self._cond:
            return next((r for r in reversed(self.reports) if r.tag == "NETCHECK"), None)

    def send(self, command: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(command.encode() + b"\n")
        self.proc.stdin.flush()

    # -- QMP -------------------------------------------------------------------------------------
    def _connect_qmp(self):
        try:
            from qemu.qmp.legacy import QEMUMonitorProtocol
        except ImportError:
            raise VmError("the qemu.qmp package is not installed: pip install -e '.[test]' (make venv)") from None
        deadline = time.monotonic() + 30
        while not os.path.exists(self.qmp_path):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise VmError(f"{self.name}: QEMU did not start (exit {self.proc.poll()}): "
                              f"{shlex.join(self.argv)}\n{self.tail()}")
            time.sleep(0.05)
        qmp = QEMUMonitorProtocol(self.qmp_path)
        qmp.connect()
        return qmp

    def cmd(self, name: str, **args: Any) -> Any:
        try:
            return self.qmp.cmd(name, **args)
        except Exception as e:
            raise VmError(f"{self.name}: QMP {name}: {e}\n{self.tail()}") from None

    def status(self) -> str:
        return self.cmd("query-status")["status"]

    # -- teardown --------------------------------------------------------------------------------
    def quit(self, timeout: float = 20) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(Exception):  # it may be gone already; killed below
                self.qmp.cmd("quit")
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        with contextlib.suppress(Exception):
            self.qmp.close()
        self._reader.join(5)

    def __enter__(self) -> Vm:
        return self

    def __exit__(self, *exc: object) -> None:
        self.quit()
