"""The device lifecycle session.py owns mid-life: take-over (passthrough -> shadowed) and hand-back
(shadowed -> stopped) with the one rewind rule, on the soft net device (it can suspend, and its
loopback uses buffers in order, as the rule assumes).

The rule (session.rewound, VIRTIO 1.2 2.7.13-2.7.14 / 2.8.21: a buffer is the driver's again only
once used): a guest ring restarts at its first unused buffer. Buffers the relay took that the device
never used, RX buffers waiting for frames and a chain held for room in the shadow ring, are read
again from there.
"""

from __future__ import annotations

import time

import pytest

from tests.kernel.frames import check_all_arrived
from vdpa_svq.attach import PASSTHROUGH, SHADOW, net_guest
from vdpa_svq.guest.frames import build_frame
from vdpa_svq.ring import Layout, RingState
from vdpa_svq.session import SessionError, rewound
from vdpa_svq.softdev import SoftNetDevice

RX, TX = 0, 1
NUM = 64


class Traffic:
    """Frames with sequence numbers through the loopback; `exchange(n)` returns once n more came back."""

    def __init__(self, drv) -> None:
        self.drv, self.sent, self.got = drv, 0, []

    def exchange(self, n: int, timeout: float = 20.0) -> None:
        want, deadline = self.sent + n, time.monotonic() + timeout
        while len(self.got) < want:
            assert time.monotonic() < deadline, f"{len(self.got)} of {want} frames came back"
            while self.sent < want and self.drv.send(build_frame(self.sent, 60 + self.sent % 700)):
                self.sent += 1
            self.drv.flush()
            self.got.extend(self.drv.reap())
            self.drv.wait(0.01)


def layouts(packed: bool) -> dict[str, object]:
    layout = Layout.PACKED if packed else Layout.SPLIT
    return {"guest_layout": layout, "packed": packed}


def ring_state(used: int) -> RingState:
    """A ring stopped at `used` (< NUM: no wrap yet, the wrap counters keep their initial 1)."""
    return RingState(used, used, 1, 1)


def tx_slots(frames: int, packed: bool) -> int:
    """Where TX stands after `frames`: split counts chains; packed counts descriptor slots (2.8.6),
    and each frame is a header and a frame descriptor."""
    return 2 * frames if packed else frames


@pytest.fixture(params=["py", "c"])
def impl(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.mark.parametrize("packed", [False, True], ids=["split", "packed"])
def test_rewind_rule_restarts_at_the_first_unused_buffer(packed):
    """VIRTIO 1.2 2.7.8 / 2.8.1: the used position, with the used wrap counter (packed)."""
    if packed:
        assert rewound(RingState(5, 3, 0, 1)) == RingState(3, 3, 1, 1)
        assert rewound(RingState(2, 60, 1, 0)) == RingState(60, 60, 0, 0)
    else:
        assert rewound(RingState(0x0005, 0xFFFE)) == RingState(0xFFFE, 0xFFFE)


@pytest.mark.parametrize("packed", [False, True], ids=["split", "packed"])
def test_hand_back_with_buffers_in_flight_restarts_each_ring_at_its_first_unused_buffer(packed, impl):
    """serve's case (assume_in_order): every posted RX buffer went to the shadow ring, 10 came back
    used; the 54 others (and those posted again) restart from the guest ring. TX: all 10 used."""
    dev = SoftNetDevice(packed=packed)
    g, drv = net_guest(dev, num=NUM, shadow=True, impl=impl, **layouts(packed))
    try:
        Traffic(drv).exchange(10)
        rx = g.shadow.queues[RX].svq
        handed = g.shadow.hand_back(assume_in_order=True)
        assert handed.quiesce_error is None and dev.suspended
        assert rx.stats.forwarded - rx.stats.returned >= NUM - 10, "RX buffers in flight, for this test"
        assert handed.states == {RX: ring_state(10), TX: ring_state(tx_slots(10, packed))}
    finally:
        g.close()
        dev.close()


@pytest.mark.parametrize("exact", [False, True], ids=["assume-in-order", "exact"])
def test_hand_back_gives_back_a_chain_held_for_room(exact, impl):
    """A shadow ring smaller than the guest's: 16 RX buffers in the shadow ring, a 17th taken and
    held for room. Both go back to the guest ring; the exact check counts the held one."""
    dev = SoftNetDevice(packed=False, vring_num=16)
    g, drv = net_guest(dev, num=NUM, shadow=True, impl=impl, **layouts(False))
    try:
        Traffic(drv).exchange(5)
        rx = g.shadow.queues[RX].svq
        assert rx.held, "the relay must hold an RX chain for this test"
        handed = g.shadow.hand_back(assume_in_order=not exact)
        assert handed.states[RX] == ring_state(5)
    finally:
        g.close()
        dev.close()


def test_exact_hand_back_refuses_when_the_device_still_holds_a_buffer(monkeypatch):
    """A device that took an RX buffer and has not used it (the loopback never does: made up
    here through VHOST_GET_VRING_BASE): rewinding would hand that buffer to the device again."""
    dev = SoftNetDevice(packed=False)
    g, drv = net_guest(dev, num=NUM, shadow=True, **layouts(False))
    try:
        Traffic(drv).exchange(3)
        real = dev.get_vring_base
        monkeypatch.setattr(dev, "get_vring_base", lambda i: real(i) + (i == RX))
        with pytest.raises(SessionError, match="queue 0: the device still holds buffers"):
            g.shadow.hand_back(assume_in_order=False)
    finally:
        g.close()
        dev.close()


@pytest.mark.parametrize(
    "dev_opts, why",
    [({"packed": True}, "split shadow rings"), ({"packed": False, "suspend": False}, "cannot suspend")],
    ids=["packed", "no-suspend"],
)
def test_exact_hand_back_refuses_before_anything_stops(dev_opts, why):
    dev = SoftNetDevice(**dev_opts)
    g, drv = net_guest(dev, num=NUM, shadow=True, guest_layout=Layout.SPLIT, packed=dev_opts["packed"])
    try:
        t = Traffic(drv)
        t.exchange(3)
        with pytest.raises(SessionError, match=why):
            g.shadow.hand_back(assume_in_order=False)
        t.exchange(3)  # still relaying
        assert g.errors() == {}
    finally:
        g.close()
        dev.close()


def test_hand_back_without_suspend_resets_the_device():
    """A device that cannot suspend is reset: what it used stays used, the rest is read again."""
    dev = SoftNetDevice(packed=False, suspend=False)
    g, drv = net_guest(dev, num=NUM, shadow=True, **layouts(False))
    try:
        Traffic(drv).exchange(7)
        handed = g.shadow.hand_back(assume_in_order=True)
        assert handed.quiesce_error is None and dev.get_status() == 0
        assert handed.states == {RX: ring_state(7), TX: ring_state(7)}
    finally:
        g.close()
        dev.close()


@pytest.mark.parametrize("packed", [False, True], ids=["split", "packed"])
def test_take_over_reads_where_each_ring_stands(packed):
    """Passthrough: the device ran the guest's rings. Split: avail from VHOST_GET_VRING_BASE, used
    from the guest's used ring; packed: both halves from the base."""
    dev = SoftNetDevice(packed=packed)
    g, drv = net_guest(dev, num=NUM, **layouts(packed))
    try:
        assert g.mode == PASSTHROUGH
        Traffic(drv).exchange(9)
        assert g.session.take_over(g.mem) == [ring_state(9), ring_state(tx_slots(9, packed))]
        assert g.session.queues == {} and dev.get_status() & 8, "reset and negotiated again (FEATURES_OK)"
    finally:
        g.close()
        dev.close()


def test_take_over_refuses_buffers_in_flight_in_the_device(monkeypatch):
    dev = SoftNetDevice(packed=False)
    g, drv = net_guest(dev, num=NUM, **layouts(False))
    try:
        Traffic(drv).exchange(4)
        real = dev.get_vring_base
        monkeypatch.setattr(dev, "get_vring_base", lambda i: real(i) + 2 * (i == TX))
        with pytest.raises(SessionError, match="queue 1 has 2 buffers in flight in the device"):
            g.session.take_over(g.mem)
    finally:
        g.close()
        dev.close()


def test_live_switch_both_ways_mid_traffic_loses_and_repeats_nothing(impl):
    """attach's switch on the soft device, as tests/kernel/test_live_switch.py does on vdpa_sim."""
    dev = SoftNetDevice(packed=False)
    g, drv = net_guest(dev, num=NUM, **layouts(False))
    t = Traffic(drv)
    try:
        t.exchange(20)
        g.switch_to_shadow(impl=impl)
        assert g.mode == SHADOW
        t.exchange(20)
        assert g.switch_to_passthrough() == [ring_state(40), ring_state(40)]
        assert g.mode == PASSTHROUGH
        t.exchange(20)
        g.switch_to_shadow(impl=impl)
        t.exchange(20)
        check_all_arrived(t.got, t.sent)
        assert g.errors() == {}
    finally:
        g.close()
        dev.close()
