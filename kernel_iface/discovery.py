"""Which /dev/vhost-vdpa-N is which: sysfs (through pyudev) plus the vdpa netlink family.

sysfs layout read here (drivers/vhost/vdpa.c, drivers/vdpa/vdpa.c, 6.12):

    /sys/bus/vdpa/devices/<name>      -> ../../../devices/[<parent>/]<name>   one per vdpa device
    <vdpa dev>/driver                  -> .../drivers/vhost_vdpa               the vdpa bus driver
    <vdpa dev>/vhost-vdpa-<N>/dev      "major:minor" of /dev/vhost-vdpa-<N>    (no subsystem, DEVNAME in uevent)
    <vdpa dev>/..                      the parent: the PCI function for vp_vdpa, nothing for vdpa_sim

sysfs has neither the management device of a simulator nor the virtio device id, so those come from
VDPA_CMD_DEV_GET when the vdpa family is there (it is whenever a vdpa device exists, but a caller without
it still gets the sysfs half). No udev daemon is needed: pyudev only reads sysfs.

Discovery never opens the character devices: vhost-vdpa allows one opener at a time.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

VHOST_VDPA_NODE = re.compile(r"^vhost-vdpa-(\d+)$")

# The module behind each management device, for the management devices whose sysfs node has no driver.
SIM_PROVIDERS = {"vdpasim_net": "vdpa_sim_net", "vdpasim_blk": "vdpa_sim_blk"}


@dataclass(frozen=True)
class VhostVdpaDevice:
    """One /dev/vhost-vdpa-N and the vdpa device behind it."""

    dev_path: str  # /dev/vhost-vdpa-N
    index: int  # N
    devnum: tuple[int, int]  # (major, minor)
    vdpa_name: str  # name given at `vdpa dev add` time
    sys_path: str  # sysfs path of the vdpa device
    driver: str | None  # vdpa bus driver bound to it (vhost_vdpa, else there would be no node)
    parent: str | None  # sysfs parent handle, "pci/0000:00:10.0"; None for the simulators
    mgmtdev: str | None  # management device handle ("vdpasim_net", "pci/0000:00:10.0"); None without netlink
    provider: str | None  # driver behind the management device: vdpa_sim_net, vdpa_sim_blk, vp-vdpa
    device_id: int | None  # virtio device id (1 net, 2 block); None without netlink
    vendor_id: int | None = None
    max_vqs: int | None = None
    max_vq_size: int | None = None


@dataclass(frozen=True)
class _SysfsFacts:
    """What sysfs says about one vdpa device; the part of discovery a fake tree can stand in for."""

    vdpa_name: str
    sys_path: str
    driver: str | None
    parent_subsystem: str | None
    parent_name: str | None
    parent_driver: str | None
    node: str | None  # vhost-vdpa-N
    devnum: tuple[int, int] | None


def _scan_udev() -> list[_SysfsFacts]:
    import pyudev

    ctx = pyudev.Context()
    facts = []
    for dev in ctx.list_devices(subsystem="vdpa"):
        parent = dev.parent
        node = _node_child(Path(dev.sys_path))
        devnum = None
        if node is not None:
            # The node has no subsystem, and libudev then reports device_number 0: read its "dev" attribute.
            child = pyudev.Devices.from_sys_path(ctx, os.path.join(dev.sys_path, node))
            major, minor = child.attributes.asstring("dev").strip().split(":")
            devnum = (int(major), int(minor))
        facts.append(_SysfsFacts(
            vdpa_name=dev.sys_name, sys_path=dev.sys_path, driver=dev.driver,
            parent_subsystem=parent.subsystem if parent is not None else None,
            parent_name=parent.sys_name if parent is not None else None,
            parent_driver=parent.driver if parent is not None else None,
            node=node, devnum=devnum,
        ))
    return facts


def _scan_dir(sys_root: Path) -> list[_SysfsFacts]:
    """The same facts read with plain file operations from a sysfs-shaped tree (tests, or no libudev)."""

    def link_name(p: Path) -> str | None:
        return os.path.basename(os.readlink(p)) if p.is_symlink() else None

    facts = []
    bus = sys_root / "bus" / "vdpa" / "devices"
    for entry in sorted(bus.iterdir()) if bus.is_dir() else []:
        real = entry.resolve()
        parent = real.parent
        has_parent = (parent / "subsystem").is_symlink()
        node = _node_child(real)
        devnum = None
        if node is not None:
            major, minor = (real / node / "dev").read_text().strip().split(":")
            devnum = (int(major), int(minor))
        facts.append(_SysfsFacts(
            vdpa_name=entry.name, sys_path=str(real), driver=link_name(real / "driver"),
            parent_subsystem=link_name(parent / "subsystem") if has_parent else None,
            parent_name=parent.name if has_parent else None,
            parent_driver=link_name(parent / "driver") if has_parent else None,
            node=node, devnum=devnum,
        ))
    return facts


def _node_child(sys_path: Path) -> str | None:
    for name in sorted(os.listdir(sys_path)):
        if VHOST_VDPA_NODE.match(name):
            return name
    return None


def _netlink_devices() -> dict[str, object]:
    """name -> VdpaDev, or {} when the vdpa family is not there (no device can exist then anyway)."""
    from kernel_iface.vdpa_netlink import VdpaNetlink, VdpaNetlinkError

    try:
        with VdpaNetlink() as nl:
            return {d.name: d for d in nl.list_devices()}
    except VdpaNetlinkError:
        return {}


def discover(sys_root: str | os.PathLike | None = None, netlink: dict | None = None) -> list[VhostVdpaDevice]:
    """Every /dev/vhost-vdpa-N, sorted by N.

    sys_root: read a sysfs-shaped tree at this path instead of the live /sys through pyudev.
    netlink: name -> VdpaDev to use instead of asking the kernel (tests; or a caller that already asked).
    """
    facts = _scan_udev() if sys_root is None else _scan_dir(Path(sys_root))
    nl = _netlink_devices() if netlink is None else netlink
    out = []
    for f in facts:
        if f.node is None or f.devnum is None:
            continue  # bound to another bus driver (virtio_vdpa) or still probing: no vhost-vdpa node
        parent = f"{f.parent_subsystem}/{f.parent_name}" if f.parent_subsystem else None
        info = nl.get(f.vdpa_name)
        mgmtdev = info.mgmtdev if info is not None else parent
        provider = f.parent_driver if f.parent_driver else SIM_PROVIDERS.get(mgmtdev or "")
        out.append(VhostVdpaDevice(
            dev_path=f"/dev/{f.node}", index=int(VHOST_VDPA_NODE.match(f.node).group(1)), devnum=f.devnum,
            vdpa_name=f.vdpa_name, sys_path=f.sys_path, driver=f.driver, parent=parent, mgmtdev=mgmtdev,
            provider=provider,
            device_id=info.device_id if info is not None else None,
            vendor_id=info.vendor_id if info is not None else None,
            max_vqs=info.max_vqs if info is not None else None,
            max_vq_size=info.max_vq_size if info is not None else None,
        ))
    return sorted(out, key=lambda d: d.index)


def by_name(devices: list[VhostVdpaDevice]) -> dict[str, VhostVdpaDevice]:
    return {d.vdpa_name: d for d in devices}
