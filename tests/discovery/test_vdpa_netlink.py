"""vdpa generic-netlink messages, checked byte by byte against include/uapi/linux/vdpa.h (6.12) on the host."""

from __future__ import annotations

import struct

from kernel_iface.vdpa_netlink import (
    VDPA_CMD_DEV_DEL,
    VDPA_CMD_DEV_GET,
    VDPA_CMD_DEV_NEW,
    VDPA_CMD_MGMTDEV_GET,
    VIRTIO_ID_BLOCK,
    VIRTIO_ID_NET,
    MgmtDev,
    build_dev_new,
    build_request,
    parse_dev,
    parse_mgmtdev,
    split_handle,
    vdpamsg,
)

FAMILY_ID = 0x1F  # whatever the controller hands out; the encoding does not depend on it
NLMSG_HDR = struct.Struct("=IHHII")
GENL_HDR = struct.Struct("=BBH")
NLA_HDR = struct.Struct("=HH")

# enum vdpa_attr, by number, from the 6.12.95 uapi header (independent of the module's nla_map)
ATTR_MGMTDEV_BUS_NAME, ATTR_MGMTDEV_DEV_NAME, ATTR_MGMTDEV_SUPPORTED_CLASSES = 1, 2, 3
ATTR_DEV_NAME, ATTR_DEV_ID, ATTR_DEV_VENDOR_ID, ATTR_DEV_MAX_VQS, ATTR_DEV_MAX_VQ_SIZE = 4, 5, 6, 7, 8
ATTR_DEV_MIN_VQ_SIZE, ATTR_DEV_NET_CFG_MACADDR, ATTR_DEV_NET_CFG_MTU = 9, 10, 13
ATTR_DEV_MGMTDEV_MAX_VQS, ATTR_DEV_SUPPORTED_FEATURES, ATTR_DEV_FEATURES = 15, 16, 20
ATTR_PAD = 0


def encode(msg: vdpamsg) -> bytes:
    msg["header"]["type"] = FAMILY_ID
    msg.encode()
    return bytes(msg.data)


def split_attrs(data: bytes) -> tuple[int, int, list[tuple[int, bytes]]]:
    """An independent decoder: (cmd, version, [(type, payload)]) of one genl message."""
    length, _type, _flags, _seq, _pid = NLMSG_HDR.unpack_from(data)
    cmd, version, _ = GENL_HDR.unpack_from(data, NLMSG_HDR.size)
    off, attrs = NLMSG_HDR.size + GENL_HDR.size, []
    while off < length:
        nla_len, nla_type = NLA_HDR.unpack_from(data, off)
        attrs.append((nla_type, data[off + NLA_HDR.size : off + nla_len]))
        off += (nla_len + 3) & ~3
    return cmd, version, attrs


def nla(attr_type: int, payload: bytes) -> bytes:
    raw = NLA_HDR.pack(NLA_HDR.size + len(payload), attr_type) + payload
    return raw + b"\0" * (-len(raw) % 4)


def kernel_reply(cmd: int, *attrs: bytes) -> vdpamsg:
    body = GENL_HDR.pack(cmd, 1, 0) + b"".join(attrs)
    data = NLMSG_HDR.pack(NLMSG_HDR.size + len(body), FAMILY_ID, 2, 1, 0) + body
    msg = vdpamsg(data)
    msg.decode()
    return msg


def u64_attr(attr_type: int, value: int) -> bytes:
    """nla_put_u64_64bit: a VDPA_ATTR_PAD attribute first when the u64 would be misaligned."""
    return nla(ATTR_PAD, b"") + nla(attr_type, struct.pack("=Q", value))


def test_command_numbers_match_enum_vdpa_command():
    assert (VDPA_CMD_MGMTDEV_GET, VDPA_CMD_DEV_NEW, VDPA_CMD_DEV_DEL, VDPA_CMD_DEV_GET) == (2, 3, 4, 5)


def test_dev_new_on_a_pci_mgmtdev_carries_bus_dev_name_mac_and_features():
    cmd, version, attrs = split_attrs(encode(build_dev_new(
        "pci/0000:00:10.0", "vp0", mac="52:54:00:12:34:56", mtu=1500, features=1 << 32)))
    assert (cmd, version) == (VDPA_CMD_DEV_NEW, 1)
    assert attrs == [
        (ATTR_MGMTDEV_BUS_NAME, b"pci\0"),
        (ATTR_MGMTDEV_DEV_NAME, b"0000:00:10.0\0"),
        (ATTR_DEV_NAME, b"vp0\0"),
        (ATTR_DEV_NET_CFG_MACADDR, bytes.fromhex("525400123456")),
        (ATTR_DEV_NET_CFG_MTU, struct.pack("=H", 1500)),
        (ATTR_DEV_FEATURES, struct.pack("=Q", 1 << 32)),
    ]


def test_dev_new_on_a_busless_mgmtdev_has_no_bus_name():
    _, _, attrs = split_attrs(encode(build_dev_new("vdpasim_blk", "blk0")))
    assert attrs == [(ATTR_MGMTDEV_DEV_NAME, b"vdpasim_blk\0"), (ATTR_DEV_NAME, b"blk0\0")]


def test_dev_del_and_dumps():
    assert split_attrs(encode(build_request(VDPA_CMD_DEV_DEL, [["VDPA_ATTR_DEV_NAME", "x"]]))) == (
        VDPA_CMD_DEV_DEL, 1, [(ATTR_DEV_NAME, b"x\0")])
    assert split_attrs(encode(build_request(VDPA_CMD_MGMTDEV_GET))) == (VDPA_CMD_MGMTDEV_GET, 1, [])


def test_mgmtdev_reply_with_pad_attributes_decodes():
    msg = kernel_reply(
        VDPA_CMD_MGMTDEV_GET,
        nla(ATTR_MGMTDEV_BUS_NAME, b"pci\0"),
        nla(ATTR_MGMTDEV_DEV_NAME, b"0000:00:10.0\0"),
        u64_attr(ATTR_MGMTDEV_SUPPORTED_CLASSES, 1 << VIRTIO_ID_NET),
        nla(ATTR_DEV_MGMTDEV_MAX_VQS, struct.pack("=I", 3)),
        u64_attr(ATTR_DEV_SUPPORTED_FEATURES, 0x10730BF8024),
    )
    m = parse_mgmtdev(msg)
    assert m == MgmtDev("pci", "0000:00:10.0", 1 << VIRTIO_ID_NET, 3, 0x10730BF8024)
    assert m.handle == "pci/0000:00:10.0"
    assert m.supports(VIRTIO_ID_NET) and not m.supports(VIRTIO_ID_BLOCK)


def test_dev_reply_decodes_like_vdpa_dev_show():
    msg = kernel_reply(
        VDPA_CMD_DEV_GET,
        nla(ATTR_DEV_NAME, b"vdpa1\0"),
        nla(ATTR_MGMTDEV_DEV_NAME, b"vdpasim_blk\0"),
        nla(ATTR_DEV_ID, struct.pack("=I", VIRTIO_ID_BLOCK)),
        nla(ATTR_DEV_VENDOR_ID, struct.pack("=I", 0)),
        nla(ATTR_DEV_MAX_VQS, struct.pack("=I", 1)),
        nla(ATTR_DEV_MAX_VQ_SIZE, struct.pack("=H", 256)),
        nla(ATTR_DEV_MIN_VQ_SIZE, struct.pack("=H", 1)),
    )
    d = parse_dev(msg)
    assert (d.name, d.mgmtdev, d.device_id, d.vendor_id, d.max_vqs, d.max_vq_size, d.min_vq_size) == (
        "vdpa1", "vdpasim_blk", VIRTIO_ID_BLOCK, 0, 1, 256, 1)


def test_split_handle():
    assert split_handle("pci/0000:00:10.0") == ("pci", "0000:00:10.0")
    assert split_handle("vdpasim_net") == (None, "vdpasim_net")
