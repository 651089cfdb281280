"""ioctl request encoding, as <asm-generic/ioctl.h> builds it (x86_64, arm64, riscv and every arch without
its own asm/ioctl.h): ``dir << 30 | size << 16 | type << 8 | nr``.

Sizes are taken from ctypes types, so a request number is always derived from the same struct the call
passes, never pasted as hex.
"""

from __future__ import annotations

import ctypes
from typing import NamedTuple

_IOC_NRBITS = 8
_IOC_TYPEBITS = 8
_IOC_SIZEBITS = 14
_IOC_DIRBITS = 2

_IOC_NRSHIFT = 0
_IOC_TYPESHIFT = _IOC_NRSHIFT + _IOC_NRBITS
_IOC_SIZESHIFT = _IOC_TYPESHIFT + _IOC_TYPEBITS
_IOC_DIRSHIFT = _IOC_SIZESHIFT + _IOC_SIZEBITS

# Direction is seen from userspace: WRITE means the kernel reads the argument.
_IOC_NONE = 0
_IOC_WRITE = 1
_IOC_READ = 2

# A byte count, or the ctypes type whose sizeof() the kernel macro would take.
SizeLike = int | type[ctypes.Structure] | type[ctypes.Union] | type[ctypes._SimpleCData]


def _sizeof(size: SizeLike) -> int:
    return size if isinstance(size, int) else ctypes.sizeof(size)


def _IOC(direction: int, type_: int, nr: int, size: SizeLike) -> int:
    size = _sizeof(size)
    # The kernel macros silently truncate; an out-of-range field here would be a wrong request number.
    for name, value, bits in (
        ("dir", direction, _IOC_DIRBITS),
        ("type", type_, _IOC_TYPEBITS),
        ("nr", nr, _IOC_NRBITS),
        ("size", size, _IOC_SIZEBITS),
    ):
        if not 0 <= value < (1 << bits):
            raise ValueError(f"ioctl {name} {value:#x} does not fit in {bits} bits")
    return (
        (direction << _IOC_DIRSHIFT)
        | (type_ << _IOC_TYPESHIFT)
        | (nr << _IOC_NRSHIFT)
        | (size << _IOC_SIZESHIFT)
    )


def _IO(type_: int, nr: int) -> int:
    return _IOC(_IOC_NONE, type_, nr, 0)


def _IOR(type_: int, nr: int, size: SizeLike) -> int:
    return _IOC(_IOC_READ, type_, nr, size)


def _IOW(type_: int, nr: int, size: SizeLike) -> int:
    return _IOC(_IOC_WRITE, type_, nr, size)


def _IOWR(type_: int, nr: int, size: SizeLike) -> int:
    return _IOC(_IOC_READ | _IOC_WRITE, type_, nr, size)


class IocFields(NamedTuple):
    direction: int
    type: int
    nr: int
    size: int


def ioc_decode(request: int) -> IocFields:
    """Split a request number back into its fields (for messages and tests)."""
    return IocFields(
        direction=(request >> _IOC_DIRSHIFT) & ((1 << _IOC_DIRBITS) - 1),
        type=(request >> _IOC_TYPESHIFT) & ((1 << _IOC_TYPEBITS) - 1),
        nr=(request >> _IOC_NRSHIFT) & ((1 << _IOC_NRBITS) - 1),
        size=(request >> _IOC_SIZESHIFT) & ((1 << _IOC_SIZEBITS) - 1),
    )
