"""Open what the user names: a /dev/vhost-vdpa-N node, or a built-in software device.

`soft:net` and `soft:blk` are the software loopback net device and ramdisk (vdpa_svq.softdev), for
hosts without vDPA; `soft:net-sim` is the net one restricted to what vdpa_sim offers (split only).
`soft:net,pairs=N` offers N queue pairs (VIRTIO_NET_F_MQ with a control queue, when N > 1).
`vhost-user:PATH[,kind=blk]` is a vhost-user backend listening on PATH, driven as the device
(vdpa_svq.vhost_user.device).

Pointing at the wrong thing gets the right message: before opening, a path that is not a vhost-vdpa
character device is refused by what sysfs says it is; after opening, VHOST_VDPA_GET_DEVICE_ID
doubles as a probe — every vhost-vdpa kernel answers it, and anything else (/dev/null,
/dev/vhost-net) answers ENOTTY.
"""

from __future__ import annotations

import errno
import os
import stat

from kernel_iface import NotSupported, VhostVdpa
from kernel_iface.discovery import VHOST_VDPA_NODE
from kernel_iface.errors import ENOIOCTLCMD, errno_name
from vdpa_svq.device import Device
from vdpa_svq.errors import VdpaSvqError
from vdpa_svq.vhost_user.device import is_vhost_user, open_vhost_user

SOFT_DEVICES = ("soft:net", "soft:blk", "soft:net-sim")
SYS_DEV_CHAR = "/sys/dev/char"  # <major>:<minor> -> the device's sysfs directory

_FILE_KINDS = {
    stat.S_IFREG: "a regular file",
    stat.S_IFDIR: "a directory",
    stat.S_IFBLK: "a block device",
    stat.S_IFIFO: "a named pipe",
    stat.S_IFSOCK: "a socket",
}


class NotAVhostVdpaNode(VdpaSvqError):
    """The path exists but is not a vhost-vdpa character device."""


def _not_vhost_vdpa(path: str, what: str) -> NotAVhostVdpaNode:
    return NotAVhostVdpaNode(f"{path}: is not a vhost-vdpa device ({what})")


def is_soft(spec: str) -> bool:
    return spec.startswith("soft:")


def check_node(path: str) -> None:
    """Refuse a path that exists and is certainly not a vhost-vdpa node; a missing one is left to
    open(), whose errno the kernel_iface table maps."""
    try:
        st = os.stat(path)
    except OSError:
        return
    if not stat.S_ISCHR(st.st_mode):
        raise _not_vhost_vdpa(path, _FILE_KINDS.get(stat.S_IFMT(st.st_mode), "not a character device"))
    major, minor = os.major(st.st_rdev), os.minor(st.st_rdev)
    sys_path = os.path.join(SYS_DEV_CHAR, f"{major}:{minor}")
    if not os.path.exists(sys_path):
        return  # no sysfs (a container): the ioctl probe decides
    real = os.path.realpath(sys_path)
    if not VHOST_VDPA_NODE.match(os.path.basename(real)):
        name = "/".join(real.split(os.sep)[-2:])
        raise _not_vhost_vdpa(path, f"character device {major}:{minor} is {name}")


# Options a software device spec takes after its name (`soft:net,pairs=2`), per device.
SOFT_OPTIONS = {"soft:net": ("pairs",), "soft:net-sim": ("pairs",), "soft:blk": ()}


def _soft_options(spec: str) -> tuple[str, dict[str, int]]:
    """`soft:KIND[,key=value...]` -> (soft:KIND, options); VdpaSvqError for anything else."""
    name, *rest = spec.split(",")
    if name not in SOFT_DEVICES:
        raise VdpaSvqError(f"{spec}: unknown software device; choose one of {', '.join(SOFT_DEVICES)}")
    options: dict[str, int] = {}
    for item in rest:
        key, eq, value = item.partition("=")
        if key not in SOFT_OPTIONS[name]:
            known = ", ".join(f"{k}=N" for k in SOFT_OPTIONS[name]) or "none"
            raise VdpaSvqError(f"{spec}: {name} has no option {key!r} (options: {known})")
        if not eq or not value.isdigit():
            raise VdpaSvqError(f"{spec}: {key} takes a number ({key}=N), not {value!r}")
        options[key] = int(value)
    return name, options


def _soft_device(spec: str) -> Device:
    from vdpa_svq.softdev import SoftBlkDevice, SoftNetDevice

    name, options = _soft_options(spec)
    kwargs: dict[str, object] = {}
    if "pairs" in options:
        kwargs["queue_pairs"] = options["pairs"]
    try:
        if name == "soft:net":
            return SoftNetDevice(path=spec, **kwargs)  # type: ignore[arg-type]
        if name == "soft:net-sim":
            return SoftNetDevice.like_vdpa_sim(path=spec, **kwargs)
        return SoftBlkDevice()
    except ValueError as e:
        raise VdpaSvqError(f"{spec}: {e}") from None


def open_device(spec: str) -> Device:
    """The device `spec` names, open (not yet owned); the caller closes it."""
    if is_soft(spec):
        return _soft_device(spec)
    if is_vhost_user(spec):
        try:
            return open_vhost_user(spec)
        except ValueError as e:
            raise VdpaSvqError(str(e)) from None
    check_node(spec)
    dev = VhostVdpa.open(spec)
    try:
        dev.device_id()
    except NotSupported as e:
        dev.close()
        if e.errno in (errno.ENOTTY, ENOIOCTLCMD):
            raise _not_vhost_vdpa(spec, f"{e.op} answered {errno_name(e.errno)}") from None
        raise
    except BaseException:
        dev.close()
        raise
    return dev
