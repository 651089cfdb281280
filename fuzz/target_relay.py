"""Fuzz targets: the C relay against the Python reference, under a hostile guest or a hostile device.

Both relays run the same script in two RelayRigs (tests/relay/harness.py) that differ only in the
relay's implementation; after every step everything the differential tests compare must be equal
(tests/differential/test_c_vs_python.py: rings, memory, dirty bitmap, stats, notifications, errors).
`side` picks who is hostile: "guest" pokes bytes into the guest-visible ring (descriptors, driver and
device areas, indirect tables), "device" into the shadow ring as a device could.

Input: 6 bytes of setup (layout pair, guest and shadow ring sizes, event_idx and indirect bits, the
rigs' seed), then ops, one byte each and their operands:

    ADD n · KICK · POP n · COMPLETE n · REAP  the well-behaved driver and device (RelayRig's own)
    POKE offset u16, byte                     the hostile side writes one byte of its ring memory
    POKE16 offset u16, value u16              ... two bytes (indexes, flags, ids)
    NOTIFY                                    the hostile side notifies the relay, whatever it wrote

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
    from vdpa_svq.ring import Layout

GUEST_NUMS = (1, 2, 4, 8)
SHADOW_NUMS = {Layout.SPLIT: (1, 2, 4, 8, 16), Layout.PACKED: (1, 2, 3, 4, 5, 8, 16)}  # split: powers of two
SETUP = struct.Struct("<BBBBH")
ADD, KICK, POP, COMPLETE, REAP, POKE, POKE16, NOTIFY = range(8)
OPS = 8


def hostile_span(rig: RelayRig, side: str) -> tuple[object, int, int]:
    """(memory, first address, length) that the hostile side may write."""
    if side == "guest":
        start = rig.g_addrs.desc
        return rig.guest_mem, start, rig.data - start  # rings and indirect tables, up to the data blocks
    region = rig.shadow_mem.regions[0]
    return rig.dev_mem, region.gpa, region.size  # the whole shadow memory, at its IOVAs


def step(rig: RelayRig, side: str, op: int, arg: bytes) -> None:
    if op in (ADD, POP, COMPLETE):
        apply(rig, ({ADD: "add", POP: "pop", COMPLETE: "complete"}[op], arg[0] % 4 + 1))
    elif op == KICK:
        apply(rig, ("kick",))
    elif op == REAP:
        apply(rig, ("reap",))
    elif op in (POKE, POKE16):
        mem, start, length = hostile_span(rig, side)
        offset = struct.unpack_from("<H", arg)[0] % length
        value = arg[2:3] if op == POKE else arg[2:4]
        mem.write(start + offset, value[: length - offset])
    else:  # NOTIFY: must never raise; a ring error stops the queue and is recorded
        (rig.svq.on_guest_kick if side == "guest" else rig.svq.on_device_call)()


ARG_BYTES = {ADD: 1, POP: 1, COMPLETE: 1, KICK: 0, REAP: 0, POKE: 3, POKE16: 4, NOTIFY: 0}


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
        hostile = [(POKE, struct.pack("<HB", 2, 0xFF)), (NOTIFY, b"")]
        out[f"{name}-poke"] = encode(pair, 2, 4, 1, 3, lap * 2 + hostile + lap * 2)
        out[f"{name}-poke16"] = encode(pair, 3, 6, 0, 5, lap + [(ADD, b"\3"), (POKE16, struct.pack("<HH", 18, 0x8000)),
                                                            (NOTIFY, b"")] + lap)
    return out


def main() -> None:
    side = sys.argv.pop(1)
    if side not in ("guest", "device"):
        raise SystemExit(f"usage: python -m fuzz.target_relay guest|device [libFuzzer flags] [corpus...]: not {side!r}")
    fuzz(lambda data: run(side, data))


if __name__ == "__main__":
    main()
