"""`vdpa-svq serve` on a real vhost-vdpa device (vdpa_sim net, loopback) with DPDK testpmd's
virtio-user as the frontend, split then packed guest rings, inside the kernel bench."""

from __future__ import annotations

import pytest

from tests.kernel.conftest import bench_env
from tests.vhost_user.testpmd import find_testpmd, split_then_packed, start_serve

pytestmark = pytest.mark.kernel

# TCG is slow: testpmd's EAL start alone takes seconds; the run is still bounded.
RUN_S = 10
TIMEOUT_S = 90


def test_testpmd_through_vdpa_sim_net(vdpa_sim_net, tmp_path):
    """vdpa_sim net passes on only frames for its MAC (or broadcast): the first burst is sent there."""
    mac = bench_env("KBENCH_VDPA_SIM_NET_MAC")
    binary = find_testpmd()
    sock = str(tmp_path / "vu.sock")
    proc = start_serve(vdpa_sim_net, sock)
    try:
        counts = split_then_packed(binary, sock, proc, RUN_S, TIMEOUT_S, peer_mac=mac)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert set(counts) == {"split", "packed"}
