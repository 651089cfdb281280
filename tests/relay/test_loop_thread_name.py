"""A relay thread carries its loop's name where top -H, ps -L and perf show threads (/proc's comm),
so that a user can tell which thread of serve spins, and pin or profile it."""

from __future__ import annotations

import os

from vdpa_svq.loop import RelayLoop, RelayLoops


def _comm(loop: RelayLoop) -> str:
    with open(f"/proc/self/task/{loop._thread.native_id}/comm") as f:
        return f.read().strip()


def test_each_relay_thread_is_named_after_its_loop():
    fds = [os.eventfd(0, os.EFD_NONBLOCK) for _ in range(2)]
    loops = RelayLoops(threads=2)
    try:
        for pair, fd in enumerate(fds):
            loops.add(fd, lambda: None, pair=pair)
        loops.start()
        assert sorted(_comm(loop) for loop in loops.loops.values()) == ["vdpa-svq-relay0", "vdpa-svq-relay1"]
    finally:
        loops.close()
        for fd in fds:
            os.close(fd)


def test_a_name_longer_than_the_kernel_keeps_its_end():
    """The kernel keeps 15 bytes: the end, where a loop's number is."""
    loop = RelayLoop("vdpa-svq-relay-pair12")
    try:
        loop.start()
        assert _comm(loop) == "vq-relay-pair12"
    finally:
        loop.stop()
