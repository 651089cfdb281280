"""Guest driver -> guest ring -> ShadowVirtqueue -> shadow ring -> device, all in one process.

The device reaches memory the way a vDPA device does, through IOVAs: its memory object maps the
guest memory's memfd at IOVA = GPA and the shadow memory's memfd at the shadow IOVAs. The test
keeps its own record of every guest page the device wrote, to check the dirty log against.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

from vdpa_svq.dirty import DirtyBitmap
from vdpa_svq.guest.chains import SentChain
from vdpa_svq.memory import PAGE_SIZE, GuestMemory
from vdpa_svq.memory.iova import IovaMap
from vdpa_svq.relay_impl import make_shadow_virtqueue
from vdpa_svq.ring import IndirectArea, Layout, device_ring, driver_ring, place_ring

BLOCK = 256
MAX_SEGS = 4


@dataclass
class RelayRig:
    guest_layout: Layout
    shadow_layout: Layout
    guest_num: int
    shadow_num: int
    event_idx: bool
    seed: int = 0
    indirect: bool = False
    impl: str = "py"
    device_pages: set[int] = field(default_factory=set)
    # > 0: the data area is guest memory regions of `fragment` pages each, and the IOVA map
    # places them in shuffled order: every lookup (GPA -> host, GPA -> IOVA) has many to pick from.
    fragment: int = 0

    def __post_init__(self) -> None:
        self.rng = random.Random(self.seed)
        g_addrs, end = place_ring(self.guest_layout, self.guest_num, 0x1000, device_area_align=PAGE_SIZE)
        self.g_indirect = IndirectArea((end + 0xFFF) & ~0xFFF, MAX_SEGS * 2)
        self.data = (self.g_indirect.gpa + IndirectArea.size(self.guest_num, MAX_SEGS * 2) + 0xFFF) & ~0xFFF
        nblocks = self.guest_num * MAX_SEGS * 2
        size = self.data + nblocks * BLOCK
        self.backing = GuestMemory.create(size, name="guest")  # the memfd all guest memory is in
        self.free = list(range(nblocks))
        self.iova = IovaMap()
        # (gpa, size, iova) of each guest memory region
        pieces = [(0, size, 0)] if not self.fragment else self._fragments(size)
        self.guest_mem = self.backing if not self.fragment else GuestMemory()
        for gpa, n, iova in pieces:
            if self.fragment:
                self.guest_mem.add_region(gpa, n, self.backing.regions[0].fd, gpa)
            self.iova.add(gpa, n, iova)
        # Shadow memory: owned by the relay, at fresh IOVAs above guest memory.
        s_size = 0x1000 + 16 * self.shadow_num * 2 + 8 * self.shadow_num + 0x3000
        s_size += IndirectArea.size(self.shadow_num, MAX_SEGS * 4)
        s_base = self.iova.alloc(s_size)
        self.shadow_mem = GuestMemory.create(s_size, gpa=s_base, name="shadow")
        s_addrs, end = place_ring(self.shadow_layout, self.shadow_num, s_base, device_area_align=PAGE_SIZE)
        s_indirect = IndirectArea((end + 15) & ~15, MAX_SEGS * 4) if self.indirect else None
        # The device's view: both memfds at their IOVAs.
        self.dev_mem = GuestMemory()
        for gpa, n, iova in pieces:
            self.dev_mem.add_region(iova, n, self.backing.regions[0].fd, gpa)
        self.dev_mem.add_region(s_base, self.shadow_mem.regions[0].size, self.shadow_mem.regions[0].fd)
        self.dirty = DirtyBitmap(size)
        ev = self.event_idx
        self.drv = driver_ring(self.guest_layout, self.guest_mem, self.guest_num, g_addrs, event_idx=ev,
                               indirect_area=self.g_indirect, name="guest-driver")
        self.g_addrs, self.s_addrs, self.s_indirect = g_addrs, s_addrs, s_indirect
        self.dev = device_ring(self.shadow_layout, self.dev_mem, self.shadow_num, s_addrs, event_idx=ev, name="device")
        self.device_kicks = self.guest_calls = 0
        # Each side only looks at its ring when notified (or when re-enabling found more): a
        # notification the relay wrongly suppressed shows up as a stall.
        self.device_kicked = self.guest_called = False
        self.relay_rings: list = []
        self.svq = self.make_svq(self.iova)
        self.guest_ring_spans = [(g_addrs.desc, 16 * self.guest_num), (g_addrs.device, 0x1000)]
        self.by_token: dict[int, SentChain] = {}
        self.at_device: list = []
        self.next_token = 0
        self.reaped = 0
        self.used_log: list[tuple[int, int]] = []  # (token, len) in the order the guest reaped them

    def _fragments(self, size: int) -> list[tuple[int, int, int]]:
        """The rings' area, then the data area cut every `fragment` pages (no buffer crosses a cut),
        at IOVAs above guest memory in shuffled order."""
        step = self.fragment * PAGE_SIZE
        cuts = list(range(self.data, size, step))
        order = list(range(len(cuts)))
        self.rng.shuffle(order)
        base = (size + 0xFFFF) & ~0xFFFF
        data = [(gpa, min(step, size - gpa), base + k * step) for gpa, k in zip(cuts, order, strict=True)]
        return [(0, self.data, 0), *data]

    def make_svq(self, iova: IovaMap):
        """The relay under test (`impl`), over fresh guest-side and shadow rings."""
        ev = self.event_idx
        guest_side = device_ring(self.guest_layout, self.guest_mem, self.guest_num, self.g_addrs, event_idx=ev,
                                 name="guest")
        shadow_side = driver_ring(self.shadow_layout, self.shadow_mem, self.shadow_num, self.s_addrs, event_idx=ev,
                                  indirect_area=self.s_indirect, name="shadow")
        self.relay_rings += [guest_side, shadow_side]
        return make_shadow_virtqueue(guest_side, shadow_side, iova, self.dirty, device_kick=self._device_kick,
                                     guest_call=self._guest_call, indirect=self.indirect, name="svq", impl=self.impl)

    def _device_kick(self) -> None:
        self.device_kicks += 1
        self.device_kicked = True

    def _guest_call(self) -> None:
        self.guest_calls += 1
        self.guest_called = True

    # -- guest ---------------------------------------------------------------------------------
    def guest_add(self) -> bool:
        n_out = self.rng.randint(0, MAX_SEGS)
        n_in = self.rng.randint(0 if n_out else 1, MAX_SEGS)
        n = n_out + n_in
        indirect = self.rng.random() < 0.3
        if n > min(self.guest_num, self.shadow_num):
            return False  # no chain is longer than a queue (2.7.5.3.1), indirect ones included
        if len(self.free) < n or (1 if indirect else n) > self.drv.num_free:
            return False
        segs = []
        for _ in range(n):
            b = self.free.pop(self.rng.randrange(len(self.free)))
            off = self.rng.randint(0, BLOCK - 1)
            segs.append((self.data + b * BLOCK + off, self.rng.randint(1, BLOCK - off)))
        out, in_ = segs[:n_out], segs[n_out:]
        rec = SentChain(self.next_token, out, in_, [self.rng.randbytes(ln) for _, ln in out])
        rec.write_out(self.guest_mem)
        self.next_token += 1
        self.drv.add(out, in_, rec.token, indirect=indirect)
        self.by_token[rec.token] = rec
        return True

    def guest_kick(self) -> None:
        if self.drv.kick_needed():
            self.svq.on_guest_kick()

    def guest_on_call(self) -> None:
        if not self.guest_called:
            return
        self.guest_called = False
        while True:
            self.drv.disable_cb()
            self._reap()
            if self.drv.enable_cb():
                return

    def _reap(self) -> None:
        while (r := self.drv.get_used()) is not None:
            tok, length = r
            self.used_log.append((tok, length))
            rec = self.by_token.pop(tok)
            assert rec.written is not None, "guest got a buffer back that the device never used"
            assert length == len(rec.written)
            assert rec.written_back(self.guest_mem, length) == rec.written
            for a, _ in rec.out + rec.in_:
                self.free.append((a - self.data) // BLOCK)
            self.reaped += 1

    # -- device --------------------------------------------------------------------------------
    def device_on_kick(self, budget: int) -> None:
        """Take up to `budget` chains; a device that stops early polls again later by itself."""
        if not self.device_kicked:
            return
        while True:
            self.dev.disable_notify()
            while budget and (c := self.dev.pop()) is not None:
                self.at_device.append(c)
                budget -= 1
            if not budget:
                return  # still "kicked": it comes back for the rest
            if self.dev.enable_notify():
                self.device_kicked = False
                return

    def device_complete(self, k: int) -> None:
        for _ in range(min(k, len(self.at_device))):
            c = self.at_device.pop(self.rng.randrange(len(self.at_device)))
            rec = self._rec_for(c)
            assert b"".join(self.dev_mem.read(a, n) for a, n in c.readable) == b"".join(rec.out_bytes)
            room = sum(n for _, n in c.writable)
            data = self.rng.randbytes(self.rng.randint(0, room))
            pos = 0
            for a, n in c.writable:
                part = data[pos : pos + n]
                self.dev_mem.write(a, part)
                if part:  # IOVA = GPA for guest memory: the page numbers are guest pages
                    self.device_pages.update(range(a // PAGE_SIZE, (a + len(part) - 1) // PAGE_SIZE + 1))
                pos += len(part)
            rec.written = data
            self.dev.push_used(c, len(data))
        if self.dev.need_notify():
            self.svq.on_device_call()

    def _rec_for(self, chain) -> SentChain:
        # The device sees shadow ids; find the guest chain by the bytes' addresses (as IOVAs).
        addrs = [a for a, _ in chain.writable] or [a for a, _ in chain.readable]
        for rec in self.by_token.values():
            first = ([a for a, _ in rec.in_] or [a for a, _ in rec.out])[0]
            if rec.written is None and addrs and self.iova.translate(first, 1)[0][0] == addrs[0]:
                return rec
        raise AssertionError("device got a chain the guest never made available")

    def drain(self) -> None:
        """Run both ends until everything came back; a lost notification stalls and fails here."""
        self.guest_kick()
        for _ in range(10 * self.guest_num + 100):
            self.device_on_kick(self.shadow_num)
            self.device_complete(len(self.at_device))
            self.guest_on_call()
            if not self.by_token:
                break
        assert not self.by_token, f"{len(self.by_token)} buffers never came back (lost notification?)"
        assert self.svq.error is None, self.svq.error

    def close(self) -> None:
        if self.svq.error is not None:
            # The Python relay's error keeps the ring's frames, and so views of guest memory, alive.
            self.svq.error.__traceback__ = None
        if self.impl == "c":
            self.svq.close()  # its exports keep the memory mapped: release them first
        for r in (self.drv, self.dev, *self.relay_rings):
            r.close()
        for m in {id(m): m for m in (self.dev_mem, self.shadow_mem, self.guest_mem, self.backing)}.values():
            m.close()
