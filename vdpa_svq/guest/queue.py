"""One virtqueue from the driver's side: its ring and the two eventfds that notify across it."""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Self

from vdpa_svq.guest.notify import new_eventfd, wait_notified
from vdpa_svq.ring import DriverRing

Used = tuple[object, int]  # (token, bytes written), as DriverRing.get_used() gives it


@dataclass
class GuestQueue:
    """Queue `index`: the driver writes `kick_fd` to notify the device, the device writes `call_fd`."""

    index: int
    ring: DriverRing
    kick_fd: int
    call_fd: int
    kicks: int = 0
    calls: int = 0

    @classmethod
    def open(cls, index: int, ring: DriverRing) -> Self:
        """Queue `index` on `ring` with two new eventfds; close() closes them and the ring."""
        return cls(index, ring, new_eventfd(), new_eventfd())

    def close(self) -> None:
        self.ring.close()
        os.close(self.kick_fd)
        os.close(self.call_fd)

    def kick(self) -> bool:
        """Notify the device if its suppression settings ask for it; whether a kick was sent."""
        if not self.ring.kick_needed():
            return False
        os.eventfd_write(self.kick_fd, 1)
        self.kicks += 1
        return True

    def wait_call(self, timeout: float) -> bool:
        """Whether the device called (a used buffer notification) within `timeout` seconds; the call is consumed."""
        fired = bool(wait_notified([self.call_fd], timeout))
        self.calls += fired
        return fired

    def wait_until(self, done: Callable[[], bool], timeout: float) -> bool:
        """Sleep on calls until done() holds; False if `timeout` seconds passed first.

        Interrupts are re-enabled before each sleep and done() asked again: buffers used before the
        re-enable raise no call of their own (VIRTIO 1.2 2.7.14 / 2.8.22), so sleeping on them
        would wait out the whole timeout.
        """
        deadline = time.monotonic() + timeout
        while not done():
            if not self.ring.enable_cb():
                continue  # used buffers already there: no call will come for them
            if done():
                return True
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            self.calls += len(wait_notified([self.call_fd], left))
        return True

    def reap(self, want: int, timeout: float) -> list[Used] | None:
        """Exactly `want` used buffers, in used order, waiting for them; None after `timeout` seconds."""
        got: list[Used] = []

        def enough() -> bool:
            while len(got) < want:
                r = self.ring.get_used()
                if r is None:
                    return False
                got.append(r)
            return True

        return got if self.wait_until(enough, timeout) else None

    def reap_ready(self) -> list[Used]:
        """Every used buffer there is now, without waiting."""
        got = []
        while (r := self.ring.get_used()) is not None:
            got.append(r)
        return got
