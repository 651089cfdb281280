"""Typed errors for the vhost-vdpa uapi. errno is turned into an exception in exactly one place:
``error_from_errno``, driven by the ``ERRNO_TABLE`` below.

Every message is one line: ``<path>: <operation>: <cause> (<ERRNO NAME>)``.
"""

from __future__ import annotations

import errno as _errno
import os

# Kernel-internal errnos (include/linux/errno.h) that still reach userspace from some drivers: vhost
# returns ENOIOCTLCMD for ioctls it does not know, and vp_vdpa's open() fails with ENOTSUPP (524) when
# the device has no IOMMU domain to map into. Python's errno module knows neither.
ENOIOCTLCMD = 515
ENOTSUPP = 524

# The IOTLB is driven by write(2) of struct vhost_msg_v2, not by an ioctl; errors from it are reported
# under the message type's kernel name.
IOTLB_UPDATE = "VHOST_IOTLB_UPDATE"
IOTLB_INVALIDATE = "VHOST_IOTLB_INVALIDATE"
IOTLB_BATCH_BEGIN = "VHOST_IOTLB_BATCH_BEGIN"
IOTLB_BATCH_END = "VHOST_IOTLB_BATCH_END"
OPEN = "open"

_ERRNO_NAMES = {
    ENOIOCTLCMD: "ENOIOCTLCMD",
    ENOTSUPP: "ENOTSUPP",
    # errno.errorcode says ENOTSUP for 95; the kernel (and strace) call it EOPNOTSUPP.
    _errno.EOPNOTSUPP: "EOPNOTSUPP",
}


def errno_name(err: int) -> str:
    return _ERRNO_NAMES.get(err) or _errno.errorcode.get(err) or f"errno {err}"


class VdpaError(OSError):
    """A failed vhost-vdpa operation: ``errno``, ``path`` (device node), ``op`` (ioctl or IOTLB message
    name, or "open") and ``cause`` (what it means for this operation, in words)."""

    def __init__(self, err: int, path: str, op: str, cause: str, detail: str | None = None) -> None:
        super().__init__(err, cause, path)
        self.path = path
        self.op = op
        self.cause = cause
        self.detail = detail

    def __str__(self) -> str:
        extra = f"; {self.detail}" if self.detail else ""
        return f"{self.path}: {self.op}: {self.cause}{extra} ({errno_name(self.errno)})"

    def __reduce__(self):  # keep pickling (multiprocessing, pytest-xdist) working with the extra fields
        return (type(self), (self.errno, self.path, self.op, self.cause, self.detail))


class DeviceNotFound(VdpaError):
    """The node does not exist, or the vdpa device behind it is gone."""


class PermissionDenied(VdpaError):
    """No access to the node, or the fd is not the owner (VHOST_SET_OWNER was not called)."""


class DeviceBusy(VdpaError):
    """vhost-vdpa allows one opener; or the owner is already set; or the ring is running."""


class NotSupported(VdpaError):
    """Not a vhost-vdpa device, or this device/kernel does not implement the operation."""


class InvalidArgument(VdpaError):
    """The kernel rejected an argument (index out of range, feature not offered, bad state)."""


class IovaOverlap(VdpaError):
    """An IOTLB update overlaps a mapping that already exists in that address space."""


class IovaOutOfRange(VdpaError):
    """An IOTLB update falls outside VHOST_VDPA_GET_IOVA_RANGE (or is empty, or wraps)."""


class IotlbRejected(VdpaError):
    """The kernel refused an IOTLB message without saying why (vhost reports every failure as EFAULT)."""


class ShortWrite(VdpaError):
    """write(2) of an IOTLB message consumed fewer bytes than the message."""


_NOT_VDPA = "not a vhost-vdpa device or operation unsupported"
_IOTLB_OPS = (IOTLB_UPDATE, IOTLB_INVALIDATE, IOTLB_BATCH_BEGIN, IOTLB_BATCH_END)

# (errno, operation or None for "any operation") -> (exception class, cause). The specific row wins.
ERRNO_TABLE: dict[tuple[int, str | None], tuple[type[VdpaError], str]] = {
    (_errno.ENOENT, None): (DeviceNotFound, "no such device node"),
    (_errno.ENODEV, None): (DeviceNotFound, "no such device (removed, or not bound to vhost_vdpa)"),
    (_errno.ENXIO, None): (DeviceNotFound, "no such device (removed, or not bound to vhost_vdpa)"),
    (_errno.EACCES, None): (PermissionDenied, "permission denied"),
    (_errno.EPERM, None): (PermissionDenied, "operation not permitted (is this fd the owner? call set_owner)"),
    (_errno.EPERM, OPEN): (PermissionDenied, "operation not permitted"),
    (_errno.EBUSY, None): (DeviceBusy, "device or resource busy"),
    (_errno.EBUSY, OPEN): (DeviceBusy, "device busy (vhost-vdpa allows a single opener)"),
    (_errno.EBUSY, "VHOST_SET_OWNER"): (DeviceBusy, "owner already set on this fd"),
    (_errno.EOPNOTSUPP, None): (NotSupported, "operation not supported by this device"),
    (ENOTSUPP, None): (NotSupported, "operation not supported by this device"),
    (ENOTSUPP, OPEN): (
        NotSupported,
        "device cannot be used through vhost-vdpa (no IOMMU domain? vp_vdpa needs a vIOMMU)",
    ),
    (ENOIOCTLCMD, None): (NotSupported, _NOT_VDPA),
    (_errno.ENOTTY, None): (NotSupported, _NOT_VDPA),
    (_errno.EINVAL, None): (InvalidArgument, "invalid argument"),
    (_errno.E2BIG, None): (InvalidArgument, "range larger than the device's config space"),
    (_errno.EFAULT, None): (VdpaError, "bad address"),
    (_errno.ENOMEM, None): (VdpaError, "out of memory (or RLIMIT_MEMLOCK too low to pin the pages)"),
    (_errno.EIO, None): (VdpaError, "device I/O error"),
    (_errno.EEXIST, IOTLB_UPDATE): (IovaOverlap, "IOVA range overlaps an existing mapping"),
    (_errno.EINVAL, IOTLB_UPDATE): (IovaOutOfRange, "IOVA range outside the device's IOVA range"),
    (_errno.EFAULT, IOTLB_UPDATE): (
        IotlbRejected,
        "kernel rejected the mapping (overlap, out of range, not owner or pinning failed: "
        "vhost reports them all as EFAULT)",
    ),
}
# Same EFAULT collapse for every IOTLB message type.
for _op in (IOTLB_INVALIDATE, IOTLB_BATCH_BEGIN, IOTLB_BATCH_END):
    ERRNO_TABLE[(_errno.EFAULT, _op)] = (
        IotlbRejected,
        "kernel rejected the IOTLB message (vhost reports every failure as EFAULT)",
    )
del _op


def error_from_errno(err: int, op: str, path: str, detail: str | None = None) -> VdpaError:
    """The one errno -> exception mapping. ``op`` is the ioctl's kernel name, an IOTLB message type
    name (VHOST_IOTLB_UPDATE...) or "open"; ``detail`` adds the arguments that made it fail."""
    cls, cause = ERRNO_TABLE.get((err, op)) or ERRNO_TABLE.get((err, None)) or (VdpaError, os.strerror(err))
    return cls(err, path, op, cause, detail)


def short_write(path: str, op: str, written: int, expected: int) -> ShortWrite:
    """A write(2) that took fewer bytes than the message: no errno, so it is not in the table."""
    return ShortWrite(_errno.EIO, path, op, f"short write: {written} of {expected} bytes")
