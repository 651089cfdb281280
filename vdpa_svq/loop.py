"""The relay's event loop: one thread, epoll over eventfds, a handler per fd.

Kick and call eventfds are edge-like counters: the loop reads (clears) an fd before running its
handler, so a notification that arrives while the handler runs is seen on the next poll.
"""

from __future__ import annotations

import os
import select
import threading
from collections.abc import Callable


class RelayLoop:
    def __init__(self, name: str = "vdpa-svq-relay") -> None:
        self.name = name
        self._epoll = select.epoll()
        self._handlers: dict[int, Callable[[], None]] = {}
        self._stop = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        self._epoll.register(self._stop, select.EPOLLIN)
        self._thread: threading.Thread | None = None
        self.error: BaseException | None = None  # what stopped the loop, if it died
        self.wakeups = 0

    def add(self, fd: int, handler: Callable[[], None]) -> None:
        self._handlers[fd] = handler
        self._epoll.register(fd, select.EPOLLIN)

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name=self.name, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            while True:
                for fd, _ in self._epoll.poll(1.0):
                    if fd == self._stop:
                        return
                    try:
                        os.eventfd_read(fd)
                    except BlockingIOError:
                        continue
                    self.wakeups += 1
                    self._handlers[fd]()
        except BaseException as e:  # recorded, and reported by whoever stops or checks the loop
            self.error = e

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def stop(self) -> None:
        if self._thread is not None:
            os.eventfd_write(self._stop, 1)
            self._thread.join()
            self._thread = None

    def close(self) -> None:
        self.stop()
        self._epoll.close()
        os.close(self._stop)
