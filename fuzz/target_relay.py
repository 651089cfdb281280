"""Fuzz targets: the C relay against the Python reference, under a hostile guest or a hostile device.

Both relays run the same script in two RelayRigs (tests/relay/harness.py) that differ only in the
relay's implementation; after every step everything the differential tests compare must be equal
(tests/differential/test_c_vs_python.py: rings, memory, dirty bitmap, stats, notifications, errors).
`side` picks who is hostile: "guest" pokes bytes into the guest-visible ring (descriptors, driver and
device areas, indirect tables), "device" into the shadow ring as a device could.

Input: 6 bytes of setup (layout pair, guest and shadow ring sizes, event_idx and indirect bits, the
rigs' seed), then ops, one byte each and their operands:

    ADD n · KICK · POP n · COMPLETE n · REAP  the well-behaved driver and device (RelayRig's own)
    POKE area u8, offset u16, byte            the hostile side writes one byte of its ring: area 0
                                              descriptors, 1 driver area, 2 device area, 3 indirect
    POKE16 area u8, offset u16, value u16     ... two bytes (indexes, flags, ids)
    NOTIFY                                    the hostile side notifies the relay, whatever it wrote
    FORGE id u16, len u32, flags u8           the hostile side publishes an entry of its own making
                                              where the relay reads next: a guest an available head
                                              (split) or descriptor (packed), a device a used element

A bug is a difference between the two relays (an exception from one and not the other included), an
exception out of the relay's own notification handlers, or a sanitizer report from the C relay.
"""

from __future__ import annotations

import struct
import sys

from fuzz._target import fuzz, instrumented

with instrumented():
    from tests.differential.test_c_vs_python import PAIRS, apply, assert_same, make_pair
    from tests.relay.harness import RelayRig
    from vdpa_svq.ring import IndirectArea, Layout
    from vdpa_svq.ring.chain import VRING_DESC_F_WRITE, VRING_PACKED_DESC_F_AVAIL, VRING_PACKED_DESC_F_USED
    from vdpa_svq.ring.layout import desc_area_size, device_area_size, driver_area_size

GUEST_NUMS = (1, 2, 4, 8)
SHADOW_NUMS = {Layout.SPLIT: (1, 2, 4, 8, 16), Layout.PACKED: (1, 2, 3, 4, 5, 8, 16)}  # split: powers of two
SETUP = struct.Struct("<BBBBH")
ADD, KICK, POP, COMPLETE, REAP, POKE, POKE16, NOTIFY, FORGE = range(9)
OPS = 9
FORGE_ARGS = struct.Struct("<HIB")  # id, len, flags


def hostile_areas(rig: RelayRig, side: str) -> tuple[object, list[tuple[int, int]]]:
    """(memory, [(address, length)]) that the hostile side may write: its ring's descriptor table,
    driver area, device area and indirect tables. A poke names an area, so that the fuzzer's offsets
    land in ring fields rather than anywhere in memory."""
    if side == "guest":
        layout, num, addrs, mem = rig.guest_layout, rig.guest_num, rig.g_addrs, rig.guest_mem
        indirect = (rig.g_indirect.gpa, IndirectArea.size(num, rig.g_indirect.max_entries))
    else:
        layout, num, addrs, mem = rig.shadow_layout, rig.shadow_num, rig.s_addrs, rig.dev_mem
        ind = rig.s_indirect
        indirect = (ind.gpa, IndirectArea.size(num, ind.max_entries)) if ind is not None else None
    areas = [(addrs.desc, desc_area_size(num)), (addrs.driver, driver_area_size(layout, num)),
             (addrs.device, device_area_size(layout, num))]
    return mem, areas + ([indirect] if indirect else [])


def step(rig: RelayRig, side: str, op: int, arg: bytes) -> None:
    if op in (ADD, POP, COMPLETE):
        apply(rig, ({ADD: "add", POP: "pop", COMPLETE: "complete"}[op], arg[0] % 4 + 1))
    elif op == KICK:
        apply(rig, ("kick",))
    elif op == REAP:
        apply(rig, ("reap",))
    elif op in (POKE, POKE16):
        mem, areas = hostile_areas(rig, side)
        start, length = areas[arg[0] % len(areas)]
        offset = struct.unpack_from("<H", arg, 1)[0] % length
        value = arg[3:4] if op == POKE else arg[3:5]
        mem.write(start + offset, value[: length - offset])
    elif op == FORGE:
        forge(rig, side, *FORGE_ARGS.unpack(arg))
    else:  # NOTIFY: must never raise; a ring error stops the queue and is recorded
        (rig.svq.on_guest_kick if side == "guest" else rig.svq.on_device_call)()


def forge(rig: RelayRig, side: str, ident: int, length: int, flags: int) -> None:
    """Publish one entry, well placed and arbitrary in content; the hostile side's own ring state
    moves past it (its later, honest entries follow it)."""
    if side == "guest":
        drv, num, addrs, mem = rig.drv, rig.guest_num, rig.g_addrs, rig.guest_mem
        if rig.guest_layout is Layout.SPLIT:
            mem.write(addrs.driver + 4 + 2 * (drv.avail_idx_shadow % num), struct.pack("<H", ident))
            drv.avail_idx_shadow = (drv.avail_idx_shadow + 1) & 0xFFFF
            mem.write(addrs.driver + 2, struct.pack("<H", drv.avail_idx_shadow))
            return
        slot, wrap = drv.next_avail_idx, drv.avail_wrap_counter
        avail = VRING_PACKED_DESC_F_AVAIL if wrap else VRING_PACKED_DESC_F_USED
        mem.write(addrs.desc + 16 * slot, struct.pack("<QIHH", rig.data, length, ident, avail | flags & 7))
        drv.next_avail_idx = (slot + 1) % num
        drv.avail_wrap_counter ^= drv.next_avail_idx == 0
        return
    dev, num, addrs, mem = rig.dev, rig.shadow_num, rig.s_addrs, rig.dev_mem
    if rig.shadow_layout is Layout.SPLIT:
        mem.write(addrs.device + 4 + 8 * (dev.used_idx % num), struct.pack("<II", ident, length))
        dev.used_idx = (dev.used_idx + 1) & 0xFFFF
        mem.write(addrs.device + 2, struct.pack("<H", dev.used_idx))
        return
    slot, wrap = dev.next_used_idx, dev.used_wrap_counter
    used = VRING_PACKED_DESC_F_AVAIL | VRING_PACKED_DESC_F_USED if wrap else 0
    mem.write(addrs.desc + 16 * slot + 8, struct.pack("<IHH", length, ident, used | flags & VRING_DESC_F_WRITE))
    dev.next_used_idx = (slot + 1) % num
    dev.used_wrap_counter ^= dev.next_used_idx == 0


ARG_BYTES = {ADD: 1, POP: 1, COMPLETE: 1, KICK: 0, REAP: 0, POKE: 4, POKE16: 5, NOTIFY: 0, FORGE: FORGE_ARGS.size}


def outcome(rig: RelayRig, side: str, op: int, arg: bytes) -> tuple[str, str] | None:
    try:
        step(rig, side, op, arg)
    except Exception as e:  # noqa: BLE001 - compared between the two relays below
        if op == NOTIFY:
            raise AssertionError(f"{rig.impl} relay: the notification handler raised {e!r}") from e
        return type(e).__name__, str(e)
    return None


def run(side: str, data: bytes) -> None:
    if len(data) < SETUP.size:
        return
    pair, gnum, snum, flags, seed = SETUP.unpack_from(data)
    g, s = PAIRS[pair % len(PAIRS)]
    shadow_nums = SHADOW_NUMS[s]
    py, c = make_pair(g, s, GUEST_NUMS[gnum % len(GUEST_NUMS)], shadow_nums[snum % len(shadow_nums)],
                      bool(flags & 1), bool(flags & 2), seed)
    try:
        pos, n = SETUP.size, 0
        while pos < len(data):
            op = data[pos] % OPS
            arg = data[pos + 1 : pos + 1 + ARG_BYTES[op]]
            pos += 1 + ARG_BYTES[op]
            if len(arg) < ARG_BYTES[op]:
                break
            got = [outcome(rig, side, op, arg) for rig in (py, c)]
            n += 1
            assert got[0] == got[1], f"step {n}: python {got[0]}, c {got[1]}"
            assert_same(py, c, f"after step {n}")
            if got[0] is not None:
                break  # the test's own driver or device gave up on what the hostile side wrote
    finally:
        py.close()
        c.close()


# -- seeds (fuzz/make_seeds.py) --------------------------------------------------------------------
def encode(pair: int, gnum: int, snum: int, flags: int, seed: int, ops: list[tuple[int, bytes]]) -> bytes:
    return SETUP.pack(pair, gnum, snum, flags, seed) + b"".join(bytes([op]) + arg for op, arg in ops)


def seeds(side: str) -> dict[str, bytes]:
    lap = [(ADD, b"\3"), (KICK, b""), (POP, b"\3"), (COMPLETE, b"\3"), (REAP, b"")]
    out = {}
    for pair in range(len(PAIRS)):
        g, s = PAIRS[pair]
        name = f"{g.value}-{s.value}"
        out[f"{name}-laps"] = encode(pair, 2, 5, 1, pair, lap * 6)
        out[f"{name}-indirect"] = encode(pair, 3, 6, 3, 7 + pair, lap * 4)
        # the hostile side changes a byte of its ring after a lap, then notifies
        hostile = [(POKE, struct.pack("<BHB", 2, 2, 0xFF)), (NOTIFY, b"")]
        out[f"{name}-poke"] = encode(pair, 2, 4, 1, 3, lap * 2 + hostile + lap * 2)
        forged = [(FORGE, FORGE_ARGS.pack(1, 64, 2)), (NOTIFY, b"")]
        out[f"{name}-forge"] = encode(pair, 2, 5, 1, 9, lap * 2 + forged + lap)
        flags_poke = (POKE16, struct.pack("<BHH", 0, 12, 0x8000))  # a descriptor's flags, mid-lap
        out[f"{name}-poke16"] = encode(pair, 3, 6, 0, 5, lap + [(ADD, b"\3"), flags_poke, (NOTIFY, b"")] + lap)
    return out


def main() -> None:
    side = sys.argv.pop(1)
    if side not in ("guest", "device"):
        raise SystemExit(f"usage: python -m fuzz.target_relay guest|device [libFuzzer flags] [corpus...]: not {side!r}")
    fuzz(lambda data: run(side, data))


if __name__ == "__main__":
    main()
