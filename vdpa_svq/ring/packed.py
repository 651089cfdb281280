"""Packed virtqueues (VIRTIO 1.2, section 2.8): the driver side and the device side.

One descriptor ring carries both directions. A descriptor is available when its AVAIL flag equals
the driver's wrap counter and its USED flag does not; it is used when both flags equal the
device's wrap counter. Buffer ids are the driver's own and are decoupled from ring slots, so the
driver keeps a free list of ids and, per id, how many slots its chain took (the device skips that
many slots when it writes the used descriptor, whatever order it completes in).
"""

from __future__ import annotations

import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, NoReturn

from vdpa_svq.errors import DeviceRingError, GuestRingError, RingBroken
from vdpa_svq.memory.guest import GuestMemory
from vdpa_svq.ring.barrier import mb, rmb, wmb
from vdpa_svq.ring.chain import (
    VRING_DESC_F_INDIRECT,
    VRING_DESC_F_NEXT,
    VRING_DESC_F_WRITE,
    VRING_PACKED_DESC_F_AVAIL,
    VRING_PACKED_DESC_F_USED,
    Chain,
    ChainReader,
    IndirectArea,
    plan_chain,
)
from vdpa_svq.ring.event import (
    VRING_PACKED_EVENT_FLAG_DESC,
    VRING_PACKED_EVENT_FLAG_DISABLE,
    VRING_PACKED_EVENT_FLAG_ENABLE,
    WRAP_BIT,
    packed_notify_needed,
)
from vdpa_svq.ring.layout import (
    DESC,
    DESC_SIZE,
    EVENT_FLAGS,
    EVENT_OFF_WRAP,
    PACKED_EVENT_SIZE,
    Layout,
    RingAddresses,
    RingAreas,
    check_size,
    desc_area_size,
)
from vdpa_svq.ring.state import DeviceSideExport, DriverSideExport, RingState, checked_import

_ADDR_LEN_ID = struct.Struct("<QIH")  # a descriptor without its flags (written before them)
_LEN_ID = struct.Struct("<IH")  # the part of a used descriptor the device writes before flags
_DESC_ID_OFF, _DESC_FLAGS_OFF, _DESC_LEN_OFF = 12, 14, 8
_AVAIL_USED = VRING_PACKED_DESC_F_AVAIL | VRING_PACKED_DESC_F_USED


def _avail_flags(wrap: int) -> int:
    """AVAIL/USED bits that make a descriptor available under driver wrap counter `wrap`."""
    return VRING_PACKED_DESC_F_AVAIL if wrap else VRING_PACKED_DESC_F_USED


def _used_flags(wrap: int) -> int:
    """AVAIL/USED bits that mark a descriptor used under device wrap counter `wrap`."""
    return _AVAIL_USED if wrap else 0


class _PackedAreas:
    def __init__(self, mem: GuestMemory, num: int, addrs: RingAddresses) -> None:
        check_size(Layout.PACKED, num)
        self.num = num
        self.desc = mem.view(addrs.desc, desc_area_size(num))
        self.driver_event = mem.view(addrs.driver, PACKED_EVENT_SIZE)
        self.device_event = mem.view(addrs.device, PACKED_EVENT_SIZE)
        # Descriptor flags and the event structures are read and written concurrently by the other
        # side: one native 16-bit access each (struct moves bytes one by one: torn values).
        self.desc16 = self.desc.cast("H")
        self.driver_event16 = self.driver_event.cast("H")
        self.device_event16 = self.device_event.cast("H")

    def flags(self, slot: int) -> int:
        return self.desc16[(slot * DESC_SIZE + _DESC_FLAGS_OFF) // 2]

    def set_flags(self, slot: int, flags: int) -> None:
        self.desc16[(slot * DESC_SIZE + _DESC_FLAGS_OFF) // 2] = flags

    def areas(self) -> RingAreas:
        return RingAreas(self.desc, self.driver_event, self.device_event)

    def release(self) -> None:
        for v in (self.desc16, self.driver_event16, self.device_event16, self.desc, self.driver_event,
                  self.device_event):
            v.release()


def _write_event(event16: memoryview, off_wrap: int | None, flags: int) -> None:
    if off_wrap is not None:
        event16[EVENT_OFF_WRAP // 2] = off_wrap
        # The other side reads flags, then off_wrap: off_wrap must be there first.
        wmb()
    event16[EVENT_FLAGS // 2] = flags


@dataclass(frozen=True, kw_only=True)
class PackedDriverExport(DriverSideExport):
    """Everything the driver side of a packed ring is, for a datapath that takes it over (the C relay)."""

    layout: ClassVar[Layout] = Layout.PACKED
    next_avail_idx: int
    avail_wrap_counter: int
    last_used_idx: int
    used_wrap_counter: int
    next_id: tuple[int, ...]  # the free list: the next free buffer id after each


class PackedDriverRing:
    """The driver side of a packed ring: add chains, decide kicks, reap used buffers."""

    layout = Layout.PACKED

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
        self._a = _PackedAreas(mem, num, addrs)
        self.broken = False
        # Spec words: next_avail_idx/avail_wrap_counter (where we add), last_used_idx/
        # used_wrap_counter (where we look for the next used descriptor). Both counters start at 1.
        self.next_avail_idx = 0
        self.avail_wrap_counter = 1
        self.last_used_idx = 0
        self.used_wrap_counter = 1
        self.num_free = num  # free ring slots
        self.num_added = 0  # slots made available since the last kick decision
        self.free_head = 0  # first free buffer id
        self._next_id = [i + 1 for i in range(num)]
        self._token: list[Any] = [None] * num  # per buffer id
        self._count = [0] * num  # ring slots the chain of this id took
        self._writable = [0] * num
        self._cb_enabled = True
        self._a.desc[:] = bytes(len(self._a.desc))
        self._a.driver_event[:] = bytes(PACKED_EVENT_SIZE)
        self._a.device_event[:] = bytes(PACKED_EVENT_SIZE)

    def export_state(self) -> PackedDriverExport:
        """This ring's configuration and driver-side state, for a datapath that takes it over."""
        return PackedDriverExport(
            num=self.num, addrs=self.addrs, event_idx=self.event_idx, name=self.name,
            indirect_area=self.indirect_area, free_head=self.free_head, num_free=self.num_free,
            num_added=self.num_added, cb_enabled=self._cb_enabled, next_avail_idx=self.next_avail_idx,
            avail_wrap_counter=self.avail_wrap_counter, last_used_idx=self.last_used_idx,
            used_wrap_counter=self.used_wrap_counter, next_id=tuple(self._next_id),
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

        Returns the buffer id. Raises RingFull when there are not enough free slots.
        """
        if self.broken:
            raise RingBroken(f"{self.name}: queue is broken")
        segs, use_indirect, slots, writable = plan_chain(
            out, in_, token, indirect=indirect, indirect_area=self.indirect_area, num=self.num,
            num_free=self.num_free, name=self.name,
        )
        total = len(segs)
        buf_id = self.free_head
        if use_indirect:
            table = self.indirect_area.table(buf_id)  # type: ignore[union-attr]
            tview = self.mem.view(table, total * DESC_SIZE)
            for i, (addr, length, flags) in enumerate(segs):
                DESC.pack_into(tview, i * DESC_SIZE, addr, length, 0, flags)
            ring_descs = [(table, total * DESC_SIZE, VRING_DESC_F_INDIRECT)]
        else:
            ring_descs = [(a, n, f | (VRING_DESC_F_NEXT if i + 1 < total else 0)) for i, (a, n, f) in enumerate(segs)]
        desc = self._a.desc
        head = self.next_avail_idx
        head_flags = ring_descs[0][2] | _avail_flags(self.avail_wrap_counter)
        for i, (addr, length, flags) in enumerate(ring_descs):
            slot = self.next_avail_idx
            if i == 0:
                # Everything but the head's flags now; the flags last, below.
                _ADDR_LEN_ID.pack_into(desc, slot * DESC_SIZE, addr, length, buf_id)
            else:
                flags |= _avail_flags(self.avail_wrap_counter)
                DESC.pack_into(desc, slot * DESC_SIZE, addr, length, buf_id, flags)
            self.next_avail_idx += 1
            if self.next_avail_idx == self.num:
                self.next_avail_idx = 0
                self.avail_wrap_counter ^= 1
        self.free_head = self._next_id[buf_id]
        self.num_free -= slots
        self.num_added += slots
        self._token[buf_id] = token
        self._count[buf_id] = slots
        self._writable[buf_id] = writable
        # "The driver MUST NOT make the first descriptor in the list available before all
        # subsequent descriptors comprising the list are made available" (2.8.21.1): the rest of
        # the chain must be visible before the head's flags flip it to available.
        wmb()
        self._a.set_flags(head, head_flags)
        return buf_id

    def kick_needed(self) -> bool:
        """Whether the device must be notified of the chains added since the last call (2.8.10)."""
        # The head flags must be visible before we read the device's event suppression.
        mb()
        moved, self.num_added = self.num_added, 0
        return packed_notify_needed(
            self._a.device_event16, self.next_avail_idx, moved, self.avail_wrap_counter, self.num, self.event_idx
        )

    # -- reaping --------------------------------------------------------------------------
    def _is_used(self, slot: int, wrap: int) -> bool:
        flags = self._a.flags(slot)
        avail = bool(flags & VRING_PACKED_DESC_F_AVAIL)
        return avail == bool(flags & VRING_PACKED_DESC_F_USED) and avail == bool(wrap)

    def has_used(self) -> bool:
        return not self.broken and self._is_used(self.last_used_idx, self.used_wrap_counter)

    def get_used(self) -> tuple[Any, int] | None:
        """The next used buffer as (token, written length), or None. Checks what the device wrote."""
        if self.broken:
            raise RingBroken(f"{self.name}: queue is broken")
        slot = self.last_used_idx
        if not self._is_used(slot, self.used_wrap_counter):
            return None
        # Only read id and len after the flags said the descriptor is used.
        rmb()
        length, buf_id = _LEN_ID.unpack_from(self._a.desc, slot * DESC_SIZE + _DESC_LEN_OFF)
        # 2.8.4 calls the length reserved without VIRTQ_DESC_F_WRITE, but QEMU never sets WRITE in used
        # descriptors and Linux reads the length regardless: so do we (checked against the chain below).
        if buf_id >= self.num:
            self._fail(f"id {buf_id} out of range", slot)
        token = self._token[buf_id]
        if token is None:
            self._fail(f"id {buf_id} is not in use", slot)
        # A chain with nothing writable has nothing written, whatever the length says: DPDK's packed
        # vhost reports the bytes it read for TX chains; Linux ignores it, so do we (as 0).
        if self._writable[buf_id] == 0:
            length = 0
        elif length > self._writable[buf_id]:
            self._fail(f"used length {length} > writable {self._writable[buf_id]} of id {buf_id}", slot)
        self.last_used_idx += self._count[buf_id]
        if self.last_used_idx >= self.num:
            self.last_used_idx -= self.num
            self.used_wrap_counter ^= 1
        self.num_free += self._count[buf_id]
        self._token[buf_id] = None
        self._next_id[buf_id] = self.free_head
        self.free_head = buf_id
        if self.event_idx and self._cb_enabled:
            # Ask for an interrupt at the next used descriptor; ordered before the next flags read.
            off_wrap = self.last_used_idx | self.used_wrap_counter << WRAP_BIT
            self._a.driver_event16[EVENT_OFF_WRAP // 2] = off_wrap
            mb()
        return token, length

    def _fail(self, reason: str, index: int) -> NoReturn:
        self.broken = True
        raise DeviceRingError(self.name, reason, index)

    # -- used buffer notifications (device -> driver) -------------------------------------
    def disable_cb(self) -> None:
        self._cb_enabled = False
        _write_event(self._a.driver_event16, None, VRING_PACKED_EVENT_FLAG_DISABLE)

    def enable_cb(self) -> bool:
        """Re-enable interrupts; False if used buffers are already pending (poll them first)."""
        return self._enable_cb_after(0)

    def enable_cb_delayed(self) -> bool:
        """Re-enable interrupts, but only after about 3/4 of the in-flight slots are used."""
        return self._enable_cb_after((self.num - self.num_free) * 3 // 4 if self.event_idx else 0)

    def _enable_cb_after(self, slots: int) -> bool:
        self._cb_enabled = True
        idx, wrap = self.last_used_idx + slots, self.used_wrap_counter
        if idx >= self.num:
            idx, wrap = idx - self.num, wrap ^ 1
        if self.event_idx:
            _write_event(self._a.driver_event16, idx | wrap << WRAP_BIT, VRING_PACKED_EVENT_FLAG_DESC)
        else:
            _write_event(self._a.driver_event16, None, VRING_PACKED_EVENT_FLAG_ENABLE)
        # The event store must be visible before we look at the ring once more.
        mb()
        return not self._is_used(idx, wrap)

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
class PackedDeviceExport(DeviceSideExport):
    """Everything the device side of a packed ring is, for a datapath that takes it over (the C relay,
    the soft device's C loopback). Its areas: descriptor ring, driver and device event suppression."""

    layout: ClassVar[Layout] = Layout.PACKED
    next_avail_idx: int
    avail_wrap_counter: int
    next_used_idx: int
    used_wrap_counter: int
    used_since_signal: int  # slots marked used since the last interrupt decision


class PackedDeviceRing:
    """The device side of a packed ring: take available chains, return them used, decide interrupts."""

    layout = Layout.PACKED

    def __init__(
        self,
        mem: GuestMemory,
        num: int,
        addrs: RingAddresses,
        *,
        event_idx: bool = False,
        name: str = "vq",
        next_avail_idx: int = 0,
        avail_wrap_counter: int = 1,
        next_used_idx: int = 0,
        used_wrap_counter: int = 1,
    ) -> None:
        self.mem = mem
        self.num = num
        self.addrs = addrs
        self.event_idx = event_idx
        self.name = name
        self._a = _PackedAreas(mem, num, addrs)
        self.broken = False
        if not (0 <= next_avail_idx < num and 0 <= next_used_idx < num):
            raise ValueError(f"packed ring state out of range for size {num}")
        self.next_avail_idx = next_avail_idx
        self.avail_wrap_counter = avail_wrap_counter & 1
        self.next_used_idx = next_used_idx
        self.used_wrap_counter = used_wrap_counter & 1
        self._used_since_signal = 0  # slots marked used since the last interrupt decision
        self._first_staged: tuple[int, int] | None = None  # (slot, flags) publish_used() writes last
        self._in_flight = bytearray(num)  # buffer ids popped and not yet used

    def export_state(self) -> PackedDeviceExport:
        """This ring's configuration, areas and device-side state, for a datapath that takes it over."""
        return PackedDeviceExport(
            num=self.num, addrs=self.addrs, event_idx=self.event_idx, name=self.name, areas=self._a.areas(),
            next_avail_idx=self.next_avail_idx, avail_wrap_counter=self.avail_wrap_counter,
            next_used_idx=self.next_used_idx, used_wrap_counter=self.used_wrap_counter,
            used_since_signal=self._used_since_signal, in_flight=bytes(self._in_flight),
        )

    def import_state(self, state: Mapping[str, int]) -> None:
        """The mirror of export_state(): take back the device-side state from a datapath that took
        this ring over (the soft device's C loopback: NetLoop.detach()), under the record's names:
        exactly next_avail_idx and next_used_idx (ring slots, below num), avail_wrap_counter and
        used_wrap_counter (0 or 1), and used_since_signal. Anything else is refused with ValueError,
        and then nothing is taken. The configuration and areas never moved, nor did what is in
        flight: such a datapath uses or puts back every chain it pops before it hands the ring back."""
        st = checked_import(self.name, state, {
            "next_avail_idx": self.num, "avail_wrap_counter": 2, "next_used_idx": self.num, "used_wrap_counter": 2,
            "used_since_signal": None,
        })
        self.next_avail_idx, self.avail_wrap_counter = st["next_avail_idx"], st["avail_wrap_counter"]
        self.next_used_idx, self.used_wrap_counter = st["next_used_idx"], st["used_wrap_counter"]
        self._used_since_signal = st["used_since_signal"]

    # -- taking chains ---------------------------------------------------------------------
    def _is_avail(self, slot: int, wrap: int) -> bool:
        flags = self._a.flags(slot)
        return bool(flags & VRING_PACKED_DESC_F_AVAIL) == bool(wrap) and bool(flags & VRING_PACKED_DESC_F_USED) != bool(
            wrap
        )

    def has_avail(self) -> bool:
        return not self.broken and self._is_avail(self.next_avail_idx, self.avail_wrap_counter)

    def pop(self) -> Chain | None:
        """The next available chain, checked against the spec and guest memory, or None."""
        if self.broken:
            raise RingBroken(f"{self.name}: queue is broken")
        head = self.next_avail_idx
        if not self._is_avail(head, self.avail_wrap_counter):
            return None
        # Read the rest of the chain only after the head's flags said it is available.
        rmb()
        desc = self._a.desc
        reader = ChainReader(self.mem, lambda reason: self._fail(reason, head))
        slot, wrap, slots = head, self.avail_wrap_counter, 0
        indirect = False
        while True:
            addr, length, buf_id, flags = DESC.unpack_from(desc, slot * DESC_SIZE)
            slots += 1
            slot += 1
            if slot == self.num:
                slot, wrap = 0, wrap ^ 1
            if flags & VRING_DESC_F_INDIRECT:
                if reader.segments or flags & VRING_DESC_F_NEXT:
                    self._fail("indirect descriptor chained with others", head)
                table = reader.indirect_table(addr, length, self.num)
                indirect = True
                for i in range(length // DESC_SIZE):
                    e_addr, e_len, _, e_flags = DESC.unpack_from(table, i * DESC_SIZE)
                    if e_flags & VRING_DESC_F_INDIRECT:
                        self._fail("indirect descriptor inside an indirect table", head)
                    reader.take_segment(e_addr, e_len, e_flags)
            else:
                reader.take_segment(addr, length, flags)
            if indirect or not flags & VRING_DESC_F_NEXT:
                break
            if slots == self.num:
                self._fail("chain longer than the ring", head)
        # The buffer id is the one of the last descriptor in the ring (2.8.6).
        if buf_id >= self.num:
            self._fail(f"buffer id {buf_id} out of range", head)
        if self._in_flight[buf_id]:
            self._fail(f"buffer id {buf_id} made available while still in flight", head)
        self._in_flight[buf_id] = 1
        self.next_avail_idx, self.avail_wrap_counter = slot, wrap
        return reader.chain(buf_id, slots, indirect)

    # -- returning chains -----------------------------------------------------------------
    def push_used(self, chain: Chain, written: int) -> tuple[tuple[int, int], ...]:
        """Mark `chain` used with `written` bytes written; any completion order is fine.

        Returns the (address, length) spans of ring memory this wrote, for the dirty log.
        """
        return self.stage_used(chain, written) + self.publish_used()

    def stage_used(self, chain: Chain, written: int) -> tuple[tuple[int, int], ...]:
        """Write `chain`'s used descriptor, not yet visible to the driver: publish_used() shows
        every staged one at once (a merged receive buffer's parts must be seen together,
        5.1.6.4.1). The driver reads used descriptors in ring order, so all but the first staged
        one get their flags now; the first one's flags, written last, publish them all.
        Returns the spans written, for the dirty log."""
        slot = self.next_used_idx
        desc = self._a.desc
        _LEN_ID.pack_into(desc, slot * DESC_SIZE + _DESC_LEN_OFF, written, chain.id)
        flags = _used_flags(self.used_wrap_counter) | (VRING_DESC_F_WRITE if chain.writable_bytes else 0)
        if self._first_staged is None:
            self._first_staged = (slot, flags)
        else:
            # id and len must be visible before the flags turn the descriptor into a used one.
            wmb()
            self._a.set_flags(slot, flags)
        self._in_flight[chain.id] = 0
        self.next_used_idx += chain.ndescs
        if self.next_used_idx >= self.num:
            self.next_used_idx -= self.num
            self.used_wrap_counter ^= 1
        self._used_since_signal += chain.ndescs
        return ((self.addrs.desc + slot * DESC_SIZE, DESC_SIZE),)

    def publish_used(self) -> tuple[tuple[int, int], ...]:
        """Make every staged used descriptor visible: the first one's flags, after all the rest."""
        if self._first_staged is None:
            return ()
        slot, flags = self._first_staged
        self._first_staged = None
        # Every staged id, len and later flags must be visible before the first flags expose them.
        wmb()
        self._a.set_flags(slot, flags)
        return ((self.addrs.desc + slot * DESC_SIZE, DESC_SIZE),)

    def unpop(self, chain: Chain) -> None:
        """Put back the chain pop() returned last, as if never popped (the device could not use it
        now: a receive buffer too few for a frame). Chains go back in the reverse of their pops."""
        self._in_flight[chain.id] = 0
        self.next_avail_idx -= chain.ndescs
        if self.next_avail_idx < 0:
            self.next_avail_idx += self.num
            self.avail_wrap_counter ^= 1

    def notify_area(self) -> tuple[int, int]:
        """The ring memory enable_notify()/disable_notify() write (the device event structure)."""
        return (self.addrs.device, PACKED_EVENT_SIZE)

    def need_notify(self) -> bool:
        """Whether the driver must be interrupted for the buffers used since the last call."""
        # The used flags must be visible before we read the driver's event suppression.
        mb()
        moved, self._used_since_signal = self._used_since_signal, 0
        return packed_notify_needed(
            self._a.driver_event16, self.next_used_idx, moved, self.used_wrap_counter, self.num, self.event_idx
        )

    # -- available buffer notifications (driver -> device) --------------------------------
    def disable_notify(self) -> None:
        _write_event(self._a.device_event16, None, VRING_PACKED_EVENT_FLAG_DISABLE)

    def enable_notify(self) -> bool:
        """Ask for a kick at the next available chain; False if chains are already there."""
        if self.event_idx:
            off_wrap = self.next_avail_idx | self.avail_wrap_counter << WRAP_BIT
            _write_event(self._a.device_event16, off_wrap, VRING_PACKED_EVENT_FLAG_DESC)
        else:
            _write_event(self._a.device_event16, None, VRING_PACKED_EVENT_FLAG_ENABLE)
        # The event store must be visible before we look at the ring once more.
        mb()
        return not self.has_avail()

    def state(self) -> RingState:
        return RingState(self.next_avail_idx, self.next_used_idx, self.avail_wrap_counter, self.used_wrap_counter)

    def _fail(self, reason: str, index: int) -> NoReturn:
        self.broken = True
        raise GuestRingError(self.name, reason, index)

    def close(self) -> None:
        self._a.release()
