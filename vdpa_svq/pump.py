"""The relay loop's pump in Python: the readable reference of the C Pump (_relay.c mirrors it).

One thread, epoll over the guests' kick and the device's call eventfds. A wake-up reads (clears)
the eventfd and runs the relay's on_guest_kick / on_device_call; sources that are plain callables
are called. Eventfds are edge-like counters: a notification that arrives while a handler runs is
seen on the next epoll round.

Polling (poll_us > 0): after a wake-up of a relay (a kick or a call), the pump keeps every ring's
notifications off and polls the rings itself until nothing arrived for poll_us, then re-arms:
turns notifications back on and relays whatever raced in before they were on (the relay's drains
loop until enabling finds nothing new, QEMU's `while (!enable_notification)` pattern), and sleeps
in epoll again. Under load the guest and the device make no notification syscalls and the relay
no wake-ups: a CPU's worth of spinning bought for latency, as DPDK's PMDs do.

Adaptive polling (adaptive_max_us > 0): the window is learnt, as KVM's halt polling learns its
own (adapt_window): a wake-up soon after a polling phase gave up (sooner than the cap) doubles the
window, since a longer one would have caught it; a wake-up later than the cap halves it (to 0: no
polling), since the spin was waste. Steady traffic grows the window until the pump polls without
a break; an idle queue costs one window's spin, then nothing.

The window alone would spin through any gap shorter than the cap: at 10k packets/s (a packet every
100 µs) a whole CPU for a few µs of work a packet, and where the peers need this CPU (more polling
threads than CPUs) the spin takes it from the very threads that would bring the next packet. So an
adaptive phase also has to pay for itself (spin_credit): it may spin idle only on credit, which
each poll round earns at POLL_PAYBACK times the time the round spent relaying, up to the window.
Under load the rounds earn more than the gaps cost, and the pump polls without a break; sparse
traffic runs out of credit within a gap and goes back to notifications (one wake-up a burst
instead of a CPU); a starved peer brings no work, so the credit runs out and the pump sleeps.

Nor may it spin where the CPU is wanted: the idle spin yields at each turn, and a yield that
returns only after HOG_NS or more lost the CPU to a busy thread for a scheduler slice (a device's
worker that takes the CPU for a burst of work and sleeps again gives it back long before). A phase
with such a yield (contended) shared its CPU with a hog, on a machine with more busy threads than
CPUs: there each yield loses the CPU for a whole slice, where a sleeper woken by a notification
would run at once, and each spin delays the threads that bring the work. So the window falls to 0
and polling pauses (notifications only) for a while (contention_pause: 10 ms, doubling while the
next try is contended too, up to 1 s); an uncontended phase ends the pauses. (Counting involuntary
context switches instead, as this once did, took the odd kworker or a device worker's short turn
for a hog: on a quiet machine a third of the phases ended in a pause.)

Names follow the C (pump_run is Pump.run, svq_rearm is ShadowVirtqueue.rearm, ...), so that each
C function can say which of these it mirrors.
"""

from __future__ import annotations

import contextlib
import os
import select
import time
from collections.abc import Callable
from dataclasses import dataclass

from vdpa_svq.errors import DeviceRingError, GuestRingError
from vdpa_svq.relay import ShadowVirtqueue

ADAPT_START_NS = 10_000  # the adaptive window's first step, and an adaptive phase's first credit
# An adaptive polling phase spins idle for at most this many times the time it spent relaying (plus
# its first credit): it stops before the spin costs more than a few wake-ups would have (a wake-up,
# both sides' syscalls and the scheduler's, costs about what relaying a small burst does).
POLL_PAYBACK = 4
# A polling phase is contended when one of its yields kept the CPU from us this long: a busy thread
# shares the CPU and ran its scheduler slice (1.5 ms and more on 2 CPUs), where an idle CPU gives
# it back in a microsecond and a device's worker after its burst of work.
HOG_NS = 1_000_000
PAUSE_MIN_NS, PAUSE_MAX_NS = 10_000_000, 1_000_000_000  # no polling for this long after a contended phase

# Why a relay stops when one of its fds is not a working eventfd any more.
HUNG_UP = {
    "kick": (GuestRingError, "the guest's kick fd hung up or is not an eventfd"),
    "call": (DeviceRingError, "the device's call fd hung up or is not an eventfd"),
}


def adapt_window(window: int, gap: int, cap: int) -> int:
    """The adaptive pump's next polling window (ns), after a wake-up `gap` ns after it last worked."""
    if gap < cap:  # a window this much longer would have caught the wake-up: grow
        return min(ADAPT_START_NS, cap) if window == 0 else min(window * 2, cap)
    return 0 if window // 2 < ADAPT_START_NS else window // 2  # idle longer than the cap: the spin was waste


def spin_credit(left: int, busy: int, window: int) -> int:
    """How long (ns) an adaptive polling phase may spin idle from now: the credit `left` when a poll
    round found work, plus what the round earned (POLL_PAYBACK times its `busy` ns), at most the window."""
    return min(window, left + POLL_PAYBACK * busy)


def contended(longest_yield_ns: int) -> bool:
    """Whether a polling phase whose longest yield kept the CPU from it for longest_yield_ns shared
    its CPU with a busy thread."""
    return longest_yield_ns >= HOG_NS


def contention_pause(pause: int, was_contended: bool) -> int:
    """How long (ns) to poll no more after a polling phase, given the pause after the previous one:
    none after an uncontended phase; after a contended one, twice the last pause, within the bounds."""
    return min(max(pause * 2, PAUSE_MIN_NS), PAUSE_MAX_NS) if was_contended else 0


@dataclass
class PumpSource:
    """What one fd in the epoll set wakes: a relay's kick or call, or a plain callable."""

    fd: int
    which: str  # "kick", "call", or "callable"
    relay: ShadowVirtqueue | None = None
    fn: Callable[[], None] | None = None


class Pump:
    """The relay loop for Python relays: dispatch by epoll, optional busy polling, the re-arm."""

    def __init__(self) -> None:
        self.relays: list[ShadowVirtqueue] = []  # the ones the poller polls
        self.sources: dict[int, PumpSource] = {}
        self.running = False
        self._stop = False  # a stopped pump stays stopped
        self._epoll = select.epoll()
        self._stop_fd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        self._epoll.register(self._stop_fd, select.EPOLLIN)
        self.wakeups = self.poll_phases = self.poll_rounds = 0
        self.window_ns = self.window_grows = self.window_shrinks = self.contended_phases = 0

    # -- sources ------------------------------------------------------------------------------
    def add_relay(self, fd: int, relay: ShadowVirtqueue, which: str) -> None:
        """fd is the guest's kick ("kick") or the device's call ("call") eventfd of `relay`."""
        if which not in HUNG_UP:
            raise ValueError(f"which must be 'kick' (the guest's) or 'call' (the device's), not {which}")
        if relay not in self.relays and self.running:
            raise RuntimeError("relays join the pump before it runs (a new fd of one may come later)")
        self._add(PumpSource(fd, which, relay=relay))
        if relay not in self.relays:
            self.relays.append(relay)

    def add_callable(self, fd: int, fn: Callable[[], None]) -> None:
        """fn() when fd is readable."""
        if not callable(fn):
            raise TypeError("handler must be callable")
        self._add(PumpSource(fd, "callable", fn=fn))

    def _add(self, src: PumpSource) -> None:
        self._epoll.register(src.fd, select.EPOLLIN)
        self.sources[src.fd] = src

    @property
    def stats(self) -> dict[str, int]:
        return {"wakeups": self.wakeups, "poll_phases": self.poll_phases, "poll_rounds": self.poll_rounds,
                "poll_window_ns": self.window_ns, "window_grows": self.window_grows,
                "window_shrinks": self.window_shrinks, "contended_phases": self.contended_phases}

    # -- the loop -----------------------------------------------------------------------------
    def run(self, poll_us: int = 0, adaptive_max_us: int = 0) -> None:
        """Relay until stop(). poll_us: a fixed polling window after each burst; adaptive_max_us: a
        learnt window, at most this long."""
        if poll_us < 0 or adaptive_max_us < 0 or (poll_us and adaptive_max_us):
            raise ValueError("poll_us and adaptive_max_us must be >= 0, and not both set")
        if self.running:
            raise RuntimeError("the pump is already running")
        cap = adaptive_max_us * 1000
        idle_since = time.monotonic_ns()  # when the pump last stopped working (for the adaptive gap)
        pause, paused_until = 0, 0  # after contended phases: no polling until then
        self.running = True
        try:
            while not self._stop:
                worked = False
                ready = self._epoll.poll(1.0)
                woke = time.monotonic_ns()  # the wake-up's work, from here, earns a first credit
                for fd, events in ready:
                    if self._stop:
                        break
                    src = self.sources.get(fd)
                    if src is None:
                        continue  # the stop fd: the stop flag says it all
                    try:
                        count = os.read(fd, 8)
                    except BlockingIOError:
                        continue  # another reader was first
                    except OSError:
                        count = b""
                    if len(count) != 8 or events & (select.EPOLLHUP | select.EPOLLERR):
                        self.drop(src)
                        continue
                    self.wakeups += 1
                    self.dispatch(src)
                    worked |= src.which != "callable"
                if not worked:
                    continue
                now = time.monotonic_ns()
                if not cap:
                    if poll_us:
                        self.poll(poll_us * 1000)
                elif now >= paused_until:
                    window = adapt_window(self.window_ns, now - idle_since, cap)
                    self.window_grows += window > self.window_ns
                    self.window_shrinks += window < self.window_ns
                    self.window_ns = window
                    if window > 0:
                        was_contended = self.poll(window, spin_credit(min(ADAPT_START_NS, window), now - woke, window))
                        pause = contention_pause(pause, was_contended)
                        if was_contended:  # the spin took the CPU from runnable threads: pause
                            self.contended_phases += 1
                            self.window_shrinks += 1
                            self.window_ns = 0
                            paused_until = time.monotonic_ns() + pause
                idle_since = time.monotonic_ns()
        finally:
            self.running = False

    def dispatch(self, src: PumpSource) -> None:
        """Run what a wake-up of `src` asks for (a relay keeps its RingError; others end the pump)."""
        if src.relay is None:
            assert src.fn is not None
            src.fn()
        elif src.which == "kick":
            src.relay.on_guest_kick()
        else:
            src.relay.on_device_call()

    def any_work(self) -> bool:
        return any(relay.has_work() for relay in self.relays)

    def for_each(self, work: Callable[[ShadowVirtqueue], None]) -> None:
        """work(relay) on every relay still live (a relay keeps its RingError to itself)."""
        for relay in self.relays:
            if relay.error is None:
                work(relay)

    def poll(self, poll_ns: int, credit: int | None = None) -> bool:
        """A polling phase: poll every ring, notifications off, until nothing came for poll_ns; then
        re-arm them (which relays whatever raced in between the last poll and the re-enable).
        Adaptive (a first `credit` given, poll_ns the learnt window): until nothing came for as
        long as the phase's credit allows (spin_credit). Whether the phase was contended."""
        self.poll_phases += 1
        longest_yield = 0  # the longest a yield of this phase kept us off the CPU
        deadline = time.monotonic_ns() + (poll_ns if credit is None else credit)
        while not self._stop:
            if not self.any_work():
                # Idle: spin, yielding the CPU at each turn (and the GIL with it): where the device's
                # worker shares this CPU, a plain spin would hold it off for a scheduler slice.
                found = False
                t = time.monotonic_ns()
                while not self._stop and t < deadline:
                    if self.any_work():
                        found = True
                        break
                    os.sched_yield()
                    back = time.monotonic_ns()
                    longest_yield = max(longest_yield, back - t)
                    t = back
                if not found:
                    break
            self.poll_rounds += 1
            start = time.monotonic_ns()
            self.for_each(ShadowVirtqueue.poll_once)
            now = time.monotonic_ns()
            if credit is not None:  # what is left of the credit, and what this round earned
                credit = spin_credit(max(deadline - start, 0), now - start, poll_ns)
            deadline = now + (poll_ns if credit is None else credit)
        self.for_each(ShadowVirtqueue.rearm)
        return contended(longest_yield)

    def drop(self, src: PumpSource) -> None:
        """A source that is not a working eventfd any more (hung up, in error, read() gave no
        counter): a peer's fd that would otherwise wake us forever. Out of the epoll set; its relay
        stops with the reason. A callable's source ends the pump instead: there is no queue to stop."""
        self._epoll.unregister(src.fd)
        del self.sources[src.fd]
        if src.relay is None:
            raise OSError(f"fd {src.fd} hung up or is not an eventfd")
        if src.relay.error is None:
            cls, reason = HUNG_UP[src.which]
            src.relay.error = cls(src.relay.name, reason)

    def stop(self) -> None:
        """Make run() return (from any thread)."""
        self._stop = True
        with contextlib.suppress(BlockingIOError):  # a counter at its maximum is signalled already
            os.eventfd_write(self._stop_fd, 1)

    def close(self) -> None:
        """Release the epoll and the stop fd (the pump must not be running)."""
        self._epoll.close()
        os.close(self._stop_fd)
