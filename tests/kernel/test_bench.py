"""The kernel bench itself: the devices `tools/kbench run` promises exist, and the vdpa netlink family works."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest

from kernel_iface.discovery import discover
from kernel_iface.vdpa_netlink import VIRTIO_ID_BLOCK, VIRTIO_ID_NET, VdpaNetlink, VdpaNetlinkError

pytestmark = pytest.mark.kernel

VP_VDPA_MGMTDEV = "pci/0000:00:10.0"  # fixed by tools/kbench (VP_VDPA_BDF)
EXTRA = "kbench-extra"


@pytest.fixture
def nl(kernel_bench):
    with VdpaNetlink() as sock:
        yield sock


def test_discovery_maps_each_bench_node_to_its_provider(vdpa_sim_net, vdpa_sim_blk, vp_vdpa):
    found = {d.dev_path: d for d in discover()}
    expect = {
        vdpa_sim_net: ("vdpasim_net", "vdpa_sim_net", VIRTIO_ID_NET),
        vdpa_sim_blk: ("vdpasim_blk", "vdpa_sim_blk", VIRTIO_ID_BLOCK),
        vp_vdpa: (VP_VDPA_MGMTDEV, "vp-vdpa", VIRTIO_ID_NET),
    }
    for path, (mgmtdev, provider, device_id) in expect.items():
        d = found[path]
        assert (d.mgmtdev, d.provider, d.device_id, d.driver) == (mgmtdev, provider, device_id, "vhost_vdpa")
        st = os.stat(path)
        assert (os.major(st.st_rdev), os.minor(st.st_rdev)) == d.devnum
    assert found[vp_vdpa].parent == VP_VDPA_MGMTDEV
    assert found[vdpa_sim_net].parent is None


def test_netlink_lists_the_three_management_devices(nl):
    mgmt = {m.handle: m for m in nl.list_mgmtdevs()}
    assert {"vdpasim_net", "vdpasim_blk", VP_VDPA_MGMTDEV} <= set(mgmt)
    assert mgmt["vdpasim_net"].supports(VIRTIO_ID_NET)
    assert mgmt["vdpasim_blk"].supports(VIRTIO_ID_BLOCK)
    assert mgmt[VP_VDPA_MGMTDEV].bus_name == "pci"
    assert mgmt[VP_VDPA_MGMTDEV].supports(VIRTIO_ID_NET)


def test_netlink_lists_the_bench_devices(nl, vdpa_sim_net, vdpa_sim_blk, vp_vdpa):
    devs = {d.mgmtdev: d for d in nl.list_devices()}
    assert devs["vdpasim_net"].device_id == VIRTIO_ID_NET
    assert devs["vdpasim_blk"].device_id == VIRTIO_ID_BLOCK
    assert devs[VP_VDPA_MGMTDEV].max_vq_size == 256


def test_netlink_creates_and_deletes_an_extra_sim_net_device(nl):
    before = {d.dev_path for d in discover()}
    try:
        dev = nl.add_device("vdpasim_net", EXTRA, mac="52:54:00:12:34:99")
        assert (dev.name, dev.mgmtdev, dev.device_id) == (EXTRA, "vdpasim_net", VIRTIO_ID_NET)
        new = [d for d in discover() if d.dev_path not in before]
        assert [(d.vdpa_name, d.mgmtdev) for d in new] == [(EXTRA, "vdpasim_net")]
        assert Path(new[0].dev_path).exists()
    finally:
        nl.del_device(EXTRA)
    with pytest.raises(VdpaNetlinkError) as e:
        nl.get_device(EXTRA)
    assert e.value.errno == errno.ENODEV
    assert {d.dev_path for d in discover()} == before


def test_netlink_refuses_a_duplicate_name(nl):
    existing = nl.list_devices()[0].name
    with pytest.raises(VdpaNetlinkError) as e:
        nl.add_device("vdpasim_net", existing)
    assert e.value.errno == errno.EEXIST


def test_netlink_refuses_an_unknown_management_device(nl):
    with pytest.raises(VdpaNetlinkError) as e:
        nl.add_device("no_such_mgmtdev", EXTRA)
    assert e.value.errno == errno.ENODEV


def test_peer_interface_is_up_on_virtio_net(peer_iface):
    sysfs = Path("/sys/class/net") / peer_iface
    assert (sysfs / "operstate").read_text().strip() in ("up", "unknown")
    assert os.path.basename(os.readlink(sysfs / "device" / "driver")) == "virtio_net"
