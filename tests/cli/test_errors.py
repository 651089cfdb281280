"""cli/errors.py: every user-facing error is one line with a fixed exit code; a bug keeps its traceback."""

from __future__ import annotations

import errno

import click
import pytest
from click.testing import CliRunner

from kernel_iface.errors import error_from_errno
from vdpa_svq.cli.errors import ErrorMappingGroup, ExitCode, UserError, failure_for
from vdpa_svq.devices import NotAVhostVdpaNode
from vdpa_svq.dump import DumpError
from vdpa_svq.errors import GuestRingError

DEV = "/dev/vhost-vdpa-3"
PICK = "pick a node from `vdpa-svq list`, or soft:net / soft:blk"

CASES = [
    (error_from_errno(errno.ENOENT, "open", DEV), ExitCode.USER, f"{DEV}: no such device node; {PICK}"),
    (
        error_from_errno(errno.ENODEV, "VHOST_GET_FEATURES", DEV),
        ExitCode.USER,
        f"{DEV}: no such device (removed, or not bound to vhost_vdpa); {PICK}",
    ),
    (
        error_from_errno(errno.EACCES, "open", DEV),
        ExitCode.USER,
        f"{DEV}: permission denied opening the device; run as root, or give your user read-write access to "
        "the node (a udev rule, or chmod)",
    ),
    (
        error_from_errno(errno.EBUSY, "open", DEV),
        ExitCode.USER,
        f"{DEV}: device busy: it is already open (by QEMU? another vdpa-svq?) and vhost-vdpa allows one opener; "
        "close it there, or pick another node from `vdpa-svq list`",
    ),
    (
        error_from_errno(errno.EBUSY, "VHOST_SET_OWNER", DEV),
        ExitCode.USER,
        f"{DEV}: device busy: it already has an owner (VHOST_SET_OWNER: EBUSY); close the other user first",
    ),
    (
        error_from_errno(errno.EOPNOTSUPP, "VHOST_VDPA_SUSPEND", DEV),
        ExitCode.DEVICE,
        f"{DEV}: VHOST_VDPA_SUSPEND: not supported by this device (EOPNOTSUPP)",
    ),
    (
        error_from_errno(errno.ENOTTY, "VHOST_VDPA_GET_VRING_SIZE", DEV),
        ExitCode.DEVICE,
        f"{DEV}: VHOST_VDPA_GET_VRING_SIZE: not supported by this kernel's vhost-vdpa (ENOTTY); a newer kernel "
        "may have it",
    ),
    (
        error_from_errno(errno.EIO, "VHOST_VDPA_SET_STATUS", DEV),
        ExitCode.DEVICE,
        f"{DEV}: VHOST_VDPA_SET_STATUS: device I/O error (EIO)",
    ),
    (
        NotAVhostVdpaNode("/dev/null: is not a vhost-vdpa device (x)"),
        ExitCode.USER,
        f"/dev/null: is not a vhost-vdpa device (x); {PICK}",
    ),
    (DumpError("a.vdl", 12, "truncated: ..."), ExitCode.USER, "a.vdl: offset 12: truncated: ..."),
    (
        GuestRingError("vq0", "bad descriptor", 7),
        ExitCode.DEVICE,
        "vq0: guest broke the ring at index 7: bad descriptor",
    ),
    (UserError("x.vdl: no rounds\nsecond line"), ExitCode.USER, "x.vdl: no rounds second line"),
    (
        FileNotFoundError(errno.ENOENT, "No such file or directory", "x.vdl"),
        ExitCode.USER,
        "x.vdl: no such file or directory",
    ),
    (PermissionError(errno.EACCES, "Permission denied", "x.vdl"), ExitCode.USER, "x.vdl: permission denied"),
    (IsADirectoryError(errno.EISDIR, "Is a directory", "/tmp"), ExitCode.USER, "/tmp: is a directory"),
]


IDS = [f"{type(c[0]).__name__}-{i}" for i, c in enumerate(CASES)]


@pytest.mark.parametrize(("exc", "code", "message"), CASES, ids=IDS)
def test_each_error_maps_to_one_line_and_an_exit_code(exc, code, message):
    failure = failure_for(exc)
    assert failure is not None
    assert (failure.exit_code, failure.format_message()) == (code, message)


def test_a_bug_is_not_mapped_and_keeps_its_traceback():
    assert failure_for(RuntimeError("bug")) is None
    assert failure_for(KeyError("bug")) is None

    @click.group(cls=ErrorMappingGroup)
    def cli() -> None:
        pass

    @cli.command()
    def boom() -> None:
        raise RuntimeError("a bug")

    result = CliRunner().invoke(cli, ["boom"])
    assert isinstance(result.exception, RuntimeError)


def test_errors_of_nested_groups_go_through_the_same_table():
    @click.group(cls=ErrorMappingGroup)
    def cli() -> None:
        pass

    @cli.group()
    def sub() -> None:
        pass

    @sub.command()
    def leaf() -> None:
        raise DumpError("d.vdl", 0, "not a dump")

    result = CliRunner().invoke(cli, ["sub", "leaf"])
    assert (result.exit_code, result.stderr) == (ExitCode.USER, "vdpa-svq: d.vdl: offset 0: not a dump\n")


def test_usage_errors_keep_click_exit_code_2():
    from vdpa_svq.cli import main

    result = CliRunner().invoke(main, ["info"])
    assert result.exit_code == ExitCode.USAGE == 2
    assert "Missing argument 'DEV'" in result.stderr
