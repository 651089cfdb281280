"""The shadow virtqueue: the Python reference of the relay (the C extension mirrors it).

One ShadowVirtqueue per queue. It is the DEVICE of the guest-visible ring (split or packed, as the
guest negotiated) and the DRIVER of the shadow ring (split or packed, as the device negotiated),
which is the only ring the device ever sees. Chains move guest -> shadow with their addresses
translated to IOVAs; used buffers move back in the order the device used them, and every guest
page the device wrote (and every guest ring byte the relay wrote) is marked in the dirty log.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass

from vdpa_svq.dirty import DirtyBitmap
from vdpa_svq.errors import GuestMemoryError, GuestRingError, RingError, RingFull
from vdpa_svq.memory.iova import IovaMap
from vdpa_svq.ring import Chain, DeviceRing, DriverRing


@dataclass
class RelayStats:
    forwarded: int = 0  # chains moved guest -> shadow
    returned: int = 0  # chains moved shadow -> guest
    bytes_written: int = 0  # device-written bytes returned to the guest
    device_kicks: int = 0
    guest_calls: int = 0
    ring_full: int = 0  # times a chain waited for room in the shadow ring


class ShadowVirtqueue:
    impl = "py"  # which relay this is (the C one says "c")

    def __init__(
        self,
        guest: DeviceRing,
        shadow: DriverRing,
        iova: IovaMap,
        dirty: DirtyBitmap | None,
        *,
        device_kick: Callable[[], None],
        guest_call: Callable[[], None],
        indirect: bool = False,
        name: str = "svq",
    ) -> None:
        self.guest = guest
        self.shadow = shadow
        self.iova = iova
        self.dirty = dirty
        self.device_kick = device_kick
        self.guest_call = guest_call
        self.indirect = indirect
        self.name = name
        self.stats = RelayStats()
        self.error: RingError | None = None  # why this queue stopped, if it did
        self._held: tuple[Chain, list[tuple[int, int]], list[tuple[int, int]]] | None = None

    @property
    def broken(self) -> bool:
        return self.error is not None

    def close(self) -> None:
        """Nothing to release (the C relay's twin releases its memory views)."""

    @property
    def held(self) -> bool:
        """A guest chain is waiting for room in the shadow ring."""
        return self._held is not None

    # -- guest -> device ---------------------------------------------------------------------
    def _translate(self, chain: Chain) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
        out: list[tuple[int, int]] = []
        in_: list[tuple[int, int]] = []
        try:
            for addr, length, write in chain.segments:
                if length:
                    pieces = self.iova.translate(addr, length)
                else:  # keep an empty buffer as one, at its translated address
                    pieces = [(self.iova.translate(addr, 1)[0][0], 0)]
                (in_ if write else out).extend(pieces)
        except GuestMemoryError as e:
            raise GuestRingError(self.name, f"chain {chain.id}: {e}", chain.id) from None
        slots = 1 if self._use_indirect(len(out) + len(in_)) else len(out) + len(in_)
        if slots > self.shadow.num:
            raise GuestRingError(self.name, f"chain of {slots} descriptors can never fit the shadow ring", chain.id)
        return out, in_

    def _use_indirect(self, n: int) -> bool:
        # An indirect table counts as a chain of n descriptors: no longer than the queue (2.7.5.3.1).
        area = self.shadow.indirect_area
        return self.indirect and area is not None and 1 < n <= min(area.max_entries, self.shadow.num)

    def forward_avail(self) -> int:
        """Move every available guest chain to the shadow ring (until it is full); kick if needed."""
        moved = 0
        while True:
            if self._held is not None:
                chain, out, in_ = self._held
            else:
                chain = self.guest.pop()
                if chain is None:
                    break
                out, in_ = self._translate(chain)
            try:
                self.shadow.add(out, in_, chain, indirect=self._use_indirect(len(out) + len(in_)))
            except RingFull:
                # Backpressure: keep this chain and take no more from the guest until the device
                # frees room (forward_used() retries it).
                if self._held is None:
                    self.stats.ring_full += 1
                self._held = (chain, out, in_)
                break
            self._held = None
            moved += 1
        self.stats.forwarded += moved
        if moved and self.shadow.kick_needed():
            self.stats.device_kicks += 1
            self.device_kick()
        return moved

    # -- device -> guest ---------------------------------------------------------------------
    def forward_used(self) -> int:
        """Return every used shadow buffer to the guest, log what was written; interrupt if needed."""
        moved = 0
        try:
            while (r := self.shadow.get_used()) is not None:
                chain, written = r
                self._log_written(chain, written)
                for addr, length in self.guest.stage_used(chain, written):
                    self._mark(addr, length)
                self.stats.bytes_written += written
                moved += 1
        finally:
            # What the device made used together reaches the guest together: a merged receive
            # buffer's parts (VIRTIO_NET_F_MRG_RXBUF) must all be visible when the driver sees the
            # first (5.1.6.4.1); the device published them at once, one publish per pass keeps that.
            # Also on the way out of a fault: what was returned before it stays returned.
            for addr, length in self.guest.publish_used():
                self._mark(addr, length)
        self.stats.returned += moved
        if moved and self.guest.need_notify():
            self.stats.guest_calls += 1
            try:
                self.guest_call()
            except OSError as e:  # the peer's fd went bad: this queue stops, not the loop
                raise GuestRingError(self.name, f"the guest's call eventfd failed: {os.strerror(e.errno)}") from None
        return moved

    def _log_written(self, chain: Chain, written: int) -> None:
        left = written
        for addr, length, write in chain.segments:
            if left <= 0:
                break
            if write:
                n = min(length, left)
                self._mark(addr, n)
                left -= n

    def _mark(self, gpa: int, length: int) -> None:
        if self.dirty is not None:
            self.dirty.mark(gpa, length)

    # -- event handlers (what the event loop calls) -----------------------------------------
    def on_guest_kick(self) -> None:
        """The guest made chains available: relay them, then ask for the next kick, race-free."""
        self._guarded(self._drain_guest)

    def on_device_call(self) -> None:
        """The device used buffers: return them, retry held chains, re-enable device interrupts."""
        self._guarded(self._drain_device)

    def _drain_guest(self) -> None:
        while True:
            self._disable_guest_notify()
            self.forward_avail()
            if self._held is not None:
                return  # ring full: the next device call resumes us
            if self._enable_guest_notify():
                return

    def _drain_device(self) -> None:
        while True:
            self.shadow.disable_cb()
            self.forward_used()
            if self._held is not None:
                self.forward_avail()
                if self._held is None:
                    self._drain_guest()
            if self.shadow.enable_cb():
                return

    # -- polling (what the pump calls in a polling phase: pump.py) ---------------------------
    def has_work(self) -> bool:
        """A used shadow buffer to return, or (no chain held) a guest chain to relay."""
        return self.error is None and (self.shadow.has_used() or (self._held is None and self.guest.has_avail()))

    def poll_once(self) -> None:
        """One polling round, notifications off: used buffers back first (that frees room for a
        held chain), then what the guest made available."""
        self._guarded(self._poll_once)

    def _poll_once(self) -> None:
        self._disable_guest_notify()
        self.shadow.disable_cb()
        self.forward_used()
        self.forward_avail()

    def rearm(self) -> None:
        """Back to notifications: the drains turn them on and relay whatever raced in meanwhile."""
        self._guarded(self._rearm)

    def _rearm(self) -> None:
        self._drain_device()
        if self._held is None:
            self._drain_guest()

    def _disable_guest_notify(self) -> None:
        self.guest.disable_notify()
        self._mark(*self.guest.notify_area())

    def _enable_guest_notify(self) -> bool:
        ok = self.guest.enable_notify()
        self._mark(*self.guest.notify_area())
        return ok

    def _guarded(self, work: Callable[[], None]) -> None:
        if self.error is not None:
            return
        try:
            work()
        except RingError as e:
            # Never trust either side: this queue stops with a reason; other queues go on. Keep
            # no traceback: its frames would hold views of guest memory alive.
            self.error = e.with_traceback(None)
