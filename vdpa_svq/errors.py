"""Errors of the vdpa-svq library (the kernel's own errors live in kernel_iface.errors)."""

from __future__ import annotations


class VdpaSvqError(Exception):
    """Base of every error vdpa-svq raises on purpose."""


class GuestMemoryError(VdpaSvqError):
    """An access [gpa, gpa+length) that no single guest memory region holds."""

    def __init__(self, gpa: int, length: int, why: str = "outside guest memory") -> None:
        super().__init__(f"guest memory [{gpa:#x}, +{length:#x}): {why}")
        self.gpa = gpa
        self.length = length


class RingError(VdpaSvqError):
    """The other side broke the ring's rules; the queue is marked broken and stops.

    `side` says who broke it: "guest" when we act as the device and read the driver's ring,
    "device" when we act as the driver and read what the device wrote back.
    """

    side = "ring"

    def __init__(self, queue: str, reason: str, index: int | None = None) -> None:
        where = f" at index {index}" if index is not None else ""
        super().__init__(f"{queue}: {self.side} broke the ring{where}: {reason}")
        self.queue = queue
        self.reason = reason
        self.index = index


class GuestRingError(RingError):
    """The driver (guest) side wrote something the spec forbids (seen by our device side)."""

    side = "guest"


class DeviceRingError(RingError):
    """The device side wrote something the spec forbids (seen by our driver side)."""

    side = "device"


class RingFull(VdpaSvqError):
    """Not enough free descriptors to add a chain now; retry after used buffers are reaped."""


class RingBroken(VdpaSvqError):
    """The queue was marked broken by an earlier RingError and refuses further work."""
