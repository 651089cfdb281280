"""bench.latency's two frontends: the C loop (measure_c, the default) against `vdpa-svq serve soft:net`, and
the Python loop (measure) beside it. Both count by the same rules: a frame is "sent" when made available in
the counted window, "returned" when it is seen used in RX, "full" when the TX ring had no room, and a kick
is an eventfd write the ring's notification suppression asked for (VIRTIO 1.2 2.7.10, 2.8.10)."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from bench import latency
from bench.latency import Cell, measure, measure_c, open_frontend
from bench.vhost_user import CpuMeter, backend, stop
from vdpa_svq.guest.burst import BurstLoop
from vdpa_svq.guest.frames import build_frame
from vdpa_svq.guest.net import RX_BUFFER, NetDriver
from vdpa_svq.guest.notify import new_eventfd
from vdpa_svq.guest.plan import plan_layout
from vdpa_svq.memory import GuestMemory
from vdpa_svq.ring import Layout

DEADLINE = 60.0  # a bound on runs that end by themselves once their frames are back (a hang fails)


@pytest.fixture(scope="module")
def frames() -> list[bytes]:
    return [build_frame(k, latency.FRAME) for k in range(latency.SEQS)]


@pytest.fixture
def serve(tmp_path) -> Iterator[str]:
    sock = str(tmp_path / "serve.sock")
    proc = backend("serve", "soft:net", sock, f"test-{os.getpid()}")
    yield sock
    stop(proc)


@pytest.mark.parametrize("layout", list(Layout), ids=lambda layout: layout.value)
def test_the_c_frontend_gets_every_frame_back_from_serve_whole_and_in_order(serve, frames, layout):
    """20000 frames through serve's relay and soft:net, in bursts of 32 on the bench's rings (EVENT_IDX, as
    the bench negotiates): each back, checked byte for byte by the loop, in the order sent."""
    fe, drv = open_frontend(serve, layout)
    try:
        with BurstLoop.for_net_driver(drv, fe.kick_fds, b"".join(frames), latency.FRAME, 1e6, 32,
                                      limit=20000) as loop:
            loop.run(DEADLINE, counting=True)
            counts, rtts = loop.counts(), loop.rtts()
    finally:
        fe.close()
    assert (counts.sent, counts.returned, counts.outstanding, counts.reordered) == (20000, 20000, 0, 0)
    assert len(rtts) == 20000 and min(rtts) > 0


class Silent:
    """The bench's driver on rings no device serves: what each frontend makes available and kicks is then
    fixed by the ring alone (no timing): `num` / 2 frames (header and frame, two descriptors each), then
    a full ring."""

    def __init__(self, layout: Layout, event_idx: bool) -> None:
        self.num = 8
        plan = plan_layout(layout, self.num, 2, RX_BUFFER, self.num)
        self.mem = GuestMemory.create(plan.size)
        rings = [plan.driver_ring(i, self.mem, layout, event_idx=event_idx, indirect=True, name=f"vq{i}")
                 for i in range(2)]
        self.kick_fds = [new_eventfd(), new_eventfd()]
        self.drv = NetDriver(self.mem, rings[0], rings[1], plan.pools[0], plan.pools[1],
                             lambda i: os.eventfd_write(self.kick_fds[i], 1))
        self.drv.fill_rx()

    def close(self) -> None:
        for ring in (self.drv.rx, self.drv.tx):
            ring.close()
        self.mem.close()
        for fd in self.kick_fds:
            os.close(fd)


@pytest.mark.parametrize("event_idx", [False, True], ids=["flags", "event_idx"])
@pytest.mark.parametrize("layout", list(Layout), ids=lambda layout: layout.value)
def test_python_and_c_frontends_count_alike(monkeypatch, frames, layout, event_idx):
    """With nothing returned, both send exactly the frames the ring holds (4 chains of two descriptors in a ring of
    8, 2.7.5 / 2.8.6), get none back and count the rest as "full"; they kick as the untouched suppression
    areas say: split with EVENT_IDX once (avail_event 0 is passed by the first frame, 2.7.10), every tick
    otherwise (used flags 0; packed flags ENABLE, 2.8.10)."""
    monkeypatch.setattr(latency, "WARMUP", 0.0)  # count from the first frame
    monkeypatch.setattr(latency, "DRAIN", 0.0)
    cells = {}
    for frontend in ("py", "c"):
        ring = Silent(layout, event_idx)
        cell = Cell()
        try:
            if frontend == "py":
                measure(ring.drv, frames, 20000, 1, 0.05, CpuMeter(None), cell)
            else:
                measure_c(ring.drv, ring.kick_fds, b"".join(frames), 20000, 1, 0.05, CpuMeter(None), cell)
        finally:
            ring.close()
        cells[frontend] = cell
    kicks = 1 if layout is Layout.SPLIT and event_idx else 4
    for frontend, cell in cells.items():
        assert (cell.sent, cell.returned, cell.kicks) == (4, 0, kicks), frontend
        assert cell.full > 0, frontend  # ticks came after the ring filled (0.05 s at 20k pps: ~1000)


def test_python_and_c_frontends_both_get_every_frame_back_from_serve(serve, frames, monkeypatch):
    """The same short measurement with each frontend, one after the other on one serve: every frame sent
    in the counted window comes back, and each has its round trip."""
    monkeypatch.setattr(latency, "WARMUP", 0.05)
    for frontend in ("py", "c"):
        fe, drv = open_frontend(serve, Layout.SPLIT)
        cell = Cell()
        try:
            if frontend == "py":
                measure(drv, frames, 2000, 1, 0.2, CpuMeter(None), cell)
            else:
                measure_c(drv, fe.kick_fds, b"".join(frames), 2000, 1, 0.2, CpuMeter(None), cell)
        finally:
            fe.close()
        assert cell.sent > 0 and cell.returned == cell.sent == len(cell.rtts), frontend
        assert min(cell.rtts) > 0, frontend
