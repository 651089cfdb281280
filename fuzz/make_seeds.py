"""Write the committed seed corpus, fuzz/seeds/TARGET/, from the project's own writers and drivers.

    python -m fuzz.make_seeds        (rewrites every target's seeds; deterministic)

Seeds are valid inputs that reach deep (a whole vhost-user session with traffic, dumps with rounds,
relay scripts that forward and complete) plus a few of the hostile cases the tests pin down; the
fuzzer mutates from there. Run it after changing a target's input format.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

from fuzz import target_relay
from fuzz import target_vhost_user as vu
from kernel_iface import uapi
from kernel_iface.uapi import bit
from vdpa_svq.dump import DumpHeader, write_dump
from vdpa_svq.guest.frames import build_frame
from vdpa_svq.guest.net import RX_BUFFER, NetDriver
from vdpa_svq.guest.plan import plan_layout
from vdpa_svq.memory.guest import GuestMemory
from vdpa_svq.ring import Layout
from vdpa_svq.vhost_user import messages as m
from vdpa_svq.vhost_user.messages import FLAG_NEED_REPLY, ProtocolFeature, Request

SEEDS = Path(__file__).parent / "seeds"
UADDR = 0x7F0000000000  # the frontend's address of guest-physical 0
NUM = 8


# -- vhost-user ------------------------------------------------------------------------------------
def ring_memory(layout: Layout, frames: int) -> tuple[bytes, list]:
    """Guest memory as a frontend leaves it after posting RX buffers and `frames` TX frames."""
    plan = plan_layout(layout, NUM, 2, RX_BUFFER, NUM)
    assert plan.size <= vu.MEM_SIZE, (hex(plan.size), hex(vu.MEM_SIZE))
    mem = GuestMemory.create(vu.MEM_SIZE)
    rings = [plan.driver_ring(i, mem, layout, event_idx=True, indirect=True, name=f"seed vq{i}") for i in range(2)]
    drv = NetDriver(mem, rings[0], rings[1], plan.pools[0], plan.pools[1], lambda i: None)
    drv.fill_rx()
    for seq in range(frames):
        drv.send(build_frame(seq, 64 + 37 * seq))
    image = mem.read(0, vu.MEM_SIZE)
    for r in rings:
        r.close()
    mem.close()
    return image, plan.rings


def pokes(image: bytes) -> bytes:
    """The non-zero parts of guest memory as POKE records, a page at a time."""
    out = b""
    for page in range(0, len(image), 4096):
        chunk = image[page : page + 4096].rstrip(b"\0")
        if chunk:
            out += vu.encode_poke(page, chunk)
    return out


def vhost_user_session(layout: Layout, *, log_all: bool = False, frames: int = 4, kick_mask: tuple = (1, 3)) -> bytes:
    """A frontend's whole session, as tests/vhost_user/client.py speaks it, then traffic."""
    image, rings = ring_memory(layout, frames)
    need = m.VERSION | FLAG_NEED_REPLY
    want = bit(uapi.VIRTIO_F_VERSION_1) | bit(m.VHOST_USER_F_PROTOCOL_FEATURES) | bit(uapi.VIRTIO_RING_F_EVENT_IDX)
    want |= bit(uapi.VIRTIO_RING_F_INDIRECT_DESC) | (bit(uapi.VIRTIO_F_RING_PACKED) if layout is Layout.PACKED else 0)
    want |= bit(m.VHOST_F_LOG_ALL) if log_all else 0
    pf = bit(ProtocolFeature.REPLY_ACK) | bit(ProtocolFeature.LOG_SHMFD) | bit(ProtocolFeature.CONFIG)
    s = pokes(image)
    s += vu.encode_msg(Request.SET_OWNER)
    s += vu.encode_msg(Request.GET_FEATURES)
    s += vu.encode_msg(Request.GET_PROTOCOL_FEATURES)
    s += vu.encode_msg(Request.SET_PROTOCOL_FEATURES, m.U64.pack(pf))
    s += vu.encode_msg(Request.SET_FEATURES, m.U64.pack(want), flags=need)
    s += vu.encode_msg(Request.GET_CONFIG, m.Config(0, 12, 0, bytes(12)).encode())
    table = m.MemTable((m.MemRegion(0, vu.MEM_SIZE, UADDR, 0),))
    s += vu.encode_msg(Request.SET_MEM_TABLE, table.encode(), fds=1 << 0, flags=need)
    if log_all:
        s += vu.encode_msg(Request.SET_LOG_BASE, m.LogArea(vu.LOG_SIZE, 0).encode(), fds=1 << 5)
    base = 0x8000 if layout is Layout.PACKED else 0
    for i, addrs in enumerate(rings):
        s += vu.encode_msg(Request.SET_VRING_NUM, m.VringState(i, NUM).encode(), flags=need)
        s += vu.encode_msg(Request.SET_VRING_BASE, m.VringState(i, base).encode(), flags=need)
        s += vu.encode_msg(Request.SET_VRING_ADDR, m.VringAddr(i, 0, addrs.desc + UADDR, addrs.device + UADDR,
                                                               addrs.driver + UADDR, addrs.device).encode(), flags=need)
        s += vu.encode_msg(Request.SET_VRING_CALL, m.U64.pack(i), fds=1 << (2 + 2 * i), flags=need)
        s += vu.encode_msg(Request.SET_VRING_KICK, m.U64.pack(i), fds=1 << kick_mask[i], flags=need)
    for i in range(2):
        s += vu.encode_msg(Request.SET_VRING_ENABLE, m.VringState(i, 1).encode(), flags=need)
    s += vu.encode_kick(1) + vu.encode_settle(6) + vu.encode_kick(0) + vu.encode_settle(6)
    for i in range(2):
        s += vu.encode_msg(Request.GET_VRING_BASE, m.VringState(i, 0).encode())
    return s


def vhost_user_seeds() -> dict[str, bytes]:
    seeds = {}
    for layout in Layout:
        for opts, impl in ((0, "c"), (1, "py"), (2, "c-auto")):
            seeds[f"session-{layout.value}-{impl}"] = bytes([opts]) + vhost_user_session(layout)
        seeds[f"session-{layout.value}-log"] = bytes([0]) + vhost_user_session(layout, log_all=True)
        # a hostile one the tests pin down: a memfd (pool fd 7) as queue 1's kick fd
        seeds[f"session-{layout.value}-memfd-kick"] = bytes([0]) + vhost_user_session(layout, kick_mask=(1, 7))
    return seeds


# -- dumps -----------------------------------------------------------------------------------------
def dump_bytes(regions, rounds, tmp: Path) -> bytes:
    header = DumpHeader(regions=tuple(regions), device_path="/dev/vhost-vdpa-0", device_id=1, features=0x130000000,
                        backend_features=0x6, created=1_700_000_000.0)
    bitmaps = []
    for i, pages in enumerate(rounds, 1):
        bits = bytearray(header.bitmap_bytes)
        for p in pages:
            bits[p // 8] |= 1 << p % 8
        bitmaps.append((bytes(bits), 1_700_000_000.0 + i))
    write_dump(tmp, header, bitmaps)
    return tmp.read_bytes()


def dump_seeds(tmp: Path) -> dict[str, bytes]:
    page = 4096
    cases = {
        "two-regions": ([(0, 64 * page), (128 * page, 64 * page)], [[0, 1, 2, 3, 130], [2, 3, 4, 191], []]),
        "one-round": ([(0, 1 << 20)], [list(range(0, 256, 3))]),
        "no-rounds": ([(0, 16 * page)], []),
        "sparse-high": ([(0, 16 * page), (1 << 32, 16 * page)], [[1, 15], [(1 << 32) // page + 2]]),
    }
    seeds = {}
    for name, (regions, rounds) in cases.items():
        data = dump_bytes(regions, rounds, tmp / f"{name}.svqlog")
        seeds[name] = b"\0" + data  # CRCs repaired by the target: mutations reach the fields
        seeds[name + "-raw"] = b"\1" + data
    return seeds


def write(target: str, seeds: dict[str, bytes]) -> None:
    out = SEEDS / target
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    for name, data in seeds.items():
        digest = hashlib.sha1(data).hexdigest()[:10]
        (out / f"{name}-{digest}").write_bytes(data)
    print(f"{out}: {len(seeds)} seeds, {sum(map(len, seeds.values()))} bytes")


def main() -> None:
    tmp = Path(f"/dev/shm/vdpa-svq-seeds-{os.getpid()}")
    tmp.mkdir()
    try:
        write("vhost_user", vhost_user_seeds())
        write("dump", dump_seeds(tmp))
        for side in ("guest", "device"):
            write(f"relay_{side}", target_relay.seeds(side))
    finally:
        shutil.rmtree(tmp)


if __name__ == "__main__":
    main()
