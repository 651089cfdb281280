"""peer_fds: each fd a frontend sends is checked for what its message says it is."""

from __future__ import annotations

import faulthandler
import fcntl
import os
import socket
import sys

import pytest

from vdpa_svq.loop import signal_eventfd
from vdpa_svq.vhost_user.peer_fds import PeerFdError, check_memory_fd, fd_kind, take_eventfd

EVENTFD_MAX = 0xFFFF_FFFF_FFFF_FFFE  # the highest count an eventfd holds; one more write blocks


@pytest.fixture
def fds():
    opened: list[int] = []
    yield opened
    for fd in opened:
        os.close(fd)


def test_an_eventfd_is_taken_and_made_non_blocking(fds):
    fd = os.eventfd(0)  # blocking, as a careless (or hostile) frontend sends it
    fds.append(fd)
    assert take_eventfd(fd, "SET_VRING_CALL: queue 0") == fd
    assert fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_NONBLOCK


def test_a_saturated_eventfd_is_signalled_without_blocking(fds):
    """A peer that parks its call eventfd at the maximum count must not stop the relay's thread."""
    fd = os.eventfd(0)
    fds.append(fd)
    os.eventfd_write(fd, EVENTFD_MAX)
    take_eventfd(fd, "call")
    faulthandler.dump_traceback_later(10, exit=True)  # a blocking write would hang the test run
    try:
        for _ in range(3):
            signal_eventfd(fd)
    finally:
        faulthandler.cancel_dump_traceback_later()
    assert os.eventfd_read(fd) == EVENTFD_MAX


def test_what_is_not_an_eventfd_is_refused_by_name(fds):
    r, w = os.pipe()
    a, b = socket.socketpair()
    memfd = os.memfd_create("guest-ram")
    fds.extend([r, w, a.detach(), b.detach(), memfd])
    for fd, kind in ((w, "pipe"), (fds[2], "socket"), (memfd, "memfd:guest-ram")):
        with pytest.raises(PeerFdError) as e:
            take_eventfd(fd, "SET_VRING_KICK: queue 1")
        assert str(e.value) == f"SET_VRING_KICK: queue 1: the fd is a {kind}, not an eventfd"
        assert fd_kind(fd) == kind


def test_a_memfd_is_shrinkable_unless_sealed(fds):
    plain = os.memfd_create("plain")
    sealed = os.memfd_create("sealed", os.MFD_ALLOW_SEALING)
    fds.extend([plain, sealed])
    for fd in (plain, sealed):
        os.ftruncate(fd, 1 << 20)
    fcntl.fcntl(sealed, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK)
    page = os.sysconf("SC_PAGE_SIZE")
    assert check_memory_fd(plain, 0, 1 << 20, "region 0") == (True, page)
    assert check_memory_fd(sealed, 4096, (1 << 20) - 4096, "region 0") == (False, page)


def test_a_region_past_the_end_of_its_file_is_refused(fds):
    fd = os.memfd_create("small")
    fds.append(fd)
    os.ftruncate(fd, 1 << 16)
    with pytest.raises(PeerFdError, match=r"region 2: 0x10000 bytes at offset 0x1000, past the end of its "
                                          r"0x10000-byte file"):
        check_memory_fd(fd, 0x1000, 0x10000, "region 2")


def test_memory_that_is_not_in_memory_is_refused(fds, tmp_path):
    """A pipe, or a file on a disk filesystem (its page faults may block on I/O, or forever on FUSE)."""
    r, w = os.pipe()
    fds.extend([r, w])
    with pytest.raises(PeerFdError, match="the fd is a pipe, not a memory file"):
        check_memory_fd(r, 0, 4096, "region 0")
    disk = os.open(os.path.realpath(sys.executable), os.O_RDONLY)  # an installed program: not in tmpfs
    fds.append(disk)
    with pytest.raises(PeerFdError, match=r"is not in memory \(filesystem 0x[0-9a-f]+; use a memfd"):
        check_memory_fd(disk, 0, 4096, "region 0")
