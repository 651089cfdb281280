"""vdpa_svq.guest's queue, notifiers and chain records: the driver side every in-process test builds on."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator

import pytest

from vdpa_svq.guest.chains import SentChain
from vdpa_svq.guest.notify import consume, wait_notified
from vdpa_svq.guest.queue import GuestQueue
from vdpa_svq.memory import GuestMemory
from vdpa_svq.ring import DeviceRing, Layout, device_ring, driver_ring, place_ring

NUM = 8
DATA = 0x10000


@pytest.fixture(params=list(Layout), ids=lambda layout: layout.value)
def queue(request) -> Iterator[tuple[GuestQueue, DeviceRing, GuestMemory]]:
    """A guest queue and the device's view of the same ring, no notification suppression features."""
    mem = GuestMemory.create(DATA + 0x1000)
    addrs, _ = place_ring(request.param, NUM, 0x1000)
    drv = driver_ring(request.param, mem, NUM, addrs, event_idx=False)
    dev = device_ring(request.param, mem, NUM, addrs, event_idx=False)
    q = GuestQueue.open(0, drv)
    yield q, dev, mem
    q.close()
    dev.close()
    mem.close()


def test_kick_only_when_the_device_wants_one(queue):
    """VIRTIO 1.2 2.7.10 / 2.8.10: no kick while the device disabled notifications, one once it enabled them."""
    q, dev, _ = queue
    dev.disable_notify()
    q.ring.add([], [(DATA, 16)], 1)
    assert not q.kick() and q.kicks == 0
    assert not consume(q.kick_fd)
    dev.enable_notify()
    q.ring.add([], [(DATA + 16, 16)], 2)
    assert q.kick() and q.kicks == 1
    assert consume(q.kick_fd)


def test_buffers_used_before_calls_were_enabled_are_reaped_without_a_call(queue):
    """VIRTIO 1.2 2.7.14 / 2.8.22: the device sends no call for buffers used while calls were
    off; the driver must re-check after enabling them, not sleep out its timeout."""
    q, dev, _ = queue
    q.ring.disable_cb()
    q.ring.add([], [(DATA, 16)], "token")
    dev.push_used(dev.pop(), 5)  # and no write to call_fd
    start = time.monotonic()
    assert q.reap(1, timeout=5.0) == [("token", 5)]
    assert time.monotonic() - start < 1.0
    assert q.calls == 0


def test_reap_waits_for_the_call_and_gives_up_after_the_timeout(queue):
    q, dev, _ = queue
    q.ring.add([], [(DATA, 16)], "a")
    assert q.reap(1, timeout=0.05) is None  # nothing used yet
    dev.push_used(dev.pop(), 3)
    os.eventfd_write(q.call_fd, 1)
    assert q.reap(1, timeout=5.0) == [("a", 3)]
    assert q.reap_ready() == []


def test_wait_call_consumes_the_call(queue):
    q, _, _ = queue
    assert not q.wait_call(0.01)
    os.eventfd_write(q.call_fd, 1)
    assert q.wait_call(1.0) and q.calls == 1
    assert not q.wait_call(0.01)


def test_wait_notified_returns_only_the_fds_that_fired():
    a, b = (os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC) for _ in range(2))
    try:
        assert wait_notified([a, b], 0.01) == []
        os.eventfd_write(b, 1)
        assert wait_notified([a, b], 1.0) == [b]
        assert not consume(b)  # already consumed
    finally:
        os.close(a)
        os.close(b)


def test_a_sent_chain_writes_its_bytes_and_reads_back_what_the_device_wrote():
    mem = GuestMemory.create(0x2000)
    try:
        chain = SentChain(0, [(0x100, 3), (0x200, 2)], [(0x300, 4), (0x400, 4)], [b"abc", b"de"])
        chain.write_out(mem)
        assert mem.read(0x100, 3) == b"abc" and mem.read(0x200, 2) == b"de"
        mem.write(0x300, b"1234")
        mem.write(0x400, b"5678")
        assert chain.written_back(mem, 6) == b"123456"  # the used length cuts across segments
    finally:
        mem.close()
