"""A driver ring and a device ring over one GuestMemory, plus an independent model of the spec.

The model keeps unbounded counters (no 16-bit or wrap-counter arithmetic): positions of
avail/used progress and of the event indexes each side published. Expected notifications are
computed from those, so the ring's 16-bit/wrap encoding is checked against plain integers.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass, field

from vdpa_svq.guest.chains import SentChain
from vdpa_svq.memory import GuestMemory
from vdpa_svq.ring import Chain, IndirectArea, Layout, device_ring, driver_ring, place_ring

BLOCK = 64  # bytes per data buffer block
MAX_SEGS = 4


@dataclass
class InFlight(SentChain):
    """A chain in flight, with the data blocks it took and the ring slots it fills (1 if indirect)."""

    blocks: list[int] = field(default_factory=list)
    slots: int = 1


@dataclass
class Counters:
    kicks: int = 0
    kick_checks: int = 0
    calls: int = 0
    call_checks: int = 0
    delivered: int = 0
    reaped: int = 0


@dataclass
class RingPair:
    layout: Layout
    num: int
    event_idx: bool
    seed: int = 0
    mem: GuestMemory = field(init=False)
    counters: Counters = field(default_factory=Counters)

    def __post_init__(self) -> None:
        self.rng = random.Random(self.seed)
        addrs, end = place_ring(self.layout, self.num, 0x1000)
        self.indirect_gpa = (end + 0xFFF) & ~0xFFF
        self.data_gpa = (self.indirect_gpa + IndirectArea.size(self.num, MAX_SEGS * 2) + 0xFFF) & ~0xFFF
        nblocks = self.num * MAX_SEGS * 2
        self.mem = GuestMemory.create(self.data_gpa + nblocks * BLOCK)
        self.free_blocks = list(range(nblocks))
        area = IndirectArea(self.indirect_gpa, MAX_SEGS * 2)
        self.drv = driver_ring(self.layout, self.mem, self.num, addrs, event_idx=self.event_idx, indirect_area=area)
        self.dev = device_ring(self.layout, self.mem, self.num, addrs, event_idx=self.event_idx)
        self.by_id: dict[int, InFlight] = {}
        self.popped: list[tuple[Chain, InFlight]] = []  # at the device, not yet used
        self.used_order: list[InFlight] = []  # pushed used, not yet reaped, in order
        self.next_token = 0
        # Model, in unbounded units: buffers for split, ring slots for packed.
        self.avail_abs = 0  # made available by the driver
        self.avail_at_last_kick_check = 0
        self.dev_seen_abs = 0  # consumed by the device
        self.used_abs = 0  # marked used by the device
        self.used_at_last_signal = 0
        self.reaped_abs = 0  # reaped by the driver
        # What each side published to suppress the other's notifications: "event" (an event
        # index, absolute in the model), "enable" or "disable". Split with EVENT_IDX is always
        # "event"; packed starts at "enable" (flags 0) until the side writes DESC.
        initial = "event" if (self.event_idx and self.layout is Layout.SPLIT) else "enable"
        self.kick_mode = initial
        self.avail_event_abs = 0
        self.irq_mode = initial
        self.used_event_abs = 0
        self.drv_cb_disabled = False

    def _effective_event(self, event_abs: int, new: int) -> int:
        """Where the spec's encoding puts an event, seen from position `new`.

        An event index names a position modulo a period: 2**16 for split (le16 idx), two laps
        for packed (slot + wrap counter). Split compares it as the position at or before `new`;
        packed as a slot in the current lap (same wrap counter) or the previous one (2.8.10).
        """
        if self.layout is Layout.SPLIT:
            return new - ((new - event_abs) % 0x10000)
        period, lap_start = 2 * self.num, (new // self.num) * self.num
        low = lap_start - self.num
        return low + ((event_abs - low) % period)

    def _expect_notify(self, old: int, new: int, event_abs: int) -> bool:
        if self.layout is Layout.PACKED and new - old >= self.num:
            return True  # a lap or more since the last decision: always notify (documented rule)
        return old <= self._effective_event(event_abs, new) < new

    def _units(self, slots: int) -> int:
        return 1 if self.layout is Layout.SPLIT else slots

    # -- driver operations ---------------------------------------------------------------
    def add(self, n_out: int, n_in: int, lens: list[int], indirect: bool) -> bool:
        n = n_out + n_in
        if n > self.num or len(self.free_blocks) < n:
            return False  # no chain is longer than the queue (2.7.5.3.1), indirect ones included
        slots = 1 if (indirect and n > 1) else n
        if slots > self.drv.num_free:
            return False
        blocks = [self.free_blocks.pop() for _ in range(n)]
        segs = [(self.data_gpa + b * BLOCK, lens[i % len(lens)]) for i, b in enumerate(blocks)]
        out, in_ = segs[:n_out], segs[n_out:]
        rec = InFlight(self.next_token, out, in_, [self.rng.randbytes(length) for _, length in out], blocks=blocks,
                       slots=slots)
        rec.write_out(self.mem)
        for a, length in in_:
            self.mem.write(a, b"\xee" * length)
        self.next_token += 1
        buf_id = self.drv.add(out, in_, rec.token, indirect=indirect)
        assert buf_id not in self.by_id, f"id {buf_id} reused while in flight"
        self.by_id[buf_id] = rec
        self.avail_abs += self._units(slots)
        return True

    def kick_check(self) -> None:
        old, new = self.avail_at_last_kick_check, self.avail_abs
        self.avail_at_last_kick_check = new
        got = self.drv.kick_needed()
        self.counters.kick_checks += 1
        if old == new:
            expected = False
        elif self.kick_mode == "event":
            expected = self._expect_notify(old, new, self.avail_event_abs)
        else:
            expected = self.kick_mode == "enable"
        assert got == expected, f"kick_needed()={got}, spec says {expected} (old={old} new={new})"
        self.counters.kicks += got

    def reap(self, k: int) -> None:
        for _ in range(k):
            r = self.drv.get_used()
            if r is None:
                assert not self.used_order, "used buffers pending but get_used() returned None"
                return
            token, length = r
            expect = self.used_order.pop(0)
            assert token == expect.token, "used buffers came back out of the device's order"
            assert expect.written is not None
            assert length == len(expect.written)
            assert expect.written_back(self.mem, length) == expect.written, "written bytes differ"
            self.free_blocks.extend(expect.blocks)
            self.reaped_abs += self._units(expect.slots)
            self.counters.reaped += 1
            if self.event_idx and not self.drv_cb_disabled:
                self.used_event_abs = self.reaped_abs
        assert self.reaped_abs <= self.used_abs

    def cb(self, mode: str) -> None:
        if mode == "disable":
            self.drv.disable_cb()
            self.drv_cb_disabled = True
            if not self.event_idx or self.layout is Layout.PACKED:
                self.irq_mode = "disable"
            return
        pending = self.used_abs - self.reaped_abs
        if mode == "enable":
            bufs = 0
            ok = self.drv.enable_cb()
        else:
            in_flight = self.avail_abs - self.reaped_abs
            if self.layout is Layout.PACKED:
                in_flight = self.drv.num - self.drv.num_free
            bufs = in_flight * 3 // 4 if self.event_idx else 0
            ok = self.drv.enable_cb_delayed()
        self.drv_cb_disabled = False
        self.used_event_abs = self.reaped_abs + bufs
        self.irq_mode = "event" if self.event_idx else "enable"
        if self.layout is Layout.SPLIT:
            assert ok == (pending <= bufs), f"enable_cb returned {ok} with {pending} pending"
        elif bufs == 0:
            assert ok == (pending == 0)

    # -- device operations ---------------------------------------------------------------
    def dev_pop(self, k: int) -> None:
        for _ in range(k):
            chain = self.dev.pop()
            if chain is None:
                assert self.dev_seen_abs == self.avail_abs, "available chains missed by the device"
                return
            rec = self.by_id.get(chain.id)
            assert rec is not None, f"device got id {chain.id} that is not in flight"
            assert chain.readable == rec.out and chain.writable == rec.in_
            assert chain.ndescs == rec.slots
            for (a, n), data in zip(chain.readable, rec.out_bytes, strict=True):
                assert self.mem.read(a, n) == data, "readable bytes changed in transit"
            self.popped.append((chain, rec))
            self.dev_seen_abs += self._units(chain.ndescs)
            self.counters.delivered += 1

    def dev_complete(self, pick: int, fraction: float) -> None:
        if not self.popped:
            return
        chain, rec = self.popped.pop(pick % len(self.popped))
        room = sum(n for _, n in rec.in_)
        written = self.rng.randbytes(int(room * fraction))
        pos = 0
        for a, n in rec.in_:
            part = written[pos : pos + n]
            self.mem.write(a, part)
            pos += len(part)
        rec.written = written
        del self.by_id[chain.id]
        self.dev.push_used(chain, len(written))
        self.used_order.append(rec)
        self.used_abs += self._units(chain.ndescs)

    def dev_signal(self) -> None:
        old, new = self.used_at_last_signal, self.used_abs
        self.used_at_last_signal = new
        got = self.dev.need_notify()
        self.counters.call_checks += 1
        if old == new:
            expected = False
        elif self.irq_mode == "event":
            expected = self._expect_notify(old, new, self.used_event_abs)
        else:
            expected = self.irq_mode == "enable"
        assert got == expected, f"need_notify()={got}, spec says {expected} (old={old} new={new})"
        self.counters.calls += got

    def dev_notify(self, enable: bool) -> None:
        if enable:
            ok = self.dev.enable_notify()
            self.kick_mode = "event" if self.event_idx else "enable"
            self.avail_event_abs = self.dev_seen_abs
            assert ok == (self.dev_seen_abs == self.avail_abs)
        else:
            self.dev.disable_notify()
            if not self.event_idx or self.layout is Layout.PACKED:
                self.kick_mode = "disable"

    def drain(self) -> None:
        """Finish everything in flight; the ring must end empty and consistent."""
        self.kick_check()
        self.dev_pop(self.num + 1)
        while self.popped:
            self.dev_complete(0, 1.0)
        self.dev_signal()
        self.reap(self.num + 1)
        assert not self.by_id and not self.used_order
        assert self.drv.num_free == self.num
        assert self.counters.delivered == self.counters.reaped == self.next_token

    def close(self) -> None:
        self.drv.close()
        self.dev.close()
        self.mem.close()


# What each op of random_ops() (and of the Hypothesis strategies) does: ("kind", *arguments).
OPS: dict[str, Callable[..., object]] = {
    "add": RingPair.add,
    "kick": RingPair.kick_check,
    "pop": RingPair.dev_pop,
    "complete": RingPair.dev_complete,
    "signal": RingPair.dev_signal,
    "reap": RingPair.reap,
    "cb": RingPair.cb,
    "notify": RingPair.dev_notify,
}


def run_ops(pair: RingPair, ops: list[tuple]) -> None:
    for kind, *args in ops:
        OPS[kind](pair, *args)


def random_ops(rng: random.Random, count: int, *, max_segs: int = MAX_SEGS) -> list[tuple]:
    ops: list[tuple] = []
    for _ in range(count):
        r = rng.random()
        if r < 0.35:
            n_out = rng.randint(0, max_segs)
            n_in = rng.randint(0 if n_out else 1, max_segs)
            lens = [rng.randint(1, BLOCK) for _ in range(n_out + n_in)]
            ops.append(("add", n_out, n_in, lens, rng.random() < 0.3))
        elif r < 0.45:
            ops.append(("kick",))
        elif r < 0.6:
            ops.append(("pop", rng.randint(1, 4)))
        elif r < 0.75:
            ops.append(("complete", rng.randint(0, 7), rng.random()))
        elif r < 0.82:
            ops.append(("signal",))
        elif r < 0.94:
            ops.append(("reap", rng.randint(1, 4)))
        elif r < 0.97:
            ops.append(("cb", rng.choice(["enable", "disable", "delayed"])))
        else:
            ops.append(("notify", rng.random() < 0.6))
    return ops
