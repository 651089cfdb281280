"""Open what the user names: a /dev/vhost-vdpa-N node, or a built-in software device.

`soft:net` and `soft:blk` are the software loopback net device and ramdisk (vdpa_svq.softdev), for
hosts without vDPA; `soft:net-sim` is the net one restricted to what vdpa_sim offers (split only).
"""

from __future__ import annotations

import os
import stat
from typing import Any

from kernel_iface import VhostVdpa
from vdpa_svq.errors import VdpaSvqError

SOFT_DEVICES = ("soft:net", "soft:blk", "soft:net-sim")


class NotAVhostVdpaNode(VdpaSvqError):
    """The path exists but is not a vhost-vdpa character device."""


def is_soft(spec: str) -> bool:
    return spec.startswith("soft:")


def open_device(spec: str) -> Any:
    """An open device with the VhostVdpa methods; the caller closes it."""
    if is_soft(spec):
        from vdpa_svq.softdev import SoftBlkDevice, SoftNetDevice

        if spec == "soft:net":
            return SoftNetDevice()
        if spec == "soft:net-sim":
            return SoftNetDevice.like_vdpa_sim(path=spec)
        if spec == "soft:blk":
            return SoftBlkDevice()
        raise VdpaSvqError(f"{spec}: unknown software device; choose one of {', '.join(SOFT_DEVICES)}")
    try:
        st = os.stat(spec)
    except OSError:
        st = None  # let VhostVdpa.open() report it with the errno mapping
    if st is not None and not stat.S_ISCHR(st.st_mode):
        raise NotAVhostVdpaNode(f"{spec}: not a character device (expected /dev/vhost-vdpa-N)")
    if st is not None and os.path.basename(spec) == "vhost-net":
        raise NotAVhostVdpaNode(f"{spec}: this is vhost-net (the kernel's virtio-net backend), not a vhost-vdpa device")
    return VhostVdpa.open(spec)
