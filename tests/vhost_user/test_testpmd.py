"""A real, independent vhost-user frontend: DPDK testpmd's virtio-user against `vdpa-svq serve soft:net`
(see testpmd.py). A missing dpdk-testpmd FAILS: `make test` installs it (tools/debian-packages.txt)."""

from __future__ import annotations

import pytest

from .testpmd import find_testpmd, split_then_packed, start_serve


# Both relays: the Python one once tore le16 indexes (struct writes byte by byte) and DPDK, reading
# them concurrently from another process, saw a used index run backwards and re-posted buffers in flight.
@pytest.fixture(params=["c", "py"])
def served(tmp_path, request):
    sock = str(tmp_path / "vu.sock")
    proc = start_serve("soft:net", sock, impl=request.param)
    yield sock, proc
    if proc.poll() is None:
        proc.kill()
        proc.communicate()


def test_testpmd_virtio_user_split_then_packed_through_the_relay(served):
    """Split, then packed (a reconnect), from DPDK's virtio-user: frames loop back through the
    shadow relay; testpmd's RX and TX agree within the frames in flight; the server survives both."""
    binary = find_testpmd()
    sock, proc = served
    split_then_packed(binary, sock, proc)
