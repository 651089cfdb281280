"""Opening the device a command names, so that pointing at the wrong thing gets the right message.

vdpa_svq.devices.open_device does the opening (nodes and soft:* devices). Before it, a path that is
not a vhost-vdpa character device is refused by what sysfs says it is; after it, the first two
ioctls double as a probe: a node that answers VHOST_SET_OWNER or VHOST_VDPA_GET_DEVICE_ID with ENOTTY
is not vhost-vdpa (/dev/null fails the first; /dev/vhost-net takes an owner but fails the second),
and every vhost-vdpa kernel implements both.
"""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from kernel_iface import NotSupported
from kernel_iface.discovery import VHOST_VDPA_NODE
from kernel_iface.errors import ENOIOCTLCMD, errno_name
from vdpa_svq.devices import NotAVhostVdpaNode, is_soft, open_device

SYS_DEV_CHAR = "/sys/dev/char"  # <major>:<minor> -> the device's sysfs directory

_FILE_KINDS = {
    stat.S_IFREG: "a regular file",
    stat.S_IFDIR: "a directory",
    stat.S_IFBLK: "a block device",
    stat.S_IFIFO: "a named pipe",
    stat.S_IFSOCK: "a socket",
}


def _not_vhost_vdpa(path: str, what: str) -> NotAVhostVdpaNode:
    return NotAVhostVdpaNode(f"{path}: is not a vhost-vdpa device ({what})")


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


@contextmanager
def opened(spec: str, *, owner: bool = True) -> Iterator[Any]:
    """The device `spec` names, open (and owned when `owner`), closed on exit. Closing a vhost-vdpa
    fd resets the device."""
    if not is_soft(spec):
        check_node(spec)
    dev = open_device(spec)
    with dev:
        try:
            if owner:
                dev.set_owner()
            dev.device_id()
        except NotSupported as e:
            if e.errno in (errno.ENOTTY, ENOIOCTLCMD):
                raise _not_vhost_vdpa(spec, f"{e.op} answered {errno_name(e.errno)}") from None
            raise
        yield dev
