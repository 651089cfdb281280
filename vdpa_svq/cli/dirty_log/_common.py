"""What show, diff and heatmap share: the FILE argument and the header's description."""

from __future__ import annotations

from datetime import UTC, datetime

import click

from kernel_iface import uapi
from vdpa_svq.cli._output import human_bytes
from vdpa_svq.dump import DumpHeader

DEVICE_TYPES = {uapi.VIRTIO_ID_NET: "net", uapi.VIRTIO_ID_BLOCK: "blk"}


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
