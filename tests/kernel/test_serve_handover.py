"""A serve-to-serve handover on vdpa_sim: a live migration's switchover with a vhost-vdpa device.

The frontend (tests/vhost_user/client.py, in this process) runs sequence-numbered frames through
`vdpa-svq serve` A on the bench's vdpa_sim net device with the dirty log on (LOG_SHMFD, SET_LOG_BASE,
VHOST_F_LOG_ALL), stops A mid-traffic as QEMU does (GET_VRING_BASE of every ring) and hands the same
memory and rings to serve B (SET_VRING_BASE with what A returned). B serves:
- a second vdpa_sim net device, made for this module: the migration case, where the destination's
  serve is up on its own device before the switchover and the device's state cannot move, only what
  GET/SET_VRING_BASE carries;
- the same device, once A exited: serve restarted in place (an upgrade), the device reopened.
vdpa_sim's rings are split; the guest side of serve is split or packed.
"""

from __future__ import annotations

import pytest

from kernel_iface.discovery import by_name, discover
from kernel_iface.vdpa_netlink import VdpaNetlink
from tests.kernel.handover import (
    NUM,
    TOTAL,
    Serve,
    connect,
    driver_position,
    pages,
    resume_on,
    stop_mid_traffic,
    used_entry_pages,
)
from tests.vhost_user.client import VhostUserFrontend
from vdpa_svq.dirty import pages_of
from vdpa_svq.ring import Layout, RingState

pytestmark = pytest.mark.kernel

SECOND = "vdpa-sim-net-b"
LAYOUTS = [pytest.param(Layout.SPLIT, id="split"), pytest.param(Layout.PACKED, id="packed")]


@pytest.fixture(scope="module")
def second_sim_net(kernel_bench):
    """A second vdpa_sim net device (its own /dev/vhost-vdpa-N), deleted afterwards."""
    with VdpaNetlink() as nl:
        nl.add_device("vdpasim_net", SECOND, mac="52:54:00:12:34:77")
        try:
            yield by_name(discover())[SECOND].dev_path
        finally:
            nl.del_device(SECOND)


@pytest.fixture
def spawn():
    """Serve(...), and every serve a test started is gone after it, pass or fail."""
    started: list[Serve] = []

    def start(device: str, path: str) -> Serve:
        started.append(Serve(device, path))
        return started[-1]

    yield start
    for serve in started:
        serve.kill()


@pytest.fixture(params=["second-device", "same-device"])
def target(request, vdpa_sim_net):
    """Where B serves: None for the same device as A (B starts only once A exited)."""
    if request.param == "same-device":
        return None
    return request.getfixturevalue("second_sim_net")


@pytest.mark.parametrize("layout", LAYOUTS)
def test_handover_mid_traffic_loses_and_repeats_nothing(vdpa_sim_net, target, layout, tmp_path, spawn):
    """Frames looped through A, more sent (some kicked, some only made available) and A stopped
    without waiting for them, then the rest through B: every frame arrives exactly once and intact,
    every TX buffer is returned. A's ring states are where the driver stands once it took back what
    A finished, both wrap counters included for packed (VIRTIO 1.2 2.8.1: the device restarts at the
    used position; 2.7.13-2.7.14 / 2.8.21: a buffer not used yet is still the driver's, available,
    and B takes it again from the guest's ring). The dirty log has every page the device wrote -- the
    RX buffers the frontend got back and the used-entry pages of both rings -- by the time A answered
    the last GET_VRING_BASE, and no TX buffer page (the device only reads those)."""
    a = spawn(vdpa_sim_net, str(tmp_path / "a.sock"))
    b = spawn(target, str(tmp_path / "b.sock")) if target else None
    fe = VhostUserFrontend(connect(a.path), layout, log_all=True, num=NUM)
    a_sock = fe.sock
    try:
        t, bases = stop_mid_traffic(fe)
        assert fe.log_mm is not None
        logged = set(pages_of(bytes(fe.log_mm)))
        states = [RingState.from_vring_base(layout, base) for base in bases]
        assert states == [driver_position(fe, i) for i in range(2)], f"A returned {bases}"
        if layout is Layout.PACKED:
            assert states[0].used_wrap == 0, "RX should stop one lap in: the wrap counters are not exercised"
        wanted = pages(t.drv.rx_spans) | used_entry_pages(fe, 0) | used_entry_pages(fe, 1)
        assert wanted <= logged, f"pages the device wrote, missing from the log: {sorted(wanted - logged)[:10]}"
        tx_pool = fe.plan.pools[1]
        assert not logged & pages([(tx_pool.gpa, tx_pool.size)]), "TX buffer pages logged"
        through_a = len(t.seqs)

        if b is None:  # the same device: A lets go of it first
            a_sock.close()
            a.stop()
            b = spawn(vdpa_sim_net, str(tmp_path / "b.sock"))
        resume_on(fe, connect(b.path), bases)
        t.run_until(TOTAL)
        t.check_exactly_once()
    finally:
        fe.close()
        a_sock.close()
        summaries_a = a.stop()
        summaries_b = b.stop() if b else []
    print(f"\n{layout.value} -> {'second device' if target else 'same device'}: A returned "
          f"{[hex(x) for x in bases]}, {through_a} frames back through A, {TOTAL - through_a} through B, "
          f"{len(logged)} pages logged")
    (sa,), (sb,) = summaries_a, summaries_b
    assert sa["error"] is None and sa["started"] == 1, sa
    assert sb["error"] is None and sb["started"] == 1, sb
    assert sa["guest_layout"] == sb["guest_layout"] == layout.value
    assert sa["shadow_layout"] == sb["shadow_layout"] == "split"
    assert sa["log_syncs"] >= 1


def refused_then_resumed(a_dev, b_dev, tmp_path, spawn, layout, make_wrong) -> tuple[list[int], dict, dict]:
    """Stop A mid-traffic, hand B the wrong state make_wrong(bases) (it must refuse and close),
    then the right one on a new connection: every frame must still arrive exactly once.
    (wrong states, B's summary of the refused connection, of the served one)."""
    a = spawn(a_dev, str(tmp_path / "a.sock"))
    b = spawn(b_dev, str(tmp_path / "b.sock"))
    fe = VhostUserFrontend(connect(a.path), layout, num=NUM)
    socks = [fe.sock]
    try:
        t, bases = stop_mid_traffic(fe)
        wrong = make_wrong(bases)
        socks.append(connect(b.path))
        with pytest.raises(ConnectionError):
            resume_on(fe, socks[-1], wrong)
        socks.append(connect(b.path))
        resume_on(fe, socks[-1], bases)
        t.run_until(TOTAL)
        t.check_exactly_once()
    finally:
        fe.close()
        for s in socks:
            s.close()
        a.stop()
        summaries = b.stop()
    assert len(summaries) == 2, summaries
    refused, served = summaries
    assert refused["started"] == 0
    assert served["error"] is None and served["started"] == 1, served
    return wrong, refused, served


@pytest.mark.parametrize("off", [-1, 1], ids=["behind", "ahead"])
def test_a_split_base_off_by_one_is_refused(vdpa_sim_net, second_sim_net, off, tmp_path, spawn):
    """A frontend that hands B the TX ring one entry behind or ahead of where A stopped. A split
    ring restarts at its used index (VIRTIO 1.2 2.7.8: idx is where the driver takes the next used
    entry): behind, B would write over a used entry the driver already took; ahead, it would skip a
    buffer nobody ever returns. B refuses at the start with the reason and closes the connection
    (no hang, no guess); the same frontend then hands over with A's state, and every frame still
    arrives exactly once."""
    wrong, refused, _ = refused_then_resumed(vdpa_sim_net, second_sim_net, tmp_path, spawn, Layout.SPLIT,
                                             lambda bases: [bases[0], (bases[1] + off) & 0xFFFF])
    # wrong[1] - off is A's state for the TX ring: its used index
    want = f"queue 1: SET_VRING_BASE {wrong[1]}, but the ring's used index is {(wrong[1] - off) & 0xFFFF}"
    assert want in (refused["error"] or ""), refused


def test_a_packed_base_past_the_ring_is_refused(vdpa_sim_net, second_sim_net, tmp_path, spawn):
    """A packed SET_VRING_BASE whose avail index is past the ring (VIRTIO 1.2 2.8.1: ring positions
    are below the queue size): B refuses with the reason and closes the connection; the right
    state then hands over with nothing lost."""
    _, refused, _ = refused_then_resumed(vdpa_sim_net, second_sim_net, tmp_path, spawn, Layout.PACKED,
                                         lambda bases: [bases[0], bases[1] & ~0x7FFF | NUM + 3])
    assert f"packed ring state out of range for size {NUM}" in (refused["error"] or ""), refused
