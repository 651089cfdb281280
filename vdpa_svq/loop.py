"""The relay's event loop: one thread, epoll over eventfds, a handler per fd.

Kick and call eventfds are edge-like counters: the loop reads (clears) an fd before running its
handler, so a notification that arrives while the handler runs is seen on the next poll.

RelayLoop runs a pump: C relays run in the C Pump (vdpa_svq._relay), with no Python per wake-up;
Python relays (and any relay when the C relay is not built) in the Python Pump (pump.py), its
readable reference, which the C mirrors. Both do the same: `poll_us` > 0 turns on busy polling
after each burst, for a fixed window; `poll_us="auto"` for a window the pump learns from the
traffic (see pump.py's docstring), at most ADAPTIVE_MAX_US.

RelayLoops is a session's set of them: queue pairs round-robin over its threads (half the CPUs, or
one per CPU asked for, pinned).
The C pump relays without the GIL, so C relays in different threads run in parallel; Python
relays take turns on the GIL.
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Callable, Sequence
from typing import Any

from vdpa_svq import pump as py_pump
from vdpa_svq.native import Pump  # None when the C relay is not built: the Python pump runs everything

ADAPTIVE = "auto"  # poll_us: a polling window learnt from the traffic, up to ADAPTIVE_MAX_US
# The learnt window's cap: a wake-up later than this after the last burst counts as idle. Long
# enough for the gaps between a TCG guest's bursts (the kernel bench needed ~2 ms by hand, in
# guest time that runs slower), short enough that an idle queue costs one short spin.
ADAPTIVE_MAX_US = 2000
Polling = int | str  # microseconds of busy polling after each burst (0: none), or ADAPTIVE


def check_polling(poll_us: Polling) -> Polling:
    """poll_us itself if it is a valid setting; ValueError otherwise."""
    if poll_us == ADAPTIVE or (isinstance(poll_us, int) and not isinstance(poll_us, bool) and poll_us >= 0):
        return poll_us
    raise ValueError(f"poll_us must be >= 0 or {ADAPTIVE!r}, not {poll_us!r}")


def signal_eventfd(fd: int) -> None:
    """Add one to an eventfd (non-blocking); a counter already at its maximum is signalled already."""
    with contextlib.suppress(BlockingIOError):
        os.eventfd_write(fd, 1)


class EventfdNotifier:
    """Notify the other side through an eventfd; the C relay writes `fd` itself, without calling us."""

    def __init__(self, fd: int) -> None:
        self.fd = fd

    def __call__(self) -> None:
        signal_eventfd(self.fd)


def _name_os_thread(thread: threading.Thread, name: str) -> None:
    """Give the (started) thread `name` where top -H, ps -L and perf show it: a relay thread otherwise
    reads "python" like every other thread of the process. The kernel keeps 15 bytes: the last 15,
    so that the numbers of "vdpa-svq-relay10" and "vdpa-svq-relay11" stay apart."""
    try:
        with open(f"/proc/self/task/{thread.native_id}/comm", "w") as f:
            f.write(name[-15:])
    except OSError:  # no procfs: the name is a convenience only
        pass


class RelayLoop:
    """The relay's thread: runs the pump that fits its relays (C relays: the C Pump; Python
    relays: the Python one; a loop runs one kind), with the polling `poll_us` asks for, on CPU
    `cpu` only when given."""

    def __init__(self, name: str = "vdpa-svq-relay", *, poll_us: Polling = 0, cpu: int | None = None) -> None:
        self.name = name
        self.poll_us = check_polling(poll_us)
        self.cpu = cpu
        self._pump: Any = None  # picked by the first relay (callables alone: the C one when built)
        self._callables: list[tuple[int, Callable[[], None]]] = []  # for a pump picked anew
        self._has_relays = False
        self._thread: threading.Thread | None = None
        self.error: BaseException | None = None  # what stopped the loop, if it died

    def _pick_pump(self, relay: Any = None) -> Any:
        """The pump for `relay` (or for callables alone); the callables added so far move along
        when the first relay picks the other kind."""
        c = Pump is not None and (relay is None or relay.impl == "c")
        kind = Pump if c else py_pump.Pump
        if self._pump is not None and type(self._pump) is kind:
            return self._pump
        if self._has_relays:
            raise ValueError("a relay loop runs relays of one implementation, C or Python, not both")
        if self.running:
            raise RuntimeError("relays join the loop before it runs (a new fd of one may come later)")
        self._close_pump()
        self._pump = kind()
        for fd, fn in self._callables:
            self._pump.add_callable(fd, fn)
        return self._pump

    def add(self, fd: int, handler: Callable[[], None]) -> None:
        """Run handler() when fd (an eventfd) is written."""
        (self._pump or self._pick_pump()).add_callable(fd, handler)
        self._callables.append((fd, handler))

    def add_relay(self, fd: int, relay: Any, which: str) -> None:
        """fd is the guest's kick ("kick") or the device's call ("call") eventfd of `relay`."""
        pump = self._pick_pump(relay)
        pump.add_relay(fd, relay if isinstance(pump, py_pump.Pump) else relay.c_relay, which)
        self._has_relays = True

    @property
    def wakeups(self) -> int:
        return self.stats["wakeups"]

    @property
    def stats(self) -> dict[str, int]:
        """wakeups (eventfd wake-ups handled), and with polling: poll_phases, poll_rounds; adaptive:
        poll_window_ns (the window learnt so far), window_grows, window_shrinks, contended_phases
        (phases that competed for the CPU, each of which stopped the polling)."""
        if self._pump is None:
            return {"wakeups": 0, "poll_phases": 0, "poll_rounds": 0, "poll_window_ns": 0,
                    "window_grows": 0, "window_shrinks": 0, "contended_phases": 0}
        return dict(self._pump.stats)

    def start(self) -> None:
        pump = self._pump or self._pick_pump()
        self._thread = threading.Thread(target=self._run, args=(pump,), name=self.name, daemon=True)
        self._thread.start()
        _name_os_thread(self._thread, self.name)

    def _run(self, pump: Any) -> None:
        try:
            if self.cpu is not None:
                os.sched_setaffinity(0, {self.cpu})  # this thread only (Linux: 0 is the caller)
            if self.poll_us == ADAPTIVE:
                pump.run(0, ADAPTIVE_MAX_US)
            else:
                pump.run(self.poll_us)
        except BaseException as e:  # recorded, and reported by whoever stops or checks the loop
            self.error = e

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def stop(self) -> None:
        if self._thread is not None:
            self._pump.stop()
            self._thread.join()
            self._thread = None

    def _close_pump(self) -> None:
        if isinstance(self._pump, py_pump.Pump):
            self._pump.close()  # the C Pump closes its fds when it goes away
        self._pump = None

    def close(self) -> None:
        self.stop()
        self._close_pump()


def default_relay_threads(cpus: Sequence[int] = ()) -> int:
    """How many relay threads a session runs: one per CPU it was given (`cpus`), else half the
    CPUs this process may use, at least one. Half, because the rest is the peers': a guest's
    vCPUs or a busy-polling frontend and the device's own threads. More relay threads than free
    CPUs do not add speed, they take it: two polling relays on one CPU pause each other's polling
    (measured on 2 CPUs, testpmd polling one: 2 pairs in 2 threads moved 0.55x of what one thread did)."""
    return len(cpus) if cpus else max(1, len(os.sched_getaffinity(0)) // 2)


class RelayLoops:
    """A session's relay threads, so that queue pairs relay in parallel (the C pump runs without
    the GIL): `threads` RelayLoops (default_relay_threads when None), pair p in thread
    p % threads. `cpus`: pin thread i to cpus[i % len(cpus)]; empty: the threads run wherever the
    process may (the scheduler places them).

    A relay joins the loop of its pair with its first fd; its later fds (a new kick fd while it
    runs) go to the same loop. Plain callables (add) run in the loop of the pair they name."""

    def __init__(self, name: str = "vdpa-svq-relay", *, poll_us: Polling = 0, cpus: Sequence[int] = (),
                 threads: int | None = None) -> None:
        self.name = name
        self.poll_us = check_polling(poll_us)
        self.cpus = list(cpus)
        self.threads = default_relay_threads(self.cpus) if threads is None else threads
        if self.threads < 1:
            raise ValueError(f"a session needs at least one relay thread, not {self.threads}")
        self.loops: dict[int, RelayLoop] = {}  # thread number -> its loop
        self._loop_of: dict[int, RelayLoop] = {}  # id(relay) -> the loop it joined

    def _loop(self, pair: int) -> RelayLoop:
        i = pair % self.threads
        if i not in self.loops:
            cpu = self.cpus[i % len(self.cpus)] if self.cpus else None
            self.loops[i] = RelayLoop(f"{self.name}{i}", poll_us=self.poll_us, cpu=cpu)
        return self.loops[i]

    def add(self, fd: int, handler: Callable[[], None], *, pair: int = 0) -> None:
        """Run handler() when fd is written, in the thread of queue pair `pair`."""
        self._loop(pair).add(fd, handler)

    def add_relay(self, fd: int, relay: Any, which: str, *, pair: int = 0) -> None:
        """fd is `relay`'s guest kick ("kick") or device call ("call") eventfd; the relay runs in
        the thread of queue pair `pair` (of the loop it joined first, for its later fds)."""
        loop = self._loop_of.get(id(relay)) or self._loop(pair)
        loop.add_relay(fd, relay, which)
        self._loop_of[id(relay)] = loop

    @property
    def stats(self) -> dict[str, int]:
        """RelayLoop.stats summed over the threads (poll_window_ns: the longest window)."""
        total = RelayLoop().stats
        for loop in self.loops.values():
            for k, v in loop.stats.items():
                total[k] = max(total[k], v) if k == "poll_window_ns" else total[k] + v
        return total

    @property
    def error(self) -> BaseException | None:
        """What stopped a thread (the first one that died), if any."""
        return next((loop.error for loop in self.loops.values() if loop.error is not None), None)

    @property
    def running(self) -> bool:
        return any(loop.running for loop in self.loops.values())

    def start(self) -> None:
        for loop in self.loops.values():
            loop.start()

    def stop(self) -> None:
        for loop in self.loops.values():
            loop.stop()

    def close(self) -> None:
        try:
            self.stop()
        finally:
            for loop in self.loops.values():
                loop.close()
