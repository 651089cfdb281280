"""The C relay from several threads at once: its pump relays without the GIL (vdpa_svq/_pump.c),
so every Python call of the relay from another thread (stats, ring_state, error, close, a relay
call of its own) races a pump that is working on the same rings. The relay's lock orders them
(_relay.c, "Who touches a relay"); these tests make the races happen and check what the spec
asks of a device: every buffer comes back once, with what the device wrote (VIRTIO 1.2 2.7.8,
2.7.14: a used element per chain, in the order the device used them), and the dirty log holds
every page written (vhost's log: every write the device made, before the used index says so).

ASan (make asan) runs these too: a pump reading a closed relay's memory is a use-after-free there.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from collections.abc import Iterator

import pytest

from tests.relay.harness import RelayRig
from tests.relay.test_relay import check_dirty_log
from vdpa_svq.loop import RelayLoop, RelayLoops, default_relay_threads
from vdpa_svq.ring import Layout

BOUND_S = 60  # a bound on a run that must finish, so a lost buffer fails instead of hanging


def eventfd() -> int:
    return os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)


class Hammer:
    """A thread calling the relay's Python methods without a pause, until stopped: the reads,
    and relay calls of its own (as a device in this process does, or start() before the pump)."""

    def __init__(self, svq) -> None:
        self.svq, self.calls, self.error = svq, 0, None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                self.svq.on_guest_kick()
                self.svq.on_device_call()
                if self.calls % 8 == 0:  # the reads cost more: fewer of them, to keep the calls dense
                    st = self.svq.stats
                    state = self.svq.ring_state()
                    assert st.returned <= st.forwarded
                    assert 0 <= state["shadow"]["in_flight"] <= self.svq.shadow.num
                    assert self.svq.error is None
                self.calls += 1
        except BaseException as e:  # reported by stop()
            self.error = e

    def stop(self) -> int:
        self._stop.set()
        self._thread.join()
        if self.error is not None:
            raise self.error
        return self.calls


def relay_everything(rig: RelayRig, kick: int, total: int) -> None:
    """The guest adds `total` chains (kicking through the pump's eventfd); the device, in this
    thread, takes and completes them and calls the relay itself (on_device_call, from Python),
    while the pump relays the same rings in its own thread."""
    added, deadline = 0, time.monotonic() + BOUND_S
    while rig.reaped < total:
        assert time.monotonic() < deadline, f"{total - rig.reaped} buffers never came back: {rig.svq.stats}"
        while added < total and rig.guest_add():
            added += 1
        os.eventfd_write(kick, 1)  # unconditionally: the pump reads it and drains the guest ring
        rig.device_kicked = True  # the device looks by itself too (it may poll, as a vDPA device can)
        rig.device_on_kick(rig.shadow_num)
        rig.device_complete(len(rig.at_device))
        rig.svq.on_device_call()  # a relay call from this thread, racing the pump's
        rig.guest_called = True
        rig.guest_on_call()


@pytest.mark.parametrize("poll_us", [0, 50, "auto"])
@pytest.mark.parametrize("layouts", [(Layout.SPLIT, Layout.SPLIT), (Layout.PACKED, Layout.SPLIT),
                                     (Layout.SPLIT, Layout.PACKED)])
def test_python_calls_race_a_relaying_pump(poll_us, layouts):
    """Stats and ring_state from one thread, relay calls from another (the device's), the pump in
    a third: every chain comes back exactly once with the bytes the device wrote (the guest
    checks each), and the dirty log has every page the device wrote."""
    rig = RelayRig(*layouts, 64, 64, event_idx=True, impl="c", seed=15)
    kick = eventfd()
    loop = RelayLoop(poll_us=poll_us)
    loop.add_relay(kick, rig.svq, "kick")
    loop.start()
    hammer = Hammer(rig.svq)
    try:
        relay_everything(rig, kick, 3000)
        assert hammer.stop() > 0
        assert not rig.by_token and rig.svq.stats.returned == 3000
        assert loop.error is None and rig.svq.error is None
        check_dirty_log(rig)
    finally:
        hammer.stop() if hammer._thread.is_alive() else None
        loop.close()
        os.close(kick)
        rig.close()


def test_close_while_the_pump_polls():
    """close() from Python while the pump spins over the relay: the pump waits for the close to
    finish and then skips the closed relay (no read of released memory: ASan checks), and the loop
    goes on."""
    rig = RelayRig(Layout.SPLIT, Layout.SPLIT, 64, 64, event_idx=True, impl="c", seed=3)
    kick = eventfd()
    loop = RelayLoop(poll_us=1_000_000)  # a long phase: the pump is polling when close() comes
    loop.add_relay(kick, rig.svq, "kick")
    loop.start()
    try:
        rig.guest_add()
        os.eventfd_write(kick, 1)
        deadline = time.monotonic() + BOUND_S
        while loop.stats["poll_rounds"] == 0:
            assert time.monotonic() < deadline
            rig.guest_add()
            time.sleep(0.001)
        rig.svq.close()
        rig.guest_add()  # work the poller would take, were the relay not closed
        time.sleep(0.05)
        assert loop.running and loop.error is None
    finally:
        loop.close()
        os.close(kick)
        rig.close()


@contextlib.contextmanager
def c_rigs(n: int, size: int) -> Iterator[tuple[list[RelayRig], list[int]]]:
    """n C relays (split to split, `size` entries, seeds 1..n), each with a kick eventfd."""
    rigs = [RelayRig(Layout.SPLIT, Layout.SPLIT, size, size, event_idx=True, impl="c", seed=s) for s in range(1, n + 1)]
    kicks = [eventfd() for _ in rigs]
    try:
        yield rigs, kicks
    finally:
        for kick in kicks:
            os.close(kick)
        for rig in rigs:
            rig.close()


def test_two_pairs_relay_in_two_threads():
    """RelayLoops: each pair's relays in a thread of its own, named after the pair; both relay at
    once, every chain of each comes back once, the stats are summed over the threads."""
    with c_rigs(2, 64) as (rigs, kicks):
        loops = RelayLoops(poll_us="auto", threads=2)
        for pair, (rig, kick) in enumerate(zip(rigs, kicks, strict=True)):
            loops.add_relay(kick, rig.svq, "kick", pair=pair)
        loops.start()
        try:
            assert len(loops.loops) == 2 and loops.running
            names = {t.name for t in threading.enumerate()}
            assert {"vdpa-svq-relay0", "vdpa-svq-relay1"} <= names
            workers = [threading.Thread(target=relay_everything, args=(rig, kick, 1500))
                       for rig, kick in zip(rigs, kicks, strict=True)]
            for w in workers:
                w.start()
            for w in workers:
                w.join()
            for rig in rigs:
                assert not rig.by_token and rig.svq.stats.returned == 1500 and rig.svq.error is None
                check_dirty_log(rig)
            per_loop = [loop.stats["wakeups"] for loop in loops.loops.values()]
            assert all(per_loop) and loops.stats["wakeups"] == sum(per_loop)
            assert loops.error is None
        finally:
            loops.close()


def test_a_relay_keeps_the_thread_it_joined():
    """A relay's later fd (a new kick fd, as SET_VRING_KICK brings one) goes to the thread it
    joined first, whatever pair is named: a relay is never in two pumps."""
    rig = RelayRig(Layout.SPLIT, Layout.SPLIT, 8, 8, event_idx=True, impl="c")
    a, b = eventfd(), eventfd()
    loops = RelayLoops(threads=2)
    try:
        loops.add_relay(a, rig.svq, "kick", pair=1)
        loops.add_relay(b, rig.svq, "call", pair=0)
        assert list(loops.loops) == [1]
    finally:
        loops.close()
        os.close(a)
        os.close(b)
        rig.close()


def test_pairs_pin_to_the_cpus_in_order():
    """cpus=[c0, c1]: pair 0's thread on c0, pair 1's on c1, a third pair round the list on c0."""
    cpus = (sorted(os.sched_getaffinity(0)) * 2)[:2]  # two CPUs where there are (one, twice, else)
    rigs = [RelayRig(Layout.SPLIT, Layout.SPLIT, 8, 8, event_idx=True, impl="c", seed=s) for s in range(3)]
    kicks = [eventfd() for _ in rigs]
    probes = [eventfd() for _ in rigs]
    loops = RelayLoops(cpus=cpus)
    seen: dict[int, set[int]] = {}
    try:
        for pair, (rig, kick, probe) in enumerate(zip(rigs, kicks, probes, strict=True)):
            loops.add_relay(kick, rig.svq, "kick", pair=pair)
            loops.add(probe, lambda p=pair: seen.setdefault(p, os.sched_getaffinity(0)), pair=pair)
        loops.start()
        for probe in probes:
            os.eventfd_write(probe, 1)
        deadline = time.monotonic() + BOUND_S
        while len(seen) < 3:
            assert time.monotonic() < deadline, seen
            time.sleep(0.01)
        assert seen == {0: {cpus[0]}, 1: {cpus[1]}, 2: {cpus[0]}}
    finally:
        loops.close()
        for fd in kicks + probes:
            os.close(fd)
        for rig in rigs:
            rig.close()


def test_the_default_thread_count_leaves_the_peers_half_the_cpus(monkeypatch):
    """default_relay_threads: one per CPU given; else half the CPUs the process may use, at least
    one. Pairs share threads round-robin: with one thread, both pairs' relays are in it."""
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(8)))
    assert default_relay_threads() == 4
    assert default_relay_threads([3, 5]) == 2
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0})
    assert default_relay_threads() == 1
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1})
    with c_rigs(2, 8) as (rigs, kicks):
        loops = RelayLoops()
        try:
            for pair, (rig, kick) in enumerate(zip(rigs, kicks, strict=True)):
                loops.add_relay(kick, rig.svq, "kick", pair=pair)
            assert loops.threads == 1 and list(loops.loops) == [0]
        finally:
            loops.close()
    with pytest.raises(ValueError, match="at least one relay thread"):
        RelayLoops(threads=0)
