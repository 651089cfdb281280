"""Split virtqueues (VIRTIO 1.2, section 2.7): the driver side and the device side.

The driver side keeps its own copy of everything it put in the ring (free list, per-head chain
length, avail index) and never reads the descriptor table back: the device could have changed it.
The device side reads the driver's ring and checks every value before using it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, NoReturn

from vdpa_svq.errors import DeviceRingError, GuestRingError, RingBroken
from vdpa_svq.memory.guest import GuestMemory
from vdpa_svq.ring.barrier import mb, rmb, wmb
from vdpa_svq.ring.chain import (
    VRING_DESC_F_INDIRECT,
    VRING_DESC_F_NEXT,
    Chain,
    ChainReader,
    IndirectArea,
    plan_chain,
)
from vdpa_svq.ring.event import need_event
from vdpa_svq.ring.layout import (
    AVAIL_FLAGS,
    AVAIL_IDX,
    AVAIL_RING,
    DESC,
    DESC_SIZE,
    USED_ELEM,
    USED_FLAGS,
    USED_IDX,
    USED_RING,
    Layout,
    RingAddresses,
    RingAreas,
    check_size,
    desc_area_size,
    device_area_size,
    driver_area_size,
)
from vdpa_svq.ring.state import DeviceSideExport, DriverSideExport, RingState, checked_import

VRING_AVAIL_F_NO_INTERRUPT = 1
VRING_USED_F_NO_NOTIFY = 1


class _SplitAreas:
    """Views of the three areas of one split ring, checked once to lie in guest memory."""

    def __init__(self, mem: GuestMemory, num: int, addrs: RingAddresses) -> None:
        check_size(Layout.SPLIT, num)
        self.num = num
        self.desc = mem.view(addrs.desc, desc_area_size(num))
        self.avail = mem.view(addrs.driver, driver_area_size(Layout.SPLIT, num))
        self.used = mem.view(addrs.device, device_area_size(Layout.SPLIT, num))
        # Every le16 the other side reads or writes concurrently goes through these: one native
        # 16-bit access each (struct moves bytes one by one, and a reader in another process, e.g.
        # DPDK, then sees a torn index). Indexes are in u16 units.
        self.avail16 = self.avail.cast("H")
        self.used16 = self.used.cast("H")
        self.used_event = (AVAIL_RING + 2 * num) // 2  # in avail16 (the driver area)
        self.avail_event = (USED_RING + 8 * num) // 2  # in used16 (the device area)

    def areas(self) -> RingAreas:
        return RingAreas(self.desc, self.avail, self.used)

    def release(self) -> None:
        for v in (self.avail16, self.used16, self.desc, self.avail, self.used):
            v.release()


@dataclass(frozen=True, kw_only=True)
class SplitDriverExport(DriverSideExport):
    """Everything the driver side of a split ring is, for a datapath that takes it over (the C relay)."""

    layout: ClassVar[Layout] = Layout.SPLIT
    avail_idx_shadow: int
    last_used_idx: int
    next: tuple[int, ...]  # the free list: the next free descriptor after each


class SplitDriverRing:
    """The driver side of a split ring: add chains, decide kicks, reap used buffers."""

    layout = Layout.SPLIT

    def __init__(
        self,
        mem: GuestMemory,
        num: int,
        addrs: RingAddresses,
        *,
        event_idx: bool = False,
        indirect_area: IndirectArea | None = None,
        name: str = "vq",
    ) -> None:
        self.mem = mem
        self.num = num
        self.addrs = addrs
        self.event_idx = event_idx
        self.indirect_area = indirect_area
        self.name = name
        self._a = _SplitAreas(mem, num, addrs)
        self.broken = False
        # Private state (Linux: free_head, num_free, avail_idx_shadow, last_used_idx, desc_state).
        self._next = [i + 1 for i in range(num)]  # free list and chain links, our copy only
        self.free_head = 0
        self.num_free = num
        self.avail_idx_shadow = 0
        self.last_used_idx = 0
        self.num_added = 0
        self._token: list[Any] = [None] * num
        self._count = [0] * num  # descriptors in the chain starting at this head (ring slots)
        self._writable = [0] * num  # device-writable bytes of that chain
        self._cb_enabled = True
        # Zero the ring: a reused memory area must not show stale indexes.
        self._a.desc[:] = bytes(len(self._a.desc))
        self._a.avail[:] = bytes(len(self._a.avail))
        self._a.used[:] = bytes(len(self._a.used))

    def export_state(self) -> SplitDriverExport:
        """This ring's configuration and driver-side state, for a datapath that takes it over."""
        return SplitDriverExport(
            num=self.num, addrs=self.addrs, event_idx=self.event_idx, name=self.name,
            indirect_area=self.indirect_area, free_head=self.free_head, num_free=self.num_free,
            num_added=self.num_added, cb_enabled=self._cb_enabled, avail_idx_shadow=self.avail_idx_shadow,
            last_used_idx=self.last_used_idx, next=tuple(self._next),
        )

    # -- adding ---------------------------------------------------------------------------
    def add(
        self,
        out: Sequence[tuple[int, int]],
        in_: Sequence[tuple[int, int]] = (),
        token: Any = True,
        *,
        indirect: bool = False,
    ) -> int:
        """Make a chain of readable `out` then device-writable `in_` buffers available.

        Returns the head index (the id the device will use it back with). Raises RingFull when
        there are not enough free descriptors: nothing is written then.
        """
        if self.broken:
            raise RingBroken(f"{self.name}: queue is broken")
        segs, use_indirect, slots, writable = plan_chain(
            out, in_, token, indirect=indirect, indirect_area=self.indirect_area, num=self.num,
            num_free=self.num_free, name=self.name,
        )
        total = len(segs)
        head = self.free_head
        desc = self._a.desc
        if use_indirect:
            table = self.indirect_area.table(head)  # type: ignore[union-attr]
            tview = self.mem.view(table, total * DESC_SIZE)
            for i, (addr, length, flags) in enumerate(segs):
                nxt = VRING_DESC_F_NEXT if i + 1 < total else 0
                DESC.pack_into(tview, i * DESC_SIZE, addr, length, flags | nxt, i + 1 if nxt else 0)
            DESC.pack_into(desc, head * DESC_SIZE, table, total * DESC_SIZE, VRING_DESC_F_INDIRECT, 0)
            last = head
        else:
            i = head
            for n, (addr, length, flags) in enumerate(segs):
                nxt = VRING_DESC_F_NEXT if n + 1 < total else 0
                DESC.pack_into(desc, i * DESC_SIZE, addr, length, flags | nxt, self._next[i] if nxt else 0)
                last = i
                i = self._next[i]
        self.free_head = self._next[last]
        self.num_free -= slots
        self._token[head] = token
        self._count[head] = slots
        self._writable[head] = writable
        # Put the head in the avail ring, then publish the index: the device reads avail->idx and
        # then the ring entry and the descriptors, so they must be visible first (2.7.13).
        self._a.avail16[AVAIL_RING // 2 + self.avail_idx_shadow % self.num] = head
        wmb()
        self.avail_idx_shadow = (self.avail_idx_shadow + 1) & 0xFFFF
        self._a.avail16[AVAIL_IDX // 2] = self.avail_idx_shadow
        self.num_added += 1
        return head

    def kick_needed(self) -> bool:
        """Whether the device must be notified of the chains added since the last call (2.7.10)."""
        # The new avail idx must be visible before we read the device's suppression state,
        # else the device may go to sleep having missed it while we skip the kick.
        mb()
        new = self.avail_idx_shadow
        old = (new - self.num_added) & 0xFFFF
        added, self.num_added = self.num_added, 0
        if added == 0:
            return False
        if self.event_idx:
            avail_event = self._a.used16[self._a.avail_event]
            return need_event(avail_event, new, old)
        flags = self._a.used16[USED_FLAGS // 2]
        return not flags & VRING_USED_F_NO_NOTIFY

    # -- reaping --------------------------------------------------------------------------
    def _used_idx(self) -> int:
        return self._a.used16[USED_IDX // 2]

    def has_used(self) -> bool:
        return not self.broken and self._used_idx() != self.last_used_idx

    def used_idx_in_memory(self) -> int:
        """used->idx as the device last wrote it (for taking over a running ring)."""
        return self._used_idx()

    def get_used(self) -> tuple[Any, int] | None:
        """The next used buffer as (token, written length), or None. Checks what the device wrote."""
        if self.broken:
            raise RingBroken(f"{self.name}: queue is broken")
        used_idx = self._used_idx()
        if used_idx == self.last_used_idx:
            return None
        if (used_idx - self.last_used_idx) & 0xFFFF > self.num:
            self._fail(f"used idx jumped from {self.last_used_idx} to {used_idx}", used_idx)
        # Only read the used element after used->idx said it is there.
        rmb()
        slot = self.last_used_idx % self.num
        head, length = USED_ELEM.unpack_from(self._a.used, USED_RING + 8 * slot)
        if head >= self.num:
            self._fail(f"id {head} out of range", slot)
        token = self._token[head]
        if token is None:
            self._fail(f"id {head} is not a head in use", slot)
        # A chain with nothing writable has nothing written, whatever the length says: some devices
        # report the bytes they read (DPDK's packed vhost, for TX chains); Linux ignores it, so do we (as 0).
        if self._writable[head] == 0:
            length = 0
        elif length > self._writable[head]:
            self._fail(f"used length {length} > writable {self._writable[head]} of id {head}", slot)
        self._free_chain(head)
        self.last_used_idx = (self.last_used_idx + 1) & 0xFFFF
        if self.event_idx and self._cb_enabled:
            # Ask for an interrupt at the next used entry; ordered before the next used->idx read.
            self._a.avail16[self._a.used_event] = self.last_used_idx
            mb()
        return token, length

    def _free_chain(self, head: int) -> None:
        last = head
        for _ in range(self._count[head] - 1):
            last = self._next[last]
        self._next[last] = self.free_head
        self.free_head = head
        self.num_free += self._count[head]
        self._token[head] = None

    def _fail(self, reason: str, index: int) -> NoReturn:
        self.broken = True
        raise DeviceRingError(self.name, reason, index)

    # -- used buffer notifications (device -> driver) -------------------------------------
    def disable_cb(self) -> None:
        """Ask the device not to interrupt (a hint; with EVENT_IDX we just stop moving used_event)."""
        self._cb_enabled = False
        if not self.event_idx:
            self._a.avail16[AVAIL_FLAGS // 2] = VRING_AVAIL_F_NO_INTERRUPT

    def enable_cb(self) -> bool:
        """Re-enable interrupts; False if used buffers are already pending (poll them first)."""
        return self._enable_cb_after(0)

    def enable_cb_delayed(self) -> bool:
        """Re-enable interrupts, but only after about 3/4 of the in-flight buffers are used."""
        in_flight = (self.avail_idx_shadow - self.last_used_idx) & 0xFFFF
        return self._enable_cb_after(in_flight * 3 // 4 if self.event_idx else 0)

    def _enable_cb_after(self, bufs: int) -> bool:
        """Ask for an interrupt once more than `bufs` further buffers are used; False if already."""
        self._cb_enabled = True
        if self.event_idx:
            self._a.avail16[self._a.used_event] = (self.last_used_idx + bufs) & 0xFFFF
        else:
            self._a.avail16[AVAIL_FLAGS // 2] = 0
        # The flag / used_event store must be visible before we look at used->idx once more.
        mb()
        return (self._used_idx() - self.last_used_idx) & 0xFFFF <= bufs

    @property
    def in_flight(self) -> int:
        return sum(1 for t in self._token if t is not None)

    def chains_in_flight(self) -> list[tuple[int, Any, int, int]]:
        """(id, token, ring slots, device-writable bytes) of every chain made available and not used
        yet: for a datapath that takes the ring over with buffers posted (guest/burst.py)."""
        return [(i, t, self._count[i], self._writable[i]) for i, t in enumerate(self._token) if t is not None]

    def close(self) -> None:
        self._a.release()


@dataclass(frozen=True, kw_only=True)
class SplitDeviceExport(DeviceSideExport):
    """Everything the device side of a split ring is, for a datapath that takes it over (the C relay,
    the soft device's C loopback). Its areas: descriptor table, avail ring, used ring."""

    layout: ClassVar[Layout] = Layout.SPLIT
    last_avail_idx: int
    used_idx: int
    signalled_used: int  # used_idx at the last interrupt decision


class SplitDeviceRing:
    """The device side of a split ring: take available chains, return them used, decide interrupts."""

    layout = Layout.SPLIT

    def __init__(
        self,
        mem: GuestMemory,
        num: int,
        addrs: RingAddresses,
        *,
        event_idx: bool = False,
        name: str = "vq",
        last_avail_idx: int = 0,
        used_idx: int = 0,
    ) -> None:
        self.mem = mem
        self.num = num
        self.addrs = addrs
        self.event_idx = event_idx
        self.name = name
        self._a = _SplitAreas(mem, num, addrs)
        self.broken = False
        self.last_avail_idx = last_avail_idx & 0xFFFF
        self.used_idx = used_idx & 0xFFFF
        self.signalled_used = self.used_idx
        self._staged = 0  # used elements written after used->idx, not yet published
        self._in_flight = bytearray(num)  # heads popped and not yet used

    def export_state(self) -> SplitDeviceExport:
        """This ring's configuration, areas and device-side state, for a datapath that takes it over."""
        return SplitDeviceExport(
            num=self.num, addrs=self.addrs, event_idx=self.event_idx, name=self.name, areas=self._a.areas(),
            last_avail_idx=self.last_avail_idx, used_idx=self.used_idx, signalled_used=self.signalled_used,
            in_flight=bytes(self._in_flight),
        )

    def import_state(self, state: Mapping[str, int]) -> None:
        """The mirror of export_state(): take back the device-side indexes from a datapath that took
        this ring over (the soft device's C loopback: NetLoop.detach()), under the record's names:
        exactly last_avail_idx, used_idx and signalled_used, 16-bit indexes each. Anything else is
        refused with ValueError, and then nothing is taken. The configuration and areas never
        moved, nor did what is in flight: such a datapath uses or puts back every chain it pops
        before it hands the ring back."""
        st = checked_import(self.name, state, dict.fromkeys(("last_avail_idx", "used_idx", "signalled_used"), 1 << 16))
        self.last_avail_idx, self.used_idx, self.signalled_used = (
            st["last_avail_idx"], st["used_idx"], st["signalled_used"])

    # -- taking chains ---------------------------------------------------------------------
    def _avail_idx(self) -> int:
        return self._a.avail16[AVAIL_IDX // 2]

    def has_avail(self) -> bool:
        return not self.broken and self._avail_idx() != self.last_avail_idx

    def pop(self) -> Chain | None:
        """The next available chain, checked against the spec and guest memory, or None."""
        if self.broken:
            raise RingBroken(f"{self.name}: queue is broken")
        avail_idx = self._avail_idx()
        if avail_idx == self.last_avail_idx:
            return None
        if (avail_idx - self.last_avail_idx) & 0xFFFF > self.num:
            self._fail(f"avail idx moved from {self.last_avail_idx} to {avail_idx}", avail_idx)
        # Read the ring entry and descriptors only after avail->idx said they are there.
        rmb()
        slot = self.last_avail_idx % self.num
        head = self._a.avail16[AVAIL_RING // 2 + slot]
        if head >= self.num:
            self._fail(f"head {head} out of range", slot)
        if self._in_flight[head]:
            self._fail(f"head {head} made available while still in flight", slot)
        chain = self._read_chain(head)
        self._in_flight[head] = 1
        self.last_avail_idx = (self.last_avail_idx + 1) & 0xFFFF
        return chain

    def _read_chain(self, head: int) -> Chain:
        reader = ChainReader(self.mem, lambda reason: self._fail(reason, head))
        table, count, index = self._a.desc, self.num, head
        indirect = False
        here = ring_descs = 0  # descriptors read in the current table; in the ring's own table
        while True:  # ends: every pass reads a descriptor, and at most `count` per table fit
            addr, length, flags, nxt = DESC.unpack_from(table, index * DESC_SIZE)
            if flags & VRING_DESC_F_INDIRECT:
                if indirect:
                    self._fail("indirect descriptor inside an indirect table", head)
                # 2.7.5.3.2: zero or more normal descriptors, then one indirect one, ending the chain.
                if flags & VRING_DESC_F_NEXT:
                    self._fail("indirect descriptor chained with others", head)
                table = reader.indirect_table(addr, length, self.num)
                ring_descs = here + 1
                indirect, count, index, here = True, length // DESC_SIZE, 0, 0
                continue
            reader.take_segment(addr, length, flags)
            here += 1
            if not flags & VRING_DESC_F_NEXT:
                return reader.chain(head, ring_descs if indirect else len(reader.segments), indirect)
            if nxt >= count:
                self._fail(f"next {nxt} out of range", head)
            if here >= count:
                self._fail("descriptor loop", head)
            index = nxt

    # -- returning chains -----------------------------------------------------------------
    def push_used(self, chain: Chain, written: int) -> tuple[tuple[int, int], ...]:
        """Return `chain` used with `written` bytes written to its writable buffers.

        Returns the (address, length) spans of ring memory this wrote, for the dirty log.
        """
        return self.stage_used(chain, written) + self.publish_used()

    def stage_used(self, chain: Chain, written: int) -> tuple[tuple[int, int], ...]:
        """Write `chain`'s used element, not yet visible to the driver: publish_used() shows every
        staged one at once (a merged receive buffer's parts must be seen together, 5.1.6.4.1).
        Returns the spans written, for the dirty log."""
        slot = (self.used_idx + self._staged) % self.num
        USED_ELEM.pack_into(self._a.used, USED_RING + 8 * slot, chain.id, written)
        self._in_flight[chain.id] = 0
        self._staged += 1
        return ((self.addrs.device + USED_RING + 8 * slot, 8),)

    def publish_used(self) -> tuple[tuple[int, int], ...]:
        """Make every staged used element visible with one used->idx store; the spans written."""
        if not self._staged:
            return ()
        # The elements must be visible before used->idx covers them (2.7.14).
        wmb()
        self.used_idx = (self.used_idx + self._staged) & 0xFFFF
        self._staged = 0
        self._a.used16[USED_IDX // 2] = self.used_idx
        return ((self.addrs.device + USED_IDX, 2),)

    def unpop(self, chain: Chain) -> None:
        """Put back the chain pop() returned last, as if never popped (the device could not use it
        now: a receive buffer too few for a frame). Chains go back in the reverse of their pops."""
        self._in_flight[chain.id] = 0
        self.last_avail_idx = (self.last_avail_idx - 1) & 0xFFFF

    def notify_area(self) -> tuple[int, int]:
        """The ring memory enable_notify()/disable_notify() write (flags and avail_event)."""
        return (self.addrs.device, device_area_size(Layout.SPLIT, self.num))

    def need_notify(self) -> bool:
        """Whether the driver must be interrupted for the buffers used since the last call."""
        # used->idx must be visible before we read the driver's suppression state.
        mb()
        old, new = self.signalled_used, self.used_idx
        self.signalled_used = new
        if old == new:
            return False
        if not self.event_idx:
            flags = self._a.avail16[AVAIL_FLAGS // 2]
            return not flags & VRING_AVAIL_F_NO_INTERRUPT
        used_event = self._a.avail16[self._a.used_event]
        return need_event(used_event, new, old)

    # -- available buffer notifications (driver -> device) --------------------------------
    def disable_notify(self) -> None:
        """Ask the driver not to kick (a hint; with EVENT_IDX avail_event just stays behind)."""
        if not self.event_idx:
            self._a.used16[USED_FLAGS // 2] = VRING_USED_F_NO_NOTIFY

    def enable_notify(self) -> bool:
        """Ask for a kick at the next available chain; False if chains are already there."""
        if self.event_idx:
            self._a.used16[self._a.avail_event] = self.last_avail_idx
        else:
            self._a.used16[USED_FLAGS // 2] = 0
        # avail_event / flags must be visible before we read avail->idx again.
        mb()
        return not self.has_avail()

    def state(self) -> RingState:
        return RingState(self.last_avail_idx, self.used_idx)

    def _fail(self, reason: str, index: int) -> NoReturn:
        self.broken = True
        raise GuestRingError(self.name, reason, index)

    def close(self) -> None:
        self._a.release()
