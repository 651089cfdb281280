"""The soft net device's C datapath (NetLoop): who owns the rings, how it hands them back, the inline
kick, and the chains it leaves to the Python datapath. (Every other soft device test runs on both
datapaths.)"""

from __future__ import annotations

import dataclasses
import functools

import pytest

from kernel_iface import uapi
from kernel_iface.device import PackedVringBase
from tests.kernel.frames import exchange
from tests.softdev.driver import NET_HDR, RX, SLOT, TX, NetDriver, net_hdr, rx_hdr
from vdpa_svq.attach import net_guest
from vdpa_svq.guest.frames import build_frame, parse_frame
from vdpa_svq.loop import EventfdNotifier
from vdpa_svq.ring import Layout
from vdpa_svq.softdev import SoftNetDevice


@pytest.fixture
def net(net_datapath: str):
    drivers: list[NetDriver] = []

    def make(**kw: object) -> NetDriver:
        drv = NetDriver(SoftNetDevice(), num=16, **kw)  # type: ignore[arg-type]
        drivers.append(drv)
        return drv

    yield make
    for drv in drivers:
        drv.close()


def _round_trip(drv: NetDriver, frames: list[bytes]) -> list[bytes]:
    drv.post_rx(len(frames))
    for i, frame in enumerate(frames):
        drv.send(frame, net_hdr(i))
    got = drv.recv(len(frames))
    drv.complete_tx(len(frames))
    return got


@pytest.mark.parametrize("packed", [False, True], ids=["split", "packed"])
def test_c_owns_the_rings_while_it_serves_and_any_control_call_takes_them_back(net, net_datapath, packed):
    drv = net(packed=packed)
    dev = drv.dev
    assert dev.datapath == net_datapath
    assert _round_trip(drv, [b"one", b"two"])[1] == rx_hdr(net_hdr(1)) + b"two"
    if net_datapath == "py":
        assert dev._c is None
        return
    assert dev._c[0].loaded  # the rings' indexes live in C now
    base = dev.get_vring_base(TX)  # a control call: the lock hands them back first
    assert not dev._c[0].loaded
    # Two TX chains of two descriptors each: what C did is what GET_VRING_BASE reports.
    if packed:
        b = PackedVringBase.from_num(base)
        assert (b.last_avail_idx, b.last_used_idx) == (4, 4)
    else:
        assert base == 2
    st = dev.stats()
    assert (st["tx"].chains, st["rx"].chains, st["tx"].dropped) == (2, 2, 0)
    assert st["tx"].read_bytes == 2 * NET_HDR + 6
    # ... and the next pass takes them again, from where Python left them.
    assert _round_trip(drv, [b"three"]) == [rx_hdr(net_hdr(0)) + b"three"]
    assert dev._c[0].loaded


def _device_side(ring) -> dict:
    """A device ring's export_state() record as plain values: its areas' bytes, not the views."""
    st = ring.export_state()
    out = {f.name: getattr(st, f.name) for f in dataclasses.fields(st)}
    out["areas"] = tuple(bytes(v) for v in st.areas)
    return out


@pytest.mark.parametrize("handed_back", ["by-the-lock", "mid-pass"])
@pytest.mark.parametrize("event_idx", [False, True], ids=["flags", "event-idx"])
@pytest.mark.parametrize("packed", [False, True], ids=["split", "packed"])
def test_rings_c_hands_back_stand_where_the_python_datapath_leaves_them(net_datapath, packed, event_idx, handed_back):
    """export_state() -> NetLoop.attach -> traffic -> NetLoop.detach() -> import_state(): each ring's
    state, its memory, the counters and what the driver receives are what the Python datapath alone
    leaves after the same pass. by-the-lock: C serves both frames and the next control call takes
    the rings back. mid-pass: the second RX buffer crosses two IOTLB mappings, so C serves the first
    frame and hands the rings back with buffers used and no interrupt decided for them yet (split:
    signalled_used behind used_idx; packed: used_since_signal), and Python serves the second: with
    EVENT_IDX, packed, the driver gets its call only if Python counts the slots C used too."""
    if net_datapath == "py":
        return  # the reference is the Python datapath itself: below, both run
    probe = NetDriver(SoftNetDevice(), num=16)
    data_base, size = probe.data_base, sum(r.size for r in probe.mem)
    probe.close()
    maps = None
    if handed_back == "mid-pass":
        cut = data_base + SLOT + 1000  # inside the second data slot: the second RX buffer posted
        maps = [(0, cut, uapi.VHOST_ACCESS_RW), (cut, size - cut, uapi.VHOST_ACCESS_RW)]
    big = bytes(range(256)) * 6  # header + 1536 bytes cross the cut
    seen = {}
    for datapath in ("c", "py"):
        drv = NetDriver(SoftNetDevice(datapath=datapath), num=16, packed=packed, event_idx=event_idx, maps=maps)
        try:
            dev = drv.dev
            with dev.lock.raw:  # the device's thread waits: this pass, by hand, is the one with work
                for q in drv.queues:
                    q.ring.enable_cb()  # a call for the first used buffer (EVENT_IDX: the event names it)
                drv.post_rx(2)
                drv.send(b"first", net_hdr(0), kick=False)
                drv.send(big, net_hdr(1), kick=False)
                dev._datapath.service()
                if datapath == "c":
                    assert dev._c[0].loaded == (handed_back == "by-the-lock")
                got = drv.recv_ready()
            with dev.lock:  # takes the rings back from C
                rings = [_device_side(q.ring) for q in dev.queues]
                counts = {name: dataclasses.replace(st, kicks=0) for name, st in dev.stats().items()}
            seen[datapath] = (got, rings, counts)
        finally:
            drv.close()
    assert seen["c"][0] == [rx_hdr(net_hdr(0)) + b"first", rx_hdr(net_hdr(1)) + big]
    assert seen["c"] == seen["py"]


@pytest.mark.parametrize("packed", [False, True], ids=["split", "packed"])
def test_inline_kick_serves_in_the_callers_thread(net, net_datapath, packed):
    """A driver in this process (the relay) calls the kick: the frames are back on RX when it returns,
    with no eventfd and no wait for the device's thread."""
    drv = net(packed=packed)
    dev = drv.dev
    kick = dev.inline_kick(TX)
    if net_datapath == "py":
        assert kick is None
        return
    _round_trip(drv, [b"warm-up"])  # the device's thread has attached the C datapath
    drv.post_rx(3)
    for i in range(3):
        drv.send(b"frame%d" % i, net_hdr(i), kick=False)
    with dev.lock.raw:  # the device's own thread cannot serve meanwhile: only the inline kick can
        kick()
        got = drv.recv_ready()
    assert got == [rx_hdr(net_hdr(i)) + b"frame%d" % i for i in range(3)]
    assert dev.stats()["tx"].kicks >= 1


def test_a_chain_c_leaves_to_python_is_served_by_python_and_c_takes_over_again(net, net_datapath):
    """An RX buffer across two IOTLB mappings is not C's regular case: the Python datapath serves
    that frame (the rings as C left them), and the C datapath serves the next ones."""
    plan = NetDriver.plan_for(SoftNetDevice(), num=16)
    data_base, size = plan.pools[0].gpa, plan.size
    cut = data_base + 1000  # inside the first data slot: the first RX buffer posted
    drv = net(maps=[(0, cut, uapi.VHOST_ACCESS_RW), (cut, size - cut, uapi.VHOST_ACCESS_RW)])
    big = bytes(range(256)) * 6  # header + 1536 bytes cross the cut
    assert len(big) + NET_HDR < SLOT
    drv.post_rx(1)
    drv.send(big, net_hdr(7))
    assert drv.recv(1) == [rx_hdr(net_hdr(7)) + big]
    drv.complete_tx(1)
    assert drv.dev.queue_errors() == {}
    assert _round_trip(drv, [b"after"]) == [rx_hdr(net_hdr(0)) + b"after"]
    if net_datapath == "c":
        assert drv.dev._c[0].loaded
    assert drv.dev.stats()["rx"].chains == 2


def test_a_fault_in_a_chain_c_leaves_to_python_is_python_s_own(net, net_datapath):
    """An RX buffer the IOTLB maps read-only: C does not write it; the Python datapath breaks the RX
    queue with the IOTLB's reason, exactly as without the C datapath."""
    plan = NetDriver.plan_for(SoftNetDevice(), num=16)
    data_base, size = plan.pools[0].gpa, plan.size
    drv = net(maps=[(0, data_base, uapi.VHOST_ACCESS_RW), (data_base, size - data_base, uapi.VHOST_ACCESS_RO)])
    drv.post_rx(1)
    drv.send(b"nowhere to go", net_hdr(0))
    reason = drv.wait_error(RX)
    assert "device write to a read-only mapping" in reason
    assert drv.dev.queue_errors()[RX] == reason


@pytest.mark.parametrize("impl", ["c", "py"])
@pytest.mark.parametrize("guest_layout", [Layout.SPLIT, Layout.PACKED], ids=["guest-split", "guest-packed"])
@pytest.mark.parametrize("packed", [False, True], ids=["shadow-split", "shadow-packed"])
def test_the_shadow_relay_kicks_the_soft_net_device_inline(net_datapath, impl, guest_layout, packed):
    """In one process the relay calls the device's kick itself (no eventfd): with the C datapath
    every frame crosses guest -> shadow -> device -> shadow -> guest in the relay's thread."""
    guest, drv = net_guest(SoftNetDevice(packed=packed), num=64, shadow=True, guest_layout=guest_layout, impl=impl)
    try:
        svq = guest.shadow.queues[TX].svq
        if net_datapath == "c":
            assert isinstance(svq.device_kick, functools.partial)
            assert svq.device_kick.func == guest.device._c[0].kick
        else:
            assert isinstance(svq.device_kick, EventfdNotifier)
        frames = [build_frame(seq, 60 + (seq * 37) % 1400) for seq in range(150)]
        got = exchange(drv, frames, len(frames))
        assert sorted(s for s in map(parse_frame, got)) == list(range(len(frames)))
        assert guest.shadow.errors() == {}
    finally:
        guest.close()
