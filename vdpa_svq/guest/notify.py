"""The driver's ends of a queue's notifiers: eventfds, as a VMM's ioeventfd (kick) and irqfd (call) are."""

from __future__ import annotations

import os
import select
from collections.abc import Sequence


def new_eventfd() -> int:
    """A notifier: non-blocking (a reader that lost the race to another must not block), closed on exec."""
    return os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)


def consume(fd: int) -> bool:
    """Reset an eventfd that select() reported readable; False if another reader emptied it first."""
    try:
        os.eventfd_read(fd)
    except BlockingIOError:
        return False
    return True


def wait_notified(fds: Sequence[int], timeout: float) -> list[int]:
    """Block until one of `fds` fires or `timeout` seconds pass; the ones that fired, each consumed."""
    ready, _, _ = select.select(fds, [], [], timeout)
    return [fd for fd in ready if consume(fd)]
