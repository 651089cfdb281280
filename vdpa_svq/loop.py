"""The relay's event loop: one thread, epoll over eventfds, a handler per fd.

Kick and call eventfds are edge-like counters: the loop reads (clears) an fd before running its
handler, so a notification that arrives while the handler runs is seen on the next poll.

When the C relay is built, the loop is its Pump (vdpa_svq._relay): C relays are dispatched with no
Python per wake-up, and `poll_us` > 0 turns on busy polling after each burst, for a fixed window;
`poll_us="auto"` for a window the pump learns from the traffic (see the Pump's comment in
_relay.c). Without it, the Python loop below runs everything, event-driven ("auto" polls nothing
there: there is nothing to learn for a loop that cannot poll).
"""

from __future__ import annotations

import contextlib
import os
import select
import threading
from collections.abc import Callable
from typing import Any

from vdpa_svq.errors import DeviceRingError, GuestRingError
from vdpa_svq.native import Pump  # None when the C relay is not built: the Python loop

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


def polls_by_hand(poll_us: Polling) -> bool:
    """A fixed polling window was asked for (which only the C relay's loop can do)."""
    return poll_us != ADAPTIVE and bool(poll_us)

# Why a relay stops when one of its fds is not a working eventfd any more (the C Pump's words).
HUNG_UP = {
    "kick": (GuestRingError, "the guest's kick fd hung up or is not an eventfd"),
    "call": (DeviceRingError, "the device's call fd hung up or is not an eventfd"),
}


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


class RelayLoop:
    def __init__(self, name: str = "vdpa-svq-relay", *, poll_us: Polling = 0) -> None:
        check_polling(poll_us)
        if polls_by_hand(poll_us) and Pump is None:
            raise ValueError("busy polling needs the C relay (vdpa_svq._relay), which is not built")
        self.name = name
        self.poll_us = poll_us
        self._pump: Any = Pump() if Pump is not None else None
        # The Python loop's own state, only when there is no pump (which has its epoll and stop fd).
        self._handlers: dict[int, Callable[[], None]] = {}
        self._relays: dict[int, tuple[Any, str]] = {}  # fd -> (relay, "kick" or "call")
        self._epoll: Any = None
        self._stop = -1
        if self._pump is None:
            self._epoll = select.epoll()
            self._stop = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
            self._epoll.register(self._stop, select.EPOLLIN)
        self._thread: threading.Thread | None = None
        self.error: BaseException | None = None  # what stopped the loop, if it died
        self._wakeups = 0

    def add(self, fd: int, handler: Callable[[], None]) -> None:
        """Run handler() when fd (an eventfd) is written."""
        if self._pump is not None:
            self._pump.add_callable(fd, handler)
            return
        self._handlers[fd] = handler
        self._epoll.register(fd, select.EPOLLIN)

    def add_relay(self, fd: int, relay: Any, which: str) -> None:
        """fd is the guest's kick ("kick") or the device's call ("call") eventfd of `relay`."""
        c_relay = getattr(relay, "c_relay", None)
        if self._pump is not None and c_relay is not None:
            self._pump.add_relay(fd, c_relay, which)
        else:
            self.add(fd, relay.on_guest_kick if which == "kick" else relay.on_device_call)
            self._relays[fd] = (relay, which)

    @property
    def wakeups(self) -> int:
        return self._pump.stats["wakeups"] if self._pump is not None else self._wakeups

    @property
    def stats(self) -> dict[str, int]:
        """wakeups (eventfd wake-ups handled), and with polling: poll_phases, poll_rounds; adaptive:
        poll_window_ns (the window learnt so far), window_grows, window_shrinks."""
        if self._pump is not None:
            return dict(self._pump.stats)
        return {"wakeups": self._wakeups, "poll_phases": 0, "poll_rounds": 0, "poll_window_ns": 0,
                "window_grows": 0, "window_shrinks": 0}

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name=self.name, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            if self._pump is not None:
                if self.poll_us == ADAPTIVE:
                    self._pump.run(0, ADAPTIVE_MAX_US)
                else:
                    self._pump.run(self.poll_us)
            else:
                self._run_python()
        except BaseException as e:  # recorded, and reported by whoever stops or checks the loop
            self.error = e

    def _run_python(self) -> None:
        while True:
            for fd, events in self._epoll.poll(1.0):
                if fd == self._stop:
                    return
                try:
                    count = os.read(fd, 8)
                except BlockingIOError:
                    continue  # another reader was first
                except OSError:
                    count = b""
                if len(count) != 8 or events & (select.EPOLLHUP | select.EPOLLERR):
                    self._drop(fd)
                    continue
                self._wakeups += 1
                self._handlers[fd]()

    def _drop(self, fd: int) -> None:
        """An fd that would wake us forever (hung up, in error, not an eventfd): out of the epoll
        set, and its relay stops with the reason; a plain handler's fd ends the loop."""
        self._epoll.unregister(fd)
        if fd not in self._relays:
            raise OSError(f"fd {fd} hung up or is not an eventfd")
        relay, which = self._relays[fd]
        if relay.error is None:
            cls, reason = HUNG_UP[which]
            relay.error = cls(relay.name, reason)

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def stop(self) -> None:
        if self._thread is not None:
            if self._pump is not None:
                self._pump.stop()
            else:
                os.eventfd_write(self._stop, 1)
            self._thread.join()
            self._thread = None

    def close(self) -> None:
        self.stop()
        if self._pump is None:
            self._epoll.close()
            os.close(self._stop)
