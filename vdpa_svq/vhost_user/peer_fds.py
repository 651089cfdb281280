"""What a frontend's file descriptors must be, checked before the backend uses one.

A frontend is untrusted, and so are the fds it sends: a "kick eventfd" may be a pipe that blocks
our writes, a socket that hangs up, or a file epoll cannot watch; a memory file may be on a
filesystem whose page faults block forever (FUSE), or shrink under the relay (SIGBUS). Each fd
is checked for what it must be when it arrives, so that a bad one ends its own connection with
a reason, before the relay loop or the message thread can be hurt by it.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import os
import stat

from vdpa_svq.errors import VdpaSvqError

TMPFS_MAGIC = 0x01021994  # memfd_create's files live here too, and /dev/shm
HUGETLBFS_MAGIC = 0x958458F6


class PeerFdError(VdpaSvqError):
    """A file descriptor from the peer is not what its message says it is."""


def fd_kind(fd: int) -> str:
    """What the fd is, in the kernel's words: "eventfd", "pipe", "socket", "memfd:NAME", a path."""
    try:
        target = os.readlink(f"/proc/self/fd/{fd}")
    except OSError as e:
        return f"unknown ({e.strerror})"
    if target.startswith("anon_inode:"):
        return target.removeprefix("anon_inode:").strip("[]")
    if target.startswith(("pipe:", "socket:")):
        return target.split(":", 1)[0]
    if target.startswith("/memfd:"):  # "/memfd:NAME (deleted)": a memfd never had a path
        return "memfd:" + target.removeprefix("/memfd:").removesuffix(" (deleted)")
    return target


def take_eventfd(fd: int, what: str) -> int:
    """`fd` if it is an eventfd, made non-blocking; else PeerFdError.

    Non-blocking because a peer can park its counter at the maximum: a blocking write would then
    wait forever in the relay's thread. EAGAIN on write means "already signalled" (see
    loop.signal_eventfd). O_NONBLOCK is a flag of the open file, shared with the peer: harmless for
    an eventfd, which QEMU and DPDK open non-blocking anyway.
    """
    kind = fd_kind(fd)
    if kind != "eventfd":
        raise PeerFdError(f"{what}: the fd is a {kind}, not an eventfd")
    flags = fcntl.fcntl(fd, fcntl.F_GETFL)
    fcntl.fcntl(fd, fcntl.F_SETFL, flags | os.O_NONBLOCK)
    return fd


class _Statfs(ctypes.Structure):
    _fields_ = [("f_type", ctypes.c_long), ("f_bsize", ctypes.c_long), ("_rest", ctypes.c_long * 14)]


_libc = ctypes.CDLL(None, use_errno=True)


def _fstatfs(fd: int) -> _Statfs:
    buf = _Statfs()
    if _libc.fstatfs(fd, ctypes.byref(buf)) < 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))
    return buf


def check_memory_fd(fd: int, offset: int, size: int, what: str) -> tuple[bool, int]:
    """Check a memory file from the peer before mapping [offset, offset+size) of it.

    It must be a regular file in memory (a memfd, tmpfs or hugetlbfs: page faults on anything
    else may block on I/O, or forever on FUSE), long enough for the mapping. Returns
    (shrinkable, page size): unless a memfd is sealed against shrinking, the peer can truncate
    the file under us, and it must be mapped SIGBUS-safe (GuestMemory.add_region's shrinkable).
    """
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        raise PeerFdError(f"{what}: the fd is a {fd_kind(fd)}, not a memory file")
    fs = _fstatfs(fd)
    if fs.f_type not in (TMPFS_MAGIC, HUGETLBFS_MAGIC):
        raise PeerFdError(f"{what}: {fd_kind(fd)} is not in memory (filesystem {fs.f_type:#x}; "
                          "use a memfd, tmpfs or hugetlbfs file)")
    if offset + size > st.st_size:
        raise PeerFdError(f"{what}: {size:#x} bytes at offset {offset:#x}, past the end of its "
                          f"{st.st_size:#x}-byte file")
    page = fs.f_bsize if fs.f_type == HUGETLBFS_MAGIC else os.sysconf("SC_PAGE_SIZE")
    return not _sealed_against_shrinking(fd), page


def _sealed_against_shrinking(fd: int) -> bool:
    """F_SEAL_SHRINK is set (QEMU seals its memfd memory backend so by default). We do not add
    the seal ourselves: the file is the frontend's, and it may have reasons to resize it."""
    try:
        return bool(fcntl.fcntl(fd, fcntl.F_GET_SEALS) & fcntl.F_SEAL_SHRINK)
    except OSError as e:
        if e.errno == errno.EINVAL:  # not a memfd: no seals at all
            return False
        raise
