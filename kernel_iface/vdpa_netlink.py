"""The kernel's `vdpa` generic-netlink family: list management devices and vdpa devices, create and delete them.

pyroute2 knows the generic-netlink controller but not this family, so the message class below spells out
`enum vdpa_attr` from include/uapi/linux/vdpa.h (checked against the 6.12.95 headers the bench downloads).
This is what `vdpa mgmtdev show`, `vdpa dev add` and `vdpa dev del` from iproute2 do, minus the CLI.

The kernel side is drivers/vdpa/vdpa.c: DEV_NEW needs CAP_NET_ADMIN, takes the management device handle
(optional bus name + device name) and the new device's name, plus optional class attributes (MAC, MTU,
max VQ pairs, features). u64 attributes are sent with nla_put_u64_64bit, so VDPA_ATTR_PAD (= 0) appears
in replies and must be ignored.
"""

from __future__ import annotations

import errno
from dataclasses import dataclass

from pyroute2.netlink import NLM_F_ACK, NLM_F_DUMP, NLM_F_REQUEST, genlmsg
from pyroute2.netlink.exceptions import NetlinkError
from pyroute2.netlink.generic import GenericNetlinkSocket

VDPA_GENL_NAME = "vdpa"
VDPA_GENL_VERSION = 0x1

# enum vdpa_command
VDPA_CMD_UNSPEC = 0
VDPA_CMD_MGMTDEV_NEW = 1
VDPA_CMD_MGMTDEV_GET = 2  # can dump
VDPA_CMD_DEV_NEW = 3
VDPA_CMD_DEV_DEL = 4
VDPA_CMD_DEV_GET = 5  # can dump
VDPA_CMD_DEV_CONFIG_GET = 6  # can dump
VDPA_CMD_DEV_VSTATS_GET = 7
VDPA_CMD_DEV_ATTR_SET = 8

# VIRTIO_ID_* (include/uapi/linux/virtio_ids.h) for the classes the bench uses
VIRTIO_ID_NET = 1
VIRTIO_ID_BLOCK = 2


class vdpamsg(genlmsg):
    """struct genlmsghdr followed by `enum vdpa_attr` attributes.

    enum vdpa_attr {
        VDPA_ATTR_UNSPEC, VDPA_ATTR_PAD = VDPA_ATTR_UNSPEC,
        VDPA_ATTR_MGMTDEV_BUS_NAME,          /* string */
        VDPA_ATTR_MGMTDEV_DEV_NAME,          /* string */
        VDPA_ATTR_MGMTDEV_SUPPORTED_CLASSES, /* u64 */
        VDPA_ATTR_DEV_NAME,                  /* string */
        ...
    };
    """

    prefix = "VDPA_ATTR_"
    nla_map = (
        (0, "VDPA_ATTR_UNSPEC", "none"),  # also VDPA_ATTR_PAD
        (1, "VDPA_ATTR_MGMTDEV_BUS_NAME", "asciiz"),
        (2, "VDPA_ATTR_MGMTDEV_DEV_NAME", "asciiz"),
        (3, "VDPA_ATTR_MGMTDEV_SUPPORTED_CLASSES", "uint64"),
        (4, "VDPA_ATTR_DEV_NAME", "asciiz"),
        (5, "VDPA_ATTR_DEV_ID", "uint32"),
        (6, "VDPA_ATTR_DEV_VENDOR_ID", "uint32"),
        (7, "VDPA_ATTR_DEV_MAX_VQS", "uint32"),
        (8, "VDPA_ATTR_DEV_MAX_VQ_SIZE", "uint16"),
        (9, "VDPA_ATTR_DEV_MIN_VQ_SIZE", "uint16"),
        (10, "VDPA_ATTR_DEV_NET_CFG_MACADDR", "l2addr"),
        (11, "VDPA_ATTR_DEV_NET_STATUS", "uint8"),
        (12, "VDPA_ATTR_DEV_NET_CFG_MAX_VQP", "uint16"),
        (13, "VDPA_ATTR_DEV_NET_CFG_MTU", "uint16"),
        (14, "VDPA_ATTR_DEV_NEGOTIATED_FEATURES", "uint64"),
        (15, "VDPA_ATTR_DEV_MGMTDEV_MAX_VQS", "uint32"),
        (16, "VDPA_ATTR_DEV_SUPPORTED_FEATURES", "uint64"),
        (17, "VDPA_ATTR_DEV_QUEUE_INDEX", "uint32"),
        (18, "VDPA_ATTR_DEV_VENDOR_ATTR_NAME", "asciiz"),
        (19, "VDPA_ATTR_DEV_VENDOR_ATTR_VALUE", "uint64"),
        (20, "VDPA_ATTR_DEV_FEATURES", "uint64"),
        (21, "VDPA_ATTR_DEV_BLK_CFG_CAPACITY", "uint64"),
        (22, "VDPA_ATTR_DEV_BLK_CFG_SIZE_MAX", "uint32"),
        (23, "VDPA_ATTR_DEV_BLK_CFG_BLK_SIZE", "uint32"),
        (24, "VDPA_ATTR_DEV_BLK_CFG_SEG_MAX", "uint32"),
        (25, "VDPA_ATTR_DEV_BLK_CFG_NUM_QUEUES", "uint16"),
        (26, "VDPA_ATTR_DEV_BLK_CFG_PHY_BLK_EXP", "uint8"),
        (27, "VDPA_ATTR_DEV_BLK_CFG_ALIGN_OFFSET", "uint8"),
        (28, "VDPA_ATTR_DEV_BLK_CFG_MIN_IO_SIZE", "uint16"),
        (29, "VDPA_ATTR_DEV_BLK_CFG_OPT_IO_SIZE", "uint32"),
        (30, "VDPA_ATTR_DEV_BLK_CFG_MAX_DISCARD_SEC", "uint32"),
        (31, "VDPA_ATTR_DEV_BLK_CFG_MAX_DISCARD_SEG", "uint32"),
        (32, "VDPA_ATTR_DEV_BLK_CFG_DISCARD_SEC_ALIGN", "uint32"),
        (33, "VDPA_ATTR_DEV_BLK_CFG_MAX_WRITE_ZEROES_SEC", "uint32"),
        (34, "VDPA_ATTR_DEV_BLK_CFG_MAX_WRITE_ZEROES_SEG", "uint32"),
        (35, "VDPA_ATTR_DEV_BLK_READ_ONLY", "uint8"),
        (36, "VDPA_ATTR_DEV_BLK_FLUSH", "uint8"),
    )


class VdpaNetlinkError(OSError):
    """A vdpa netlink request failed; carries the errno and the operation that failed."""

    def __init__(self, err: int, message: str, op: str = ""):
        super().__init__(err, message)
        self.op = op


FAMILY_MISSING = "vdpa netlink family not found: is the vdpa module loaded?"


@dataclass(frozen=True)
class MgmtDev:
    """One management device (VDPA_CMD_MGMTDEV_GET): something that can create vdpa devices."""

    bus_name: str | None  # "pci" for vp_vdpa; None for the simulators
    dev_name: str  # "0000:00:10.0", "vdpasim_net"
    supported_classes: int  # bit mask of VIRTIO_ID_* (1 << id)
    max_supported_vqs: int | None
    supported_features: int | None

    @property
    def handle(self) -> str:
        """The name iproute2 and DEV_GET use: "bus/dev" or just "dev"."""
        return f"{self.bus_name}/{self.dev_name}" if self.bus_name else self.dev_name

    def supports(self, virtio_id: int) -> bool:
        return bool(self.supported_classes & (1 << virtio_id))


@dataclass(frozen=True)
class VdpaDev:
    """One vdpa device (VDPA_CMD_DEV_GET)."""

    name: str
    mgmtdev: str  # handle of the management device that created it
    device_id: int  # VIRTIO_ID_*
    vendor_id: int
    max_vqs: int
    max_vq_size: int
    min_vq_size: int | None


def split_handle(handle: str) -> tuple[str | None, str]:
    """"pci/0000:00:10.0" -> ("pci", "0000:00:10.0"); "vdpasim_net" -> (None, "vdpasim_net")."""
    bus, sep, dev = handle.partition("/")
    return (bus, dev) if sep else (None, handle)


def _handle_attrs(handle: str) -> list[list]:
    bus, dev = split_handle(handle)
    attrs = [["VDPA_ATTR_MGMTDEV_BUS_NAME", bus]] if bus else []
    return attrs + [["VDPA_ATTR_MGMTDEV_DEV_NAME", dev]]


def build_request(cmd: int, attrs: list[list] | None = None) -> vdpamsg:
    msg = vdpamsg()
    msg["cmd"] = cmd
    msg["version"] = VDPA_GENL_VERSION
    msg["attrs"] = attrs or []
    return msg


def build_dev_new(
    mgmtdev: str, name: str, *, mac: str | None = None, mtu: int | None = None,
    max_vq_pairs: int | None = None, features: int | None = None,
) -> vdpamsg:
    """VDPA_CMD_DEV_NEW: the optional attributes are the ones `vdpa dev add` accepts."""
    attrs = _handle_attrs(mgmtdev) + [["VDPA_ATTR_DEV_NAME", name]]
    if mac is not None:
        attrs.append(["VDPA_ATTR_DEV_NET_CFG_MACADDR", mac])
    if mtu is not None:
        attrs.append(["VDPA_ATTR_DEV_NET_CFG_MTU", mtu])
    if max_vq_pairs is not None:
        attrs.append(["VDPA_ATTR_DEV_NET_CFG_MAX_VQP", max_vq_pairs])
    if features is not None:
        attrs.append(["VDPA_ATTR_DEV_FEATURES", features])
    return build_request(VDPA_CMD_DEV_NEW, attrs)


def parse_mgmtdev(msg: vdpamsg) -> MgmtDev:
    return MgmtDev(
        bus_name=msg.get_attr("VDPA_ATTR_MGMTDEV_BUS_NAME"),
        dev_name=msg.get_attr("VDPA_ATTR_MGMTDEV_DEV_NAME"),
        supported_classes=msg.get_attr("VDPA_ATTR_MGMTDEV_SUPPORTED_CLASSES") or 0,
        max_supported_vqs=msg.get_attr("VDPA_ATTR_DEV_MGMTDEV_MAX_VQS"),
        supported_features=msg.get_attr("VDPA_ATTR_DEV_SUPPORTED_FEATURES"),
    )


def parse_dev(msg: vdpamsg) -> VdpaDev:
    bus = msg.get_attr("VDPA_ATTR_MGMTDEV_BUS_NAME")
    dev = msg.get_attr("VDPA_ATTR_MGMTDEV_DEV_NAME")
    return VdpaDev(
        name=msg.get_attr("VDPA_ATTR_DEV_NAME"),
        mgmtdev=f"{bus}/{dev}" if bus else dev,
        device_id=msg.get_attr("VDPA_ATTR_DEV_ID"),
        vendor_id=msg.get_attr("VDPA_ATTR_DEV_VENDOR_ID"),
        max_vqs=msg.get_attr("VDPA_ATTR_DEV_MAX_VQS"),
        max_vq_size=msg.get_attr("VDPA_ATTR_DEV_MAX_VQ_SIZE"),
        min_vq_size=msg.get_attr("VDPA_ATTR_DEV_MIN_VQ_SIZE"),
    )


class VdpaNetlink:
    """A bound socket for the vdpa family. Use as a context manager; creating devices needs CAP_NET_ADMIN."""

    def __init__(self) -> None:
        self._sock = GenericNetlinkSocket()
        try:
            self._sock.bind(VDPA_GENL_NAME, vdpamsg)
        except NetlinkError as e:
            self._sock.close()
            if e.code == errno.ENOENT:
                raise VdpaNetlinkError(errno.ENOENT, FAMILY_MISSING, "bind") from None
            raise VdpaNetlinkError(e.code, f"vdpa netlink bind failed: {e}", "bind") from None

    def close(self) -> None:
        self._sock.close()

    def __enter__(self) -> VdpaNetlink:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _request(self, op: str, msg: vdpamsg, flags: int) -> list[vdpamsg]:
        try:
            replies = self._sock.nlm_request(msg, msg_type=self._sock.prid, msg_flags=flags)
        except NetlinkError as e:
            what = {
                errno.ENODEV: "no such device or management device",
                errno.ENOENT: "no such device or management device",
                errno.EEXIST: "a device with that name already exists",
                errno.EPERM: "permission denied (needs CAP_NET_ADMIN)",
                errno.EOPNOTSUPP: "not supported by this management device",
            }.get(e.code, e.args[1] if len(e.args) > 1 else str(e))
            raise VdpaNetlinkError(e.code, f"vdpa {op}: {what} (errno {e.code})", op) from None
        return [r for r in replies if r.get_attr("VDPA_ATTR_DEV_NAME") or r.get_attr("VDPA_ATTR_MGMTDEV_DEV_NAME")]

    def list_mgmtdevs(self) -> list[MgmtDev]:
        replies = self._request("mgmtdev show", build_request(VDPA_CMD_MGMTDEV_GET), NLM_F_REQUEST | NLM_F_DUMP)
        return [parse_mgmtdev(r) for r in replies]

    def list_devices(self) -> list[VdpaDev]:
        replies = self._request("dev show", build_request(VDPA_CMD_DEV_GET), NLM_F_REQUEST | NLM_F_DUMP)
        return [parse_dev(r) for r in replies]

    def get_device(self, name: str) -> VdpaDev:
        msg = build_request(VDPA_CMD_DEV_GET, [["VDPA_ATTR_DEV_NAME", name]])
        replies = self._request(f"dev show {name}", msg, NLM_F_REQUEST)
        if not replies:
            raise VdpaNetlinkError(errno.ENODEV, f"vdpa dev show {name}: no reply", "dev show")
        return parse_dev(replies[0])

    def add_device(self, mgmtdev: str, name: str, **cfg) -> VdpaDev:
        """Create `name` on `mgmtdev` (a handle: "vdpasim_net", "pci/0000:00:10.0"); returns it as DEV_GET sees it."""
        self._request(f"dev add {name}", build_dev_new(mgmtdev, name, **cfg), NLM_F_REQUEST | NLM_F_ACK)
        return self.get_device(name)

    def del_device(self, name: str) -> None:
        msg = build_request(VDPA_CMD_DEV_DEL, [["VDPA_ATTR_DEV_NAME", name]])
        self._request(f"dev del {name}", msg, NLM_F_REQUEST | NLM_F_ACK)
