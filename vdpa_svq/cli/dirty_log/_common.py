"""What show, diff and heatmap share: the FILE argument and the header's description."""

from __future__ import annotations

import sys
import time
from datetime import UTC, datetime
from typing import TYPE_CHECKING

import click

from kernel_iface import uapi
from vdpa_svq.cli._output import human_bytes
from vdpa_svq.cli.errors import UserError
from vdpa_svq.dump import Dump, DumpHeader, read_dump

if TYPE_CHECKING:  # numpy (under PageSet) is loaded when a dump is read, not by every command
    from vdpa_svq.pageset import PageSet

DEVICE_TYPES = {uapi.VIRTIO_ID_NET: "net", uapi.VIRTIO_ID_BLOCK: "blk"}
# --pages lists every run of dirty pages; a crafted (or pathological) dump can hold billions.
MAX_LISTED_RANGES = 1_000_000


def check_listable(file: str, sets: list[PageSet]) -> None:
    """Refuse --pages when the listing would be unreasonably long, before building any of it."""
    total = sum(s.range_count() for s in sets)
    if total > MAX_LISTED_RANGES:
        raise UserError(
            f"{file}: {total} runs of dirty pages, too many to list with --pages (at most {MAX_LISTED_RANGES}); "
            "leave out --pages for the counts"
        )


def dump_argument(name: str = "file", metavar: str = "FILE"):
    # Not click.Path(exists=True): a missing file is the user's error (exit 1, one line, from
    # cli/errors.py), like a damaged one, not a usage error.
    return click.argument(name, metavar=metavar, type=click.Path(dir_okay=True, path_type=str))


def when(t: float) -> str:
    return datetime.fromtimestamp(t, tz=UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def describe_regions(header: DumpHeader) -> str:
    spans = ", ".join(f"{gpa:#x}-{gpa + size - 1:#x}" for gpa, size in sorted(header.regions))
    n = len(header.regions)
    pages = header.memory_size // header.page_size
    return f"{n} region{'s' * (n != 1)}, {human_bytes(header.memory_size)} ({pages} pages): {spans}"


def header_fields(header: DumpHeader) -> list[tuple[str, str]]:
    kind = DEVICE_TYPES.get(header.device_id, "unknown")
    features = uapi.decode_features(header.features, header.device_id)
    backend = uapi.decode_backend_features(header.backend_features)
    return [
        ("device", f"{header.device_path} ({kind}, virtio id {header.device_id})"),
        ("created", f"{when(header.created)} by vdpa-svq {header.tool_version}"),
        ("guest memory", describe_regions(header)),
        ("features", f"{header.features:#018x}\n{' '.join(features) or '(none)'}"),
        ("backend features", f"{header.backend_features:#018x}\n{' '.join(backend) or '(none)'}"),
    ]


def read_with_progress(file: str) -> Dump:
    """read_dump, with a progress bar on a terminal's stderr once the read has taken a second
    (a dump that claims a huge guest takes a while to inflate, even when it is small)."""
    started = time.monotonic()
    bar = None

    def progress(done: int, total: int) -> None:
        nonlocal bar
        if bar is None:
            if not sys.stderr.isatty() or time.monotonic() - started < 1.0:
                return
            bar = click.progressbar(length=total, label=f"reading {file}", file=sys.stderr)
            bar.__enter__()
        bar.update(done - bar.pos)

    try:
        return read_dump(file, progress)
    finally:
        if bar is not None:
            bar.__exit__(None, None, None)
