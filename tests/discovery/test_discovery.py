"""kernel_iface.discovery over a fake sysfs tree shaped like the bench guest's (kernel 6.12)."""

from __future__ import annotations

import os
from pathlib import Path

from kernel_iface.discovery import discover
from kernel_iface.vdpa_netlink import VdpaDev


def link(at: Path, target: Path) -> None:
    at.parent.mkdir(parents=True, exist_ok=True)
    at.symlink_to(os.path.relpath(target, at.parent))


def vdpa_device(sys: Path, dev_dir: Path, driver: str, node: str | None, devnum: str = "") -> None:
    dev_dir.mkdir(parents=True)
    link(sys / "bus" / "vdpa" / "devices" / dev_dir.name, dev_dir)
    link(dev_dir / "subsystem", sys / "bus" / "vdpa")
    link(dev_dir / "driver", sys / "bus" / "vdpa" / "drivers" / driver)
    if node:
        (dev_dir / node).mkdir()
        (dev_dir / node / "dev").write_text(devnum + "\n")
        (dev_dir / node / "uevent").write_text(f"MAJOR={devnum.split(':')[0]}\nDEVNAME={node}\n")


def fake_sysfs(tmp_path: Path) -> Path:
    sys = tmp_path / "sys"
    for d in ("bus/vdpa/drivers/vhost_vdpa", "bus/vdpa/drivers/virtio_vdpa", "bus/pci/drivers/vp-vdpa"):
        (sys / d).mkdir(parents=True)
    vdpa_device(sys, sys / "devices" / "sim-net", "vhost_vdpa", "vhost-vdpa-0", "245:0")
    vdpa_device(sys, sys / "devices" / "sim-blk", "vhost_vdpa", "vhost-vdpa-1", "245:1")
    pci = sys / "devices" / "pci0000:00" / "0000:00:10.0"
    vdpa_device(sys, pci / "vp-net", "vhost_vdpa", "vhost-vdpa-2", "245:2")
    link(pci / "subsystem", sys / "bus" / "pci")
    link(pci / "driver", sys / "bus" / "pci" / "drivers" / "vp-vdpa")
    vdpa_device(sys, sys / "devices" / "as-virtio", "virtio_vdpa", None)  # no vhost-vdpa node
    return sys


NETLINK = {
    "sim-net": VdpaDev("sim-net", "vdpasim_net", 1, 0, 3, 256, None),
    "sim-blk": VdpaDev("sim-blk", "vdpasim_blk", 2, 0, 1, 256, None),
    "vp-net": VdpaDev("vp-net", "pci/0000:00:10.0", 1, 0x1af4, 3, 256, None),
}


def test_each_node_maps_to_its_vdpa_device_mgmtdev_and_provider(tmp_path):
    devs = discover(sys_root=fake_sysfs(tmp_path), netlink=NETLINK)
    assert [(d.dev_path, d.vdpa_name, d.mgmtdev, d.provider, d.device_id, d.driver, d.devnum) for d in devs] == [
        ("/dev/vhost-vdpa-0", "sim-net", "vdpasim_net", "vdpa_sim_net", 1, "vhost_vdpa", (245, 0)),
        ("/dev/vhost-vdpa-1", "sim-blk", "vdpasim_blk", "vdpa_sim_blk", 2, "vhost_vdpa", (245, 1)),
        ("/dev/vhost-vdpa-2", "vp-net", "pci/0000:00:10.0", "vp-vdpa", 1, "vhost_vdpa", (245, 2)),
    ]
    assert devs[2].parent == "pci/0000:00:10.0" and devs[0].parent is None
    assert devs[2].vendor_id == 0x1AF4


def test_without_netlink_only_the_sysfs_half_is_known(tmp_path):
    devs = {d.vdpa_name: d for d in discover(sys_root=fake_sysfs(tmp_path), netlink={})}
    assert devs["vp-net"].mgmtdev == "pci/0000:00:10.0"  # from the sysfs parent
    assert devs["sim-net"].mgmtdev is None and devs["sim-net"].device_id is None
    assert "as-virtio" not in devs


def test_no_vdpa_bus_means_no_devices(tmp_path):
    assert discover(sys_root=tmp_path, netlink={}) == []
