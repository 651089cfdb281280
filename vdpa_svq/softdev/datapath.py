"""The datapath thread of a soft device: wait on kick eventfds, service the queues, send calls.

One thread per device, started at DRIVER_OK and stopped at reset or close. It takes the device
lock for each service pass, so a control operation (suspend, reset, vring changes) that holds
the lock knows the rings are not being touched.
"""

from __future__ import annotations

import os
import select
import threading
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from vdpa_svq.softdev.base import SoftDevice
    from vdpa_svq.softdev.queue import SoftQueue


class Datapath:
    def __init__(self, device: SoftDevice) -> None:
        self._dev = device
        self._ep = select.epoll()
        self._wake_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self._ep.register(self._wake_fd, select.EPOLLIN)
        self._kick_owner: dict[int, SoftQueue] = {}
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name=f"{device.path} datapath", daemon=True)

    # -- control side (called with the device lock held, except stop) ---------------------------
    def start(self) -> None:
        for q in self._dev.queues:
            self.watch(q)
        self._thread.start()

    def watch(self, q: SoftQueue) -> None:
        if q.kick_fd >= 0:
            self._kick_owner[q.kick_fd] = q
            self._ep.register(q.kick_fd, select.EPOLLIN)

    def unwatch(self, q: SoftQueue) -> None:
        # Before the fd is closed: epoll would otherwise keep the file and report a recycled number.
        if self._kick_owner.pop(q.kick_fd, None) is not None:
            self._ep.unregister(q.kick_fd)

    def poke(self) -> None:
        """Run a service pass soon (after a queue was enabled or the device resumed)."""
        os.eventfd_write(self._wake_fd, 1)

    def stop(self) -> None:
        """Stop and join the thread. Must be called WITHOUT the device lock (the thread takes it)."""
        self._stopping = True
        self.poke()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join()
        self._ep.close()
        os.close(self._wake_fd)

    # -- the thread ------------------------------------------------------------------------------
    def _run(self) -> None:
        dev = self._dev
        try:
            # The raw lock: taking the ordinary one would hand a C datapath's rings back each time.
            with dev.lock.raw:
                if not self._stopping:
                    # Chains may have been made available before DRIVER_OK, with nobody to kick.
                    self.service()
            while True:
                events = self._ep.poll()
                with dev.lock.raw:
                    if self._stopping:
                        return
                    for fd, _ in events:
                        self._consume(fd)
                    if dev.running:
                        self.service()
        except BaseException as e:  # never die silently: the device records it and asks for a reset
            dev.datapath_died(e)

    def _consume(self, fd: int) -> None:
        try:
            os.eventfd_read(fd)
        except BlockingIOError:  # someone else read it, or two dups of one eventfd fired together
            return
        q = self._kick_owner.get(fd)
        if q is not None:
            q.stats.kicks += 1

    def service(self) -> None:
        """Process until idle, with the no-lost-kick dance (QEMU: `while (!enable_notification)`)."""
        dev = self._dev
        if dev.service_fast():
            return
        while True:
            for q in dev.queues:
                if q.usable:
                    dev.guard(q, q.ring.disable_notify)  # type: ignore[union-attr]
            dev.process()
            self.call_drivers()
            for q in dev.queues:
                if q.usable:
                    dev.guard(q, q.ring.enable_notify)  # type: ignore[union-attr]
            # A chain the driver added before it saw notifications re-enabled came without a kick:
            # look once more now that they are (enable_notify ordered its store before this read).
            if not dev.process():
                self.call_drivers()
                return

    def call_drivers(self) -> None:
        """Call the driver for every queue whose used buffers passed its event (broken ones too:
        buffers used before the fault still deserve their interrupt)."""
        for q in self._dev.queues:
            ring = q.ring
            if ring is None:
                continue
            if self._dev.guard(q, ring.need_notify) and q.call_fd >= 0:
                os.eventfd_write(q.call_fd, 1)
                q.stats.calls += 1
