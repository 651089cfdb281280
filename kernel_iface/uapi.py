"""Linux vhost / vhost-vdpa / virtio uapi under the kernel's own names.

Sources: <linux/vhost.h>, <linux/vhost_types.h>, <linux/virtio_config.h>, <linux/virtio_ring.h>,
<linux/virtio_ids.h>, <linux/virtio_net.h>, <linux/virtio_blk.h>. Every module-level name starting with
``VHOST_``, ``VIRTIO_`` or ``VRING_`` is a kernel macro and is checked against the host headers by
tests/uapi/test_uapi_headers.py; anything that is ours is lower case or starts with an underscore.

Request numbers are computed from the ctypes structs below, so a struct and the ioctl that carries it
cannot drift apart. Names newer than the oldest headers we test against say which kernel added them.
"""

from __future__ import annotations

import ctypes

from kernel_iface._ioc import _IO, _IOR, _IOW, _IOWR


def bit(n: int) -> int:
    """The mask of bit number `n` (the feature macros, VIRTIO_F_* and VHOST_BACKEND_F_*, are bit numbers)."""
    return 1 << n

# --------------------------------------------------------------------------------------------------
# Structures (vhost_types.h). Host byte order: the vhost uapi is native-endian, unlike the rings.
# --------------------------------------------------------------------------------------------------


class vhost_vring_state(ctypes.Structure):
    """struct vhost_vring_state {
        unsigned int index;
        unsigned int num;
    };
    """

    _fields_ = [("index", ctypes.c_uint), ("num", ctypes.c_uint)]


class vhost_vring_file(ctypes.Structure):
    """struct vhost_vring_file {
        unsigned int index;
        int fd; /* Pass -1 to unbind from file. */
    };
    """

    _fields_ = [("index", ctypes.c_uint), ("fd", ctypes.c_int)]


class vhost_vring_addr(ctypes.Structure):
    """struct vhost_vring_addr {
        unsigned int index;
        unsigned int flags;             /* VHOST_VRING_F_LOG */
        __u64 desc_user_addr;
        __u64 used_user_addr;
        __u64 avail_user_addr;
        __u64 log_guest_addr;
    };
    """

    _fields_ = [
        ("index", ctypes.c_uint),
        ("flags", ctypes.c_uint),
        ("desc_user_addr", ctypes.c_uint64),
        ("used_user_addr", ctypes.c_uint64),
        ("avail_user_addr", ctypes.c_uint64),
        ("log_guest_addr", ctypes.c_uint64),
    ]


class vhost_iotlb_msg(ctypes.Structure):
    """/* no alignment requirement */
    struct vhost_iotlb_msg {
        __u64 iova;
        __u64 size;
        __u64 uaddr;
        __u8 perm;      /* VHOST_ACCESS_RO / _WO / _RW */
        __u8 type;      /* VHOST_IOTLB_MISS ... VHOST_IOTLB_BATCH_END */
    };
    """

    _fields_ = [
        ("iova", ctypes.c_uint64),
        ("size", ctypes.c_uint64),
        ("uaddr", ctypes.c_uint64),
        ("perm", ctypes.c_uint8),
        ("type", ctypes.c_uint8),
    ]


class _vhost_msg_payload(ctypes.Union):
    # The anonymous union of struct vhost_msg / vhost_msg_v2; padding fixes the message at 64 bytes.
    _fields_ = [("iotlb", vhost_iotlb_msg), ("padding", ctypes.c_uint8 * 64)]


class vhost_msg(ctypes.Structure):
    """struct vhost_msg {
        int type;
        union {
            struct vhost_iotlb_msg iotlb;
            __u8 padding[64];
        };
    };
    """

    _anonymous_ = ("_u",)
    _fields_ = [("type", ctypes.c_int), ("_u", _vhost_msg_payload)]


class vhost_msg_v2(ctypes.Structure):
    """struct vhost_msg_v2 {
        __u32 type;
        __u32 asid;
        union {
            struct vhost_iotlb_msg iotlb;
            __u8 padding[64];
        };
    };
    """

    _anonymous_ = ("_u",)
    _fields_ = [("type", ctypes.c_uint32), ("asid", ctypes.c_uint32), ("_u", _vhost_msg_payload)]


class vhost_memory_region(ctypes.Structure):
    """struct vhost_memory_region {
        __u64 guest_phys_addr;
        __u64 memory_size; /* bytes */
        __u64 userspace_addr;
        __u64 flags_padding; /* No flags are currently specified. */
    };
    """

    _fields_ = [
        ("guest_phys_addr", ctypes.c_uint64),
        ("memory_size", ctypes.c_uint64),
        ("userspace_addr", ctypes.c_uint64),
        ("flags_padding", ctypes.c_uint64),
    ]


class vhost_memory(ctypes.Structure):
    """struct vhost_memory {
        __u32 nregions;
        __u32 padding;
        struct vhost_memory_region regions[];
    };
    """

    _fields_ = [
        ("nregions", ctypes.c_uint32),
        ("padding", ctypes.c_uint32),
        ("regions", vhost_memory_region * 0),
    ]


class vhost_vdpa_config(ctypes.Structure):
    """struct vhost_vdpa_config {
        __u32 off;
        __u32 len;
        __u8 buf[];
    };

    Only the header: the payload follows it in the same buffer (see VhostVdpa.get_config).
    """

    _fields_ = [("off", ctypes.c_uint32), ("len", ctypes.c_uint32), ("buf", ctypes.c_uint8 * 0)]


class vhost_vdpa_iova_range(ctypes.Structure):
    """struct vhost_vdpa_iova_range {
        __u64 first;
        __u64 last;     /* inclusive */
    };
    """

    _fields_ = [("first", ctypes.c_uint64), ("last", ctypes.c_uint64)]


class vhost_worker_state(ctypes.Structure):
    """struct vhost_worker_state {      /* since 6.5 */
        unsigned int worker_id;
    };
    """

    _fields_ = [("worker_id", ctypes.c_uint)]


class vhost_vring_worker(ctypes.Structure):
    """struct vhost_vring_worker {      /* since 6.5 */
        unsigned int index;
        unsigned int worker_id;
    };
    """

    _fields_ = [("index", ctypes.c_uint), ("worker_id", ctypes.c_uint)]


class vhost_features_array(ctypes.Structure):
    """struct vhost_features_array {    /* since 6.17 */
        __u64 count; /* number of entries present in features array */
        __u64 features[];
    };
    """

    _fields_ = [("count", ctypes.c_uint64), ("features", ctypes.c_uint64 * 0)]


# --------------------------------------------------------------------------------------------------
# vhost.h: generic vhost ioctls
# --------------------------------------------------------------------------------------------------

VHOST_VIRTIO = 0xAF
VHOST_FILE_UNBIND = -1
VHOST_PAGE_SIZE = 0x1000

VHOST_GET_FEATURES = _IOR(VHOST_VIRTIO, 0x00, ctypes.c_uint64)
VHOST_SET_FEATURES = _IOW(VHOST_VIRTIO, 0x00, ctypes.c_uint64)
VHOST_SET_OWNER = _IO(VHOST_VIRTIO, 0x01)
VHOST_RESET_OWNER = _IO(VHOST_VIRTIO, 0x02)
VHOST_SET_MEM_TABLE = _IOW(VHOST_VIRTIO, 0x03, vhost_memory)
VHOST_SET_LOG_BASE = _IOW(VHOST_VIRTIO, 0x04, ctypes.c_uint64)
VHOST_SET_LOG_FD = _IOW(VHOST_VIRTIO, 0x07, ctypes.c_int)
VHOST_NEW_WORKER = _IOR(VHOST_VIRTIO, 0x08, vhost_worker_state)  # 6.5
VHOST_FREE_WORKER = _IOW(VHOST_VIRTIO, 0x09, vhost_worker_state)  # 6.5

VHOST_SET_VRING_NUM = _IOW(VHOST_VIRTIO, 0x10, vhost_vring_state)
VHOST_SET_VRING_ADDR = _IOW(VHOST_VIRTIO, 0x11, vhost_vring_addr)
VHOST_SET_VRING_BASE = _IOW(VHOST_VIRTIO, 0x12, vhost_vring_state)
VHOST_GET_VRING_BASE = _IOWR(VHOST_VIRTIO, 0x12, vhost_vring_state)

VHOST_VRING_LITTLE_ENDIAN = 0
VHOST_VRING_BIG_ENDIAN = 1
VHOST_SET_VRING_ENDIAN = _IOW(VHOST_VIRTIO, 0x13, vhost_vring_state)
# The kernel declares GET_VRING_ENDIAN (and GET_VRING_BUSYLOOP_TIMEOUT) with _IOW although the kernel
# writes the answer; the number is what matters, so keep the kernel's encoding.
VHOST_GET_VRING_ENDIAN = _IOW(VHOST_VIRTIO, 0x14, vhost_vring_state)
VHOST_ATTACH_VRING_WORKER = _IOW(VHOST_VIRTIO, 0x15, vhost_vring_worker)  # 6.5
VHOST_GET_VRING_WORKER = _IOWR(VHOST_VIRTIO, 0x16, vhost_vring_worker)  # 6.5

VHOST_SET_VRING_KICK = _IOW(VHOST_VIRTIO, 0x20, vhost_vring_file)
VHOST_SET_VRING_CALL = _IOW(VHOST_VIRTIO, 0x21, vhost_vring_file)
VHOST_SET_VRING_ERR = _IOW(VHOST_VIRTIO, 0x22, vhost_vring_file)
VHOST_SET_VRING_BUSYLOOP_TIMEOUT = _IOW(VHOST_VIRTIO, 0x23, vhost_vring_state)
VHOST_GET_VRING_BUSYLOOP_TIMEOUT = _IOW(VHOST_VIRTIO, 0x24, vhost_vring_state)

VHOST_SET_BACKEND_FEATURES = _IOW(VHOST_VIRTIO, 0x25, ctypes.c_uint64)
VHOST_GET_BACKEND_FEATURES = _IOR(VHOST_VIRTIO, 0x26, ctypes.c_uint64)

VHOST_GET_FEATURES_ARRAY = _IOR(VHOST_VIRTIO, 0x83, vhost_features_array)  # 6.17
VHOST_SET_FEATURES_ARRAY = _IOW(VHOST_VIRTIO, 0x83, vhost_features_array)  # 6.17
VHOST_FORK_OWNER_KTHREAD = 0  # 6.17
VHOST_FORK_OWNER_TASK = 1  # 6.17
VHOST_SET_FORK_FROM_OWNER = _IOW(VHOST_VIRTIO, 0x84, ctypes.c_uint8)  # 6.17
VHOST_GET_FORK_FROM_OWNER = _IOR(VHOST_VIRTIO, 0x85, ctypes.c_uint8)  # 6.17

# --------------------------------------------------------------------------------------------------
# vhost.h: vhost-vdpa ioctls
# --------------------------------------------------------------------------------------------------

VHOST_VDPA_GET_DEVICE_ID = _IOR(VHOST_VIRTIO, 0x70, ctypes.c_uint32)
VHOST_VDPA_GET_STATUS = _IOR(VHOST_VIRTIO, 0x71, ctypes.c_uint8)
VHOST_VDPA_SET_STATUS = _IOW(VHOST_VIRTIO, 0x72, ctypes.c_uint8)
VHOST_VDPA_GET_CONFIG = _IOR(VHOST_VIRTIO, 0x73, vhost_vdpa_config)
VHOST_VDPA_SET_CONFIG = _IOW(VHOST_VIRTIO, 0x74, vhost_vdpa_config)
VHOST_VDPA_SET_VRING_ENABLE = _IOW(VHOST_VIRTIO, 0x75, vhost_vring_state)
VHOST_VDPA_GET_VRING_NUM = _IOR(VHOST_VIRTIO, 0x76, ctypes.c_uint16)
VHOST_VDPA_SET_CONFIG_CALL = _IOW(VHOST_VIRTIO, 0x77, ctypes.c_int)
VHOST_VDPA_GET_IOVA_RANGE = _IOR(VHOST_VIRTIO, 0x78, vhost_vdpa_iova_range)
VHOST_VDPA_GET_CONFIG_SIZE = _IOR(VHOST_VIRTIO, 0x79, ctypes.c_uint32)
VHOST_VDPA_GET_AS_NUM = _IOR(VHOST_VIRTIO, 0x7A, ctypes.c_uint)
VHOST_VDPA_GET_VRING_GROUP = _IOWR(VHOST_VIRTIO, 0x7B, vhost_vring_state)
VHOST_VDPA_SET_GROUP_ASID = _IOW(VHOST_VIRTIO, 0x7C, vhost_vring_state)
VHOST_VDPA_SUSPEND = _IO(VHOST_VIRTIO, 0x7D)
VHOST_VDPA_RESUME = _IO(VHOST_VIRTIO, 0x7E)  # 6.3
VHOST_VDPA_GET_VRING_DESC_GROUP = _IOWR(VHOST_VIRTIO, 0x7F, vhost_vring_state)  # 6.7
VHOST_VDPA_GET_VQS_COUNT = _IOR(VHOST_VIRTIO, 0x80, ctypes.c_uint32)
VHOST_VDPA_GET_GROUP_NUM = _IOR(VHOST_VIRTIO, 0x81, ctypes.c_uint32)
VHOST_VDPA_GET_VRING_SIZE = _IOWR(VHOST_VIRTIO, 0x82, vhost_vring_state)  # 6.9

# --------------------------------------------------------------------------------------------------
# vhost_types.h: IOTLB messages, feature bits
# --------------------------------------------------------------------------------------------------

VHOST_ACCESS_RO = 0x1
VHOST_ACCESS_WO = 0x2
VHOST_ACCESS_RW = 0x3

VHOST_IOTLB_MISS = 1
VHOST_IOTLB_UPDATE = 2
VHOST_IOTLB_INVALIDATE = 3
VHOST_IOTLB_ACCESS_FAIL = 4
VHOST_IOTLB_BATCH_BEGIN = 5
VHOST_IOTLB_BATCH_END = 6

VHOST_IOTLB_MSG = 0x1
VHOST_IOTLB_MSG_V2 = 0x2

VHOST_VRING_F_LOG = 0
VHOST_F_LOG_ALL = 26
VHOST_NET_F_VIRTIO_NET_HDR = 27

# Backend features are bit numbers, like virtio feature bits (not masks).
VHOST_BACKEND_F_IOTLB_MSG_V2 = 0x1
VHOST_BACKEND_F_IOTLB_BATCH = 0x2
VHOST_BACKEND_F_IOTLB_ASID = 0x3
VHOST_BACKEND_F_SUSPEND = 0x4
VHOST_BACKEND_F_RESUME = 0x5  # 6.3
VHOST_BACKEND_F_ENABLE_AFTER_DRIVER_OK = 0x6  # 6.6
VHOST_BACKEND_F_DESC_ASID = 0x7  # 6.7
VHOST_BACKEND_F_IOTLB_PERSIST = 0x8  # 6.7

# --------------------------------------------------------------------------------------------------
# virtio_config.h: status and transport feature bits
# --------------------------------------------------------------------------------------------------

VIRTIO_CONFIG_S_ACKNOWLEDGE = 1
VIRTIO_CONFIG_S_DRIVER = 2
VIRTIO_CONFIG_S_DRIVER_OK = 4
VIRTIO_CONFIG_S_FEATURES_OK = 8
VIRTIO_CONFIG_S_NEEDS_RESET = 0x40
VIRTIO_CONFIG_S_FAILED = 0x80

VIRTIO_F_NOTIFY_ON_EMPTY = 24
VIRTIO_F_ANY_LAYOUT = 27
VIRTIO_F_VERSION_1 = 32
VIRTIO_F_ACCESS_PLATFORM = 33
VIRTIO_F_IOMMU_PLATFORM = VIRTIO_F_ACCESS_PLATFORM  # legacy alias, kept by the kernel header
VIRTIO_F_RING_PACKED = 34
VIRTIO_F_IN_ORDER = 35
VIRTIO_F_ORDER_PLATFORM = 36
VIRTIO_F_SR_IOV = 37
VIRTIO_F_NOTIFICATION_DATA = 38  # 6.4
VIRTIO_F_NOTIF_CONFIG_DATA = 39  # 6.7
VIRTIO_F_RING_RESET = 40
VIRTIO_F_ADMIN_VQ = 41  # 6.8

# --------------------------------------------------------------------------------------------------
# virtio_ring.h: ring flags. Split flags are masks; the packed ones are bit numbers, as in the header.
# --------------------------------------------------------------------------------------------------

VIRTIO_RING_F_INDIRECT_DESC = 28
VIRTIO_RING_F_EVENT_IDX = 29

VRING_DESC_F_NEXT = 1
VRING_DESC_F_WRITE = 2
VRING_DESC_F_INDIRECT = 4
VRING_AVAIL_F_NO_INTERRUPT = 1
VRING_USED_F_NO_NOTIFY = 1

VRING_PACKED_DESC_F_AVAIL = 7
VRING_PACKED_DESC_F_USED = 15
VRING_PACKED_EVENT_FLAG_ENABLE = 0x0
VRING_PACKED_EVENT_FLAG_DISABLE = 0x1
VRING_PACKED_EVENT_FLAG_DESC = 0x2
VRING_PACKED_EVENT_F_WRAP_CTR = 15

VRING_AVAIL_ALIGN_SIZE = 2
VRING_USED_ALIGN_SIZE = 4
VRING_DESC_ALIGN_SIZE = 16

# --------------------------------------------------------------------------------------------------
# virtio_ids.h, virtio_net.h, virtio_blk.h: just what feature decoding needs
# --------------------------------------------------------------------------------------------------

VIRTIO_ID_NET = 1
VIRTIO_ID_BLOCK = 2

VIRTIO_NET_F_CSUM = 0
VIRTIO_NET_F_GUEST_CSUM = 1
VIRTIO_NET_F_CTRL_GUEST_OFFLOADS = 2
VIRTIO_NET_F_MTU = 3
VIRTIO_NET_F_MAC = 5
VIRTIO_NET_F_GSO = 6
VIRTIO_NET_F_GUEST_TSO4 = 7
VIRTIO_NET_F_GUEST_TSO6 = 8
VIRTIO_NET_F_GUEST_ECN = 9
VIRTIO_NET_F_GUEST_UFO = 10
VIRTIO_NET_F_HOST_TSO4 = 11
VIRTIO_NET_F_HOST_TSO6 = 12
VIRTIO_NET_F_HOST_ECN = 13
VIRTIO_NET_F_HOST_UFO = 14
VIRTIO_NET_F_MRG_RXBUF = 15
VIRTIO_NET_F_STATUS = 16
VIRTIO_NET_F_CTRL_VQ = 17
VIRTIO_NET_F_CTRL_RX = 18
VIRTIO_NET_F_CTRL_VLAN = 19
VIRTIO_NET_F_CTRL_RX_EXTRA = 20
VIRTIO_NET_F_GUEST_ANNOUNCE = 21
VIRTIO_NET_F_MQ = 22
VIRTIO_NET_F_CTRL_MAC_ADDR = 23
VIRTIO_NET_F_NOTF_COAL = 53
VIRTIO_NET_F_GUEST_USO4 = 54  # 6.2
VIRTIO_NET_F_GUEST_USO6 = 55  # 6.2
VIRTIO_NET_F_HOST_USO = 56  # 6.2
VIRTIO_NET_F_HASH_REPORT = 57
VIRTIO_NET_F_RSS = 60

# Control queue commands (VIRTIO 1.2 5.1.6.5, <linux/virtio_net.h>): the ack values, and multiqueue's
# class and command (5.1.6.5.5).
VIRTIO_NET_OK = 0
VIRTIO_NET_ERR = 1
VIRTIO_NET_CTRL_MQ = 4
VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET = 0
VIRTIO_NET_F_RSC_EXT = 61
VIRTIO_NET_F_STANDBY = 62
VIRTIO_NET_F_SPEED_DUPLEX = 63

VIRTIO_BLK_F_BARRIER = 0  # legacy
VIRTIO_BLK_F_SIZE_MAX = 1
VIRTIO_BLK_F_SEG_MAX = 2
VIRTIO_BLK_F_GEOMETRY = 4
VIRTIO_BLK_F_RO = 5
VIRTIO_BLK_F_BLK_SIZE = 6
VIRTIO_BLK_F_SCSI = 7  # legacy
VIRTIO_BLK_F_FLUSH = 9
VIRTIO_BLK_F_TOPOLOGY = 10
VIRTIO_BLK_F_CONFIG_WCE = 11
VIRTIO_BLK_F_MQ = 12
VIRTIO_BLK_F_DISCARD = 13
VIRTIO_BLK_F_WRITE_ZEROES = 14
VIRTIO_BLK_F_LIFETIME = 15  # 6.2
VIRTIO_BLK_F_SECURE_ERASE = 16
VIRTIO_BLK_F_ZONED = 17  # 6.3

# --------------------------------------------------------------------------------------------------
# Decoding helpers (ours): bit number -> kernel name
# --------------------------------------------------------------------------------------------------


def _bit_names(prefix: str, *, skip: tuple[str, ...] = ()) -> dict[int, str]:
    names: dict[int, str] = {}
    for name, value in globals().items():
        if name.startswith(prefix) and isinstance(value, int) and name not in skip:
            names.setdefault(value, name)
    return dict(sorted(names.items()))


# Device-independent bits: transport bits, the two ring bits, and vhost's LOG_ALL (bit 26 is reserved
# for vhost in the virtio feature word).
common_feature_names: dict[int, str] = {
    **_bit_names("VIRTIO_F_", skip=("VIRTIO_F_IOMMU_PLATFORM",)),
    **_bit_names("VIRTIO_RING_F_"),
    VHOST_F_LOG_ALL: "VHOST_F_LOG_ALL",
}
net_feature_names: dict[int, str] = _bit_names("VIRTIO_NET_F_")
blk_feature_names: dict[int, str] = _bit_names("VIRTIO_BLK_F_")
backend_feature_names: dict[int, str] = _bit_names("VHOST_BACKEND_F_")
status_names: dict[int, str] = _bit_names("VIRTIO_CONFIG_S_")  # mask -> name

_device_feature_names: dict[int, dict[int, str]] = {
    VIRTIO_ID_NET: net_feature_names,
    VIRTIO_ID_BLOCK: blk_feature_names,
}


def _decode_bits(bits: int, names: dict[int, str], width: int) -> list[str]:
    if bits < 0 or bits >> width:
        raise ValueError(f"{bits:#x} is not a {width}-bit value")
    return [names.get(bit, f"bit {bit}") for bit in range(width) if bits >> bit & 1]


def decode_features(bits: int, device_id: int | None = None) -> list[str]:
    """Names of the virtio feature bits set in ``bits``, lowest bit first.

    Device-specific bits (0-23 and 41-63) are named only when ``device_id`` says which device type they
    belong to; otherwise, like unknown bits, they come out as ``"bit N"``.
    """
    names = dict(common_feature_names)
    names.update(_device_feature_names.get(device_id, {}) if device_id is not None else {})
    return _decode_bits(bits, names, 64)


def decode_backend_features(bits: int) -> list[str]:
    """Names of the VHOST_BACKEND_F_* bits set in ``bits``."""
    return _decode_bits(bits, backend_feature_names, 64)


def decode_status(status: int) -> list[str]:
    """Names of the VIRTIO_CONFIG_S_* bits set in a device status byte."""
    # status_names is keyed by mask (the header defines masks); _decode_bits wants bit numbers.
    return _decode_bits(status, {mask.bit_length() - 1: name for mask, name in status_names.items()}, 8)
