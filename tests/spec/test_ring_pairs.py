"""Driver <-> device over every layout: delivery, ids, and notification suppression (VIRTIO 1.2, 2.7, 2.8)."""

from __future__ import annotations

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.spec.harness import BLOCK, MAX_SEGS, RingPair, random_ops, run_ops
from vdpa_svq.ring import Layout

split_sizes = st.sampled_from([2**k for k in range(1, 16)]).filter(lambda n: n <= 32768)
packed_sizes = st.one_of(st.integers(1, 40), st.integers(1, 32768))

add_op = st.tuples(
    st.just("add"), st.integers(0, MAX_SEGS), st.integers(0, MAX_SEGS), st.lists(st.integers(1, BLOCK), min_size=1,
    max_size=8), st.booleans()
).filter(lambda t: t[1] + t[2] > 0)
op = st.one_of(
    add_op,
    st.just(("kick",)),
    st.tuples(st.just("pop"), st.integers(1, 5)),
    st.tuples(st.just("complete"), st.integers(0, 16), st.floats(0, 1)),
    st.just(("signal",)),
    st.tuples(st.just("reap"), st.integers(1, 5)),
    st.tuples(st.just("cb"), st.sampled_from(["enable", "disable", "delayed"])),
    st.tuples(st.just("notify"), st.booleans()),
)


def _run(layout: Layout, num: int, event_idx: bool, ops: list[tuple], seed: int = 0) -> RingPair:
    pair = RingPair(layout, num, event_idx, seed=seed)
    try:
        run_ops(pair, ops)
        pair.drain()
    finally:
        pair.close()
    return pair


@settings(max_examples=150, deadline=None)
@given(num=st.sampled_from([1, 2, 4, 8, 16, 256]), event_idx=st.booleans(), ops=st.lists(op, max_size=120))
def test_split_every_buffer_delivered_once_and_notifications_follow_the_rules(num, event_idx, ops):
    """VIRTIO 1.2 2.7.7 / 2.7.10: used_event/avail_event and the NO_INTERRUPT/NO_NOTIFY flags."""
    _run(Layout.SPLIT, num, event_idx, ops)


@settings(max_examples=150, deadline=None)
@given(num=st.one_of(st.integers(1, 9), st.sampled_from([255, 256])), event_idx=st.booleans(),
       ops=st.lists(op, max_size=120))
def test_packed_every_buffer_delivered_once_and_notifications_follow_the_rules(num, event_idx, ops):
    """VIRTIO 1.2 2.8.10 / 2.8.14: event suppression structures with off_wrap and ENABLE/DISABLE/DESC."""
    _run(Layout.PACKED, num, event_idx, ops)


@settings(max_examples=25, deadline=None)
@given(layout=st.sampled_from(Layout), event_idx=st.booleans(), data=st.data())
def test_any_legal_ring_size_works(layout, event_idx, data):
    """VIRTIO 1.2 2.7: a split Queue Size "is always a power of 2", at most 32768; 2.8: a packed one "does
    not have to be a power of 2" (1..32768 here)."""
    num = data.draw(split_sizes if layout is Layout.SPLIT else packed_sizes)
    ops = random_ops(random.Random(num), 60)
    _run(layout, num, event_idx, ops)


@pytest.mark.parametrize("layout", list(Layout))
@pytest.mark.parametrize("event_idx", [False, True])
@pytest.mark.parametrize("num", [1, 2, 4])
def test_thousands_of_wrap_arounds(layout, event_idx, num):
    """Small rings through >65536 buffers: the packed wrap counters flip thousands of times (VIRTIO 1.2 2.8.1)
    and the split le16 idx "wraps naturally at 65536" (2.7.13.3), event indexes with it (2.7.7, 2.7.10)."""
    rng = random.Random(num * 2 + event_idx)
    pair = RingPair(layout, num, event_idx, seed=1)
    try:
        while pair.counters.reaped < 70_000:
            run_ops(pair, random_ops(rng, 200, max_segs=min(num, 2)))
            pair.drain()
        if layout is Layout.PACKED:
            assert pair.used_abs // num > 2000  # laps
    finally:
        pair.close()
    # Notification suppression must actually suppress something, and still notify.
    assert 0 < pair.counters.kicks < pair.counters.kick_checks
    assert 0 < pair.counters.calls < pair.counters.call_checks
