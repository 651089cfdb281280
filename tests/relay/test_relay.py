"""The shadow virtqueue between a guest driver and a device, every layout pair (VIRTIO 1.2 2.7/2.8)."""

from __future__ import annotations

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.relay.harness import RelayRig
from vdpa_svq.ring import Layout

PAIRS = [(g, s) for g in Layout for s in Layout]
IMPLS = ["py", "c"]  # every test runs over both, as CPython's test_heapq does (PEP 399)


def run(rig: RelayRig, steps: int) -> None:
    rng = random.Random(rig.seed)
    for _ in range(steps):
        r = rng.random()
        if r < 0.4:
            rig.guest_add()
        elif r < 0.55:
            rig.guest_kick()
        elif r < 0.75:
            rig.device_on_kick(rng.randint(1, 4))
        elif r < 0.9:
            rig.device_complete(rng.randint(1, 4))
        else:
            rig.guest_on_call()
    rig.drain()


def check_dirty_log(rig: RelayRig) -> None:
    logged = set(rig.dirty.dirty_pages())
    ring_pages = {p for a, n in rig.guest_ring_spans for p in range(a // 4096, (a + n - 1) // 4096 + 1)}
    assert rig.device_pages <= logged, f"device wrote pages the log misses: {sorted(rig.device_pages - logged)}"
    stray = logged - rig.device_pages - ring_pages
    assert not stray, f"logged pages nobody wrote: {sorted(stray)}"


@pytest.mark.parametrize("impl", IMPLS)
@settings(max_examples=60, deadline=None)
@given(
    pair=st.sampled_from(PAIRS),
    guest_num=st.sampled_from([1, 2, 4, 8, 64]),
    shadow_num=st.sampled_from([1, 2, 4, 8, 64]),
    event_idx=st.booleans(),
    indirect=st.booleans(),
    seed=st.integers(0, 2**32),
)
def test_every_buffer_crosses_the_relay_once_and_the_dirty_log_is_exact(impl, pair, guest_num, shadow_num, event_idx,
                                                                         indirect, seed):
    """Every chain the guest makes available comes back used once, with what the device wrote, and the
    dirty log holds exactly the guest pages the device wrote plus the guest's ring pages.

    VIRTIO 1.2 2.7.13 / 2.8.21 (supplying buffers) and 2.7.14 / 2.8.22 (receiving used buffers), with the
    relay as the device on the guest's ring and as the driver on the shadow ring; each end looks at its
    ring only when notified, so a notification the relay wrongly suppressed (2.7.7.2 / 2.7.10.1 device and
    driver MUST send a notification when used_event / avail_event was passed, 2.8.10) stalls and fails.
    """
    guest_layout, shadow_layout = pair
    if shadow_layout is Layout.SPLIT and shadow_num & (shadow_num - 1):
        shadow_num = 8
    if indirect is False and shadow_num < 8:
        shadow_num = 8  # a guest chain of up to 8 descriptors must fit a shadow ring without indirect
    rig = RelayRig(guest_layout, shadow_layout, guest_num, shadow_num, event_idx, seed=seed, indirect=indirect,
                   impl=impl)
    try:
        run(rig, 400)
        assert rig.reaped == rig.next_token
        assert rig.svq.stats.forwarded == rig.svq.stats.returned == rig.next_token
        check_dirty_log(rig)
    finally:
        rig.close()


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize(("guest_layout", "shadow_layout"), PAIRS)
@pytest.mark.parametrize("event_idx", [False, True])
def test_long_run_wraps_both_rings_many_times(impl, guest_layout, shadow_layout, event_idx):
    """A hundred laps and more of small rings on both sides of the relay.

    VIRTIO 1.2 2.8.1: the Driver and Device Ring Wrap Counters flip on every lap (packed); 2.7.13.3: idx
    always increments and the ring position is idx modulo the Queue Size (split). Notification suppression
    (2.7.7, 2.7.10, 2.8.10) must suppress some kicks and calls and still let every buffer through.
    """
    rig = RelayRig(guest_layout, shadow_layout, 4, 8, event_idx, seed=7, indirect=True, impl=impl)
    try:
        for _ in range(40):
            run(rig, 250)
        assert rig.reaped == rig.next_token > 100 * rig.guest_num  # a hundred laps or more
        # Suppression must suppress something and still let everything through.
        assert rig.device_kicks > 0 and rig.guest_calls > 0
        check_dirty_log(rig)
    finally:
        rig.close()
