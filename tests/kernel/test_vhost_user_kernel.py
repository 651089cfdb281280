"""`vdpa-svq serve` on a real vhost-vdpa device (vdpa_sim net, loopback) with DPDK testpmd's
virtio-user as the frontend, split then packed guest rings, inside the kernel bench; and the
config space through the backend, with the Python frontend."""

from __future__ import annotations

import pytest

from kernel_iface import uapi
from tests.kernel.conftest import bench_env
from tests.vhost_user.client import VhostUserFrontend, bit
from tests.vhost_user.conftest import RunningServer
from tests.vhost_user.testpmd import find_testpmd, split_then_packed, start_serve
from vdpa_svq.devices import open_device
from vdpa_svq.ring import Layout
from vdpa_svq.vhost_user import messages as m
from vdpa_svq.vhost_user.backend import NET_PASSTHROUGH

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


def test_testpmd_through_the_busy_polling_relay_on_vdpa_sim(vdpa_sim_net, tmp_path):
    """serve --poll-us on a real device: the relay keeps vdpa_sim's callbacks off while it polls."""
    mac = bench_env("KBENCH_VDPA_SIM_NET_MAC")
    sock = str(tmp_path / "vu.sock")
    proc = start_serve(vdpa_sim_net, sock, extra=("--poll-us", "50"))
    try:
        counts = split_then_packed(find_testpmd(), sock, proc, RUN_S, TIMEOUT_S, peer_mac=mac)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert set(counts) == {"split", "packed"}


def test_get_config_through_the_backend_reads_vdpa_sim_mac(vdpa_sim_net, tmp_path):
    """GET_CONFIG reaches VHOST_VDPA_GET_CONFIG: the frontend reads vdpa_sim's MAC, before and while
    the relay runs; the device-specific bits vdpa_sim offers are offered, and those acked are
    negotiated with it. (testpmd cannot show the MAC: DPDK's virtio-user reads no config over
    vhost-user, see tests/vhost_user/test_testpmd.py.)"""
    mac = bytes.fromhex(bench_env("KBENCH_VDPA_SIM_NET_MAC").replace(":", ""))
    acked = bit(uapi.VIRTIO_NET_F_MAC) | bit(uapi.VIRTIO_NET_F_STATUS)
    server = RunningServer(str(tmp_path / "vu.sock"), device=open_device(vdpa_sim_net))
    try:
        fe = VhostUserFrontend(server.connect(), Layout.SPLIT, config=True, extra_features=acked)
        try:
            fe.negotiate()
            assert fe.offered & NET_PASSTHROUGH == server.device.get_features() & NET_PASSTHROUGH
            assert fe.get_config(0, 6) == m.Config(0, 6, 0, mac).encode()
            fe.setup_rings()
            assert server.server.session.features & acked == acked
            assert fe.get_config(0, 6) == m.Config(0, 6, 0, mac).encode()
        finally:
            fe.close()
        server.wait_connections(1)
        assert server.server.summaries[0].error is None
        assert server.server.summaries[0].started == 1
    finally:
        server.stop()
