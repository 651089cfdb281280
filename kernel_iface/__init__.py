"""The Linux vhost / vhost-vdpa / vdpa uapi, through ctypes, fcntl and mmap only. No policy here."""

# Re-exports: plain imports (noqa: F401 marks them as intended), one statement per module.
from kernel_iface import uapi  # noqa: F401
from kernel_iface.device import PACKED_VRING_BASE_INITIAL, IovaRange, PackedVringBase, VhostVdpa  # noqa: F401
from kernel_iface.errors import (  # noqa: F401
    DeviceBusy,
    DeviceNotFound,
    InvalidArgument,
    IotlbRejected,
    IovaOutOfRange,
    IovaOverlap,
    NotSupported,
    PermissionDenied,
    ShortWrite,
    VdpaError,
    error_from_errno,
)
from kernel_iface.uapi import decode_backend_features, decode_features, decode_status  # noqa: F401
