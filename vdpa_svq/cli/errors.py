"""The one place where the CLI turns an exception into a one-line message and an exit code.

Every command runs inside ``ErrorMappingGroup.invoke`` (the `vdpa-svq` group's class), so a command
just raises: the kernel's typed errors (kernel_iface.errors), vdpa-svq's own (VdpaSvqError, DumpError)
and OSError for files. ``RULES`` says, for each, the exit code and the message; the first rule whose
type matches wins, so subclasses come before their bases. Anything not in the table is a bug in
vdpa-svq and keeps its traceback.

A message names what the command line named (device node or file), says what is wrong, and, when
there is something to do about it, what to do.
"""

from __future__ import annotations

import errno
from collections.abc import Callable
from enum import IntEnum
from typing import Any

import click

from kernel_iface import errors as kerr
from kernel_iface.errors import errno_name
from vdpa_svq.devices import NotAVhostVdpaNode
from vdpa_svq.dump import DumpError
from vdpa_svq.errors import RingError, VdpaSvqError

PROG = "vdpa-svq"


class ExitCode(IntEnum):
    OK = 0
    USER = 1  # what the command line names is missing, not what it should be, in use, or damaged
    USAGE = 2  # a bad option or argument (click's own code for usage errors)
    DEVICE = 3  # the device or the kernel failed an operation that should have worked


class UserError(VdpaSvqError):
    """A mistake found by the CLI itself; the message says what to do about it."""


class RunFailed(VdpaSvqError):
    """A run that went to its end with a failed verdict (data damaged, a queue stopped): the device
    did not do what it should have; the summary printed before says what."""


PICK = "pick a node from `vdpa-svq list`, or soft:net / soft:blk"


def _busy(e: kerr.DeviceBusy) -> str:
    if e.op == kerr.OPEN:
        return (
            f"{e.path}: device busy: it is already open (by QEMU? another vdpa-svq?) and vhost-vdpa allows "
            "one opener; close it there, or pick another node from `vdpa-svq list`"
        )
    if e.op == "VHOST_SET_OWNER":
        return f"{e.path}: device busy: it already has an owner (VHOST_SET_OWNER: EBUSY); close the other user first"
    return f"{e}; the device is in use or running"


def _permission(e: kerr.PermissionDenied) -> str:
    if e.op == kerr.OPEN:
        return (
            f"{e.path}: permission denied opening the device; run as root, or give your user "
            "read-write access to the node (a udev rule, or chmod)"
        )
    return str(e)


def _not_supported(e: kerr.NotSupported) -> str:
    if e.errno in (errno.ENOTTY, kerr.ENOIOCTLCMD):
        name = errno_name(e.errno)
        return f"{e.path}: {e.op}: not supported by this kernel's vhost-vdpa ({name}); a newer kernel may have it"
    return f"{e.path}: {e.op}: not supported by this device ({errno_name(e.errno)})"


def _os_error(e: OSError) -> str:
    cause = (e.strerror or type(e).__name__).lower()
    if e.filename is None:
        return cause
    name = f"{e.filename} -> {e.filename2}" if e.filename2 is not None else str(e.filename)
    return f"{name}: {cause}"


# (exception type, exit code, message). First match wins: keep subclasses above their bases.
RULES: tuple[tuple[type[BaseException], ExitCode, Callable[[Any], str]], ...] = (
    (NotAVhostVdpaNode, ExitCode.USER, lambda e: f"{e}; {PICK}"),
    (kerr.DeviceNotFound, ExitCode.USER, lambda e: f"{e.path}: {e.cause}; {PICK}"),
    (kerr.PermissionDenied, ExitCode.USER, _permission),
    (kerr.DeviceBusy, ExitCode.USER, _busy),
    (kerr.NotSupported, ExitCode.DEVICE, _not_supported),
    (kerr.VdpaError, ExitCode.DEVICE, str),  # "<path>: <op>: <cause> (<ERRNO>)"
    (DumpError, ExitCode.USER, str),  # "<file>: offset <n>: <what is wrong>"
    (RingError, ExitCode.DEVICE, str),
    (RunFailed, ExitCode.DEVICE, str),
    (VdpaSvqError, ExitCode.USER, str),
    (OSError, ExitCode.USER, _os_error),  # files named on the command line: missing, unreadable, a directory
)

MAPPED: tuple[type[BaseException], ...] = tuple(rule[0] for rule in RULES)


class CliFailure(click.ClickException):
    """What a mapped exception becomes: one line on stderr, then exit with `exit_code`."""

    def __init__(self, message: str, exit_code: int) -> None:
        super().__init__(message)
        self.exit_code = exit_code

    def show(self, file: Any = None) -> None:
        click.echo(f"{PROG}: {self.format_message()}", err=True, file=file)


def failure_for(exc: BaseException) -> CliFailure | None:
    """The message and exit code for `exc`, or None when it is not a user-facing error (a bug)."""
    for exc_type, code, message in RULES:
        if isinstance(exc, exc_type):
            # One line, whatever the exception's text holds.
            return CliFailure(" ".join(message(exc).split()), int(code))
    return None


class ErrorMappingGroup(click.Group):
    """A click group whose commands' (and sub-groups') errors go through RULES."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except MAPPED as e:
            failure = failure_for(e)
            assert failure is not None
            raise failure from e
