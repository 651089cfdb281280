"""The relay loops (the C Pump and the Python loop) when a relay's fd stops being a working eventfd:
the relay stops with the reason, the loop goes on serving its other sources, and does not spin on
the dead fd (issue 12, case 5: EPOLLHUP with read() == 0 once took a core at 100%)."""

from __future__ import annotations

import os
import socket
import time

import pytest

from tests.relay.harness import RelayRig
from vdpa_svq import loop as loop_module
from vdpa_svq.errors import DeviceRingError, GuestRingError
from vdpa_svq.loop import RelayLoop
from vdpa_svq.ring import Layout

from .test_pump import eventfd, wait_for


def hung_up_socket() -> int:
    a, b = socket.socketpair()
    b.close()
    return a.detach()


@pytest.fixture(params=["c", "py"])
def loop_impl(request, monkeypatch):
    """A RelayLoop with the C Pump, or with the Python loop (what runs when the C relay is not built)."""
    if request.param == "py":
        monkeypatch.setattr(loop_module, "Pump", None)
    return request.param


@pytest.mark.parametrize("which, error, reason", [
    ("kick", GuestRingError, "the guest's kick fd hung up or is not an eventfd"),
    ("call", DeviceRingError, "the device's call fd hung up or is not an eventfd"),
])
def test_a_hung_up_fd_stops_its_relay_and_not_the_loop(loop_impl, which, error, reason):
    rig = RelayRig(Layout.PACKED, Layout.SPLIT, 8, 8, event_idx=True, impl=loop_impl)
    dead, other, seen = hung_up_socket(), eventfd(), []
    loop = RelayLoop()
    loop.add_relay(dead, rig.svq, which)
    loop.add(other, lambda: seen.append(1))
    cpu = time.process_time()
    loop.start()
    try:
        wait_for(lambda: rig.svq.error is not None)
        assert isinstance(rig.svq.error, error) and reason in str(rig.svq.error)
        time.sleep(0.5)  # long enough for a loop that spins on the dead fd to burn most of it
        assert time.process_time() - cpu < 0.25, "the loop spins on the hung-up fd"
        os.eventfd_write(other, 1)
        wait_for(lambda: seen)
        assert loop.running and loop.error is None
    finally:
        loop.close()
        for fd in (dead, other):
            os.close(fd)
        rig.close()


def test_a_plain_source_that_hangs_up_ends_the_loop_with_a_reason(loop_impl):
    """A handler's fd (not a relay's) has nobody to stop but the loop itself."""
    dead = hung_up_socket()
    loop = RelayLoop()
    loop.add(dead, lambda: None)
    loop.start()
    try:
        wait_for(lambda: not loop.running)
        assert isinstance(loop.error, OSError) and "hung up" in str(loop.error)
    finally:
        loop.close()
        os.close(dead)
