"""The relay loop in C (vdpa_svq._relay.Pump, through RelayLoop): dispatch, polling, failure.

Whole runs through the pump, with traffic checked frame by frame, are in tests/cli/test_attach.py
(soft:net, every layout pair, with and without polling) and tests/vhost_user (serve).
"""

from __future__ import annotations

import os
import threading
import time

import pytest

from tests.relay.harness import RelayRig
from vdpa_svq import _relay
from vdpa_svq.dirty import DirtyBitmap
from vdpa_svq.errors import GuestRingError
from vdpa_svq.loop import EventfdNotifier, RelayLoop
from vdpa_svq.ring import Layout


def eventfd() -> int:
    return os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)


def wait_for(cond, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.005)


@pytest.fixture
def rig():
    r = RelayRig(Layout.SPLIT, Layout.SPLIT, 8, 8, event_idx=True, impl="c")
    yield r
    r.close()


def test_a_stopped_loop_returns_even_if_stopped_before_it_ran():
    loop = RelayLoop()
    loop._pump.stop()
    t = threading.Thread(target=loop._pump.run)
    t.start()
    t.join(5)
    assert not t.is_alive()
    loop.close()


def test_callable_sources_run_in_the_pump():
    loop, fd, seen = RelayLoop(), eventfd(), []
    loop.add(fd, lambda: seen.append(1))
    loop.start()
    try:
        for n in range(1, 4):
            os.eventfd_write(fd, 1)
            wait_for(lambda n=n: len(seen) == n)
    finally:
        loop.close()
        os.close(fd)
    assert loop.error is None and loop.wakeups == 3


def test_a_broken_guest_ring_stops_its_queue_and_not_the_loop(rig):
    kick, other, seen = eventfd(), eventfd(), []
    loop = RelayLoop()
    loop.add_relay(kick, rig.svq, "kick")
    loop.add(other, lambda: seen.append(1))
    loop.start()
    try:
        rig.guest_add()
        rig.guest_mem.write(rig.g_addrs.driver + 2, (1000).to_bytes(2, "little"))  # avail idx jumps
        os.eventfd_write(kick, 1)
        wait_for(lambda: rig.svq.error is not None)
        assert isinstance(rig.svq.error, GuestRingError) and "avail idx" in str(rig.svq.error)
        os.eventfd_write(other, 1)
        wait_for(lambda: seen)
        assert loop.running and loop.error is None
    finally:
        loop.close()
        os.close(kick)
        os.close(other)


def test_a_failing_notifier_ends_the_loop_with_its_reason():
    r = RelayRig(Layout.PACKED, Layout.PACKED, 8, 8, event_idx=False, impl="c")
    read_end, write_end = os.pipe()
    r._device_kick = EventfdNotifier(read_end)  # the C relay writes this fd itself: EBADF
    r.svq.close()
    r.svq = r.make_svq(r.iova)
    kick = eventfd()
    loop = RelayLoop()
    loop.add_relay(kick, r.svq, "kick")
    loop.start()
    try:
        r.guest_add()
        os.eventfd_write(kick, 1)
        wait_for(lambda: not loop.running)
        assert isinstance(loop.error, OSError) and loop.error.errno == 9  # EBADF
    finally:
        loop.close()
        for fd in (kick, read_end, write_end):
            os.close(fd)
        r.close()


def test_polling_relays_without_notifications():
    """With poll_us, chains the guest adds while the pump polls reach the shadow ring with no kick."""
    rig = RelayRig(Layout.PACKED, Layout.SPLIT, 64, 64, event_idx=True, impl="c")  # room for every chain
    kick = eventfd()
    loop = RelayLoop(poll_us=2_000_000)  # polls for 2 s after the first kick
    loop.add_relay(kick, rig.svq, "kick")
    loop.start()
    try:
        rig.guest_add()
        os.eventfd_write(kick, 1)
        wait_for(lambda: rig.svq.stats.forwarded == 1)
        wait_for(lambda: loop.stats["poll_phases"] == 1)
        added = 1 + sum(rig.guest_add() for _ in range(5))  # no kick written for these
        wait_for(lambda: rig.svq.stats.forwarded == added)
        assert loop.stats["wakeups"] == 1 and loop.stats["poll_rounds"] >= 1
        assert not rig.drv.kick_needed(), "the pump polls: the guest's notifications stay off"
    finally:
        loop.close()
        os.close(kick)
        rig.close()


def test_polling_needs_the_c_relay_and_a_sane_time():
    with pytest.raises(ValueError, match="poll_us must be >= 0"):
        RelayLoop(poll_us=-1)


def test_harvest_returns_the_bits_and_clears_them():
    for size in (1, 7, 8, 9, 4096 * 8 * 3 + 5):  # unaligned heads and tails go byte by byte
        bm = DirtyBitmap(size * 4096)
        for page in {0, bm.pages // 2, bm.pages - 1}:
            bm.mark(page * 4096, 1)
        before = bytes(bm.bits)
        assert _relay.harvest(memoryview(bm.bits)[1:]) == before[1:]
        assert bm.bits[1:] == bytes(len(bm.bits) - 1) and bm.bits[:1] == before[:1]


def test_marks_racing_a_harvest_are_never_lost():
    """The C relay marks with atomic ORs while the log is harvested: every bit lands in some round."""
    rigs = RelayRig(Layout.SPLIT, Layout.SPLIT, 64, 64, event_idx=True, impl="c")
    try:
        stop = threading.Event()
        rounds: list[bytes] = []

        def harvester() -> None:
            while not stop.is_set():
                rounds.append(rigs.dirty.harvest())

        t = threading.Thread(target=harvester)
        t.start()
        for _ in range(30):
            for _ in range(40):
                rigs.guest_add()
            rigs.drain()
        stop.set()
        t.join()
        rounds.append(rigs.dirty.harvest())
        union = {i * 8 + b for r in rounds for i, byte in enumerate(r) if byte for b in range(8) if byte >> b & 1}
        assert rigs.device_pages <= union
    finally:
        rigs.close()


# -- adaptive polling (--poll-us auto) -------------------------------------------------------------
CAP = 2_000_000  # ns


@pytest.mark.parametrize("window, gap, expected", [
    (0, 100, 10_000),                 # a wake-up soon after the last burst: start polling
    (10_000, 100, 20_000),            # and again: double
    (1_500_000, 100, CAP),            # never past the cap
    (CAP, CAP - 1, CAP),
    (CAP, CAP, CAP // 2),             # a wake-up after a whole cap of idle: the spin was waste, halve
    (15_000, 10**10, 0),              # below the first step: stop polling altogether
    (0, 10**10, 0),
])
def test_the_adaptive_window_rule(window, gap, expected):
    assert _relay.adapt_window(window, gap, CAP) == expected


def test_an_adaptive_loop_learns_a_window_then_sleeps_when_idle():
    rig = RelayRig(Layout.SPLIT, Layout.SPLIT, 256, 256, event_idx=True, impl="c")
    kick = eventfd()
    loop = RelayLoop(poll_us="auto")
    loop.add_relay(kick, rig.svq, "kick")
    loop.start()
    try:
        for _ in range(20):  # bursts 0.5 ms apart: well inside the cap
            rig.guest_add()
            os.eventfd_write(kick, 1)
            time.sleep(0.0005)
        wait_for(lambda: loop.stats["window_grows"] >= 2)
        assert loop.stats["poll_window_ns"] >= 20_000 and loop.stats["poll_rounds"] > 0, loop.stats
        time.sleep(0.1)  # idle for longer than the cap: the next burst shrinks the window
        cpu = time.process_time()
        time.sleep(0.5)
        assert time.process_time() - cpu < 0.1, "an idle adaptive loop must sleep, not spin"
        shrinks = loop.stats["window_shrinks"]
        rig.guest_add()
        os.eventfd_write(kick, 1)
        wait_for(lambda: loop.stats["window_shrinks"] == shrinks + 1)
    finally:
        loop.close()
        os.close(kick)
        rig.close()


def test_poll_settings_are_checked():
    with pytest.raises(ValueError, match="poll_us must be >= 0 or 'auto', not 'fast'"):
        RelayLoop(poll_us="fast")
