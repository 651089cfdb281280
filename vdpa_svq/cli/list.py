"""`vdpa-svq list`: the vhost-vdpa devices of this host (sysfs through pyudev, plus vdpa netlink)."""

from __future__ import annotations

import os
from dataclasses import asdict

import click

from kernel_iface.discovery import VhostVdpaDevice, discover
from vdpa_svq.cli._output import echo_json, json_option, print_table

# include/uapi/linux/virtio_ids.h, the ones a vDPA provider may offer
VIRTIO_TYPES = {1: "net", 2: "blk", 3: "console", 4: "rng", 5: "balloon", 8: "scsi", 9: "9p", 16: "gpu",
                18: "input", 19: "vsock", 20: "crypto", 26: "fs"}

SYS_BUS_VDPA = "/sys/bus/vdpa"

NONE_FOUND = (
    "No vhost-vdpa devices found. The host kernel needs the vhost_vdpa module and a vDPA provider "
    "(a vDPA NIC driver such as mlx5_vdpa, or vp_vdpa, or the vdpa_sim_net / vdpa_sim_blk simulators) "
    "with a device created by `vdpa dev add`. For the test bench, `make kernel` boots a guest that "
    "has all three (tools/kbench)."
)


def why_none(sys_bus_vdpa: str = SYS_BUS_VDPA) -> str:
    """What sysfs says about the missing pieces, in a few words."""
    if not os.path.isdir(sys_bus_vdpa):
        return "there is no vdpa bus (no vdpa module loaded)"
    if not os.path.isdir(os.path.join(sys_bus_vdpa, "drivers", "vhost_vdpa")):
        return "the vhost_vdpa module is not loaded (modprobe vhost_vdpa)"
    devices = os.path.join(sys_bus_vdpa, "devices")
    names = sorted(os.listdir(devices)) if os.path.isdir(devices) else []
    if not names:
        return "the vdpa bus has no devices (create one with `vdpa dev add`)"
    return f"vdpa devices {', '.join(names)} are bound to another driver (virtio_vdpa?), not vhost_vdpa"


def device_type(d: VhostVdpaDevice) -> str:
    if d.device_id is None:
        return "?"
    return VIRTIO_TYPES.get(d.device_id, f"virtio id {d.device_id}")


@click.command(name="list", short_help="List the vhost-vdpa devices of this host.")
@json_option
def list_devices(as_json: bool) -> None:
    """List the vhost-vdpa devices of this host: the /dev/vhost-vdpa-N node, the vdpa device behind
    it, its management device, the driver that provides it (vdpa_sim_net, vp-vdpa, mlx5_core...) and
    its type (net, blk).

    Reads sysfs and the vdpa netlink family; opens no device, so devices in use are listed too.
    """
    devices = discover()
    if as_json:
        echo_json({"devices": [{**asdict(d), "type": device_type(d)} for d in devices]})
        return
    if not devices:
        click.echo(NONE_FOUND)
        click.echo(f"Here: {why_none()}.")
        return
    print_table(
        None,
        ["NODE", "VDPA DEVICE", "MGMTDEV", "DRIVER", "TYPE", "VQS", "QSIZE"],
        [
            [d.dev_path, d.vdpa_name, d.mgmtdev or "-", d.provider or "-", device_type(d),
             "-" if d.max_vqs is None else str(d.max_vqs), "-" if d.max_vq_size is None else str(d.max_vq_size)]
            for d in devices
        ],
    )
