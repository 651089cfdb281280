"""The single place where an ioctl is issued. Everything in kernel_iface calls ``_ioctl``."""

from __future__ import annotations

import ctypes
import fcntl

from kernel_iface._ioc import _IOC_NONE, ioc_decode
from kernel_iface.errors import error_from_errno

# What an ioctl argument may be: a ctypes object or a bytearray the kernel reads and/or writes in place.
IoctlArg = ctypes.Structure | ctypes.Union | ctypes._SimpleCData | ctypes.Array | bytearray


def _ioctl(fd: int, path: str, name: str, request: int, arg: IoctlArg | None = None) -> None:
    """Issue ``request`` (kernel name ``name``) on ``fd``; the kernel's answer lands in ``arg``.

    An errno becomes the typed VdpaError for (errno, name, path). The buffer is checked against the
    size encoded in the request first: a short buffer would let the kernel read or write past it.
    """
    encoded = ioc_decode(request)
    if arg is None:
        if encoded.direction != _IOC_NONE:
            raise TypeError(f"{name} takes a {encoded.size}-byte argument")
        buf: IoctlArg | int = 0
    else:
        size = len(arg) if isinstance(arg, bytearray) else ctypes.sizeof(arg)
        if size < encoded.size:
            raise ValueError(f"{name}: argument is {size} bytes, the request encodes {encoded.size}")
        buf = arg
    try:
        # mutate_flag=True: the kernel's writes are copied back into ``arg``.
        fcntl.ioctl(fd, request, buf, True)
    except OSError as e:
        raise error_from_errno(e.errno, name, path) from None
