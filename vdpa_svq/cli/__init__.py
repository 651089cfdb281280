"""The `vdpa-svq` command line. One module per command; this file only wires them up.

Errors: commands raise, and cli/errors.py (the group's class) turns exceptions into one-line
messages and exit codes.
"""

import click

from vdpa_svq import __version__
from vdpa_svq.cli.errors import ErrorMappingGroup


@click.group(cls=ErrorMappingGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="vdpa-svq")
def main() -> None:
    """Shadow virtqueues for vhost-vdpa devices: relay every buffer through rings vdpa-svq owns,
    and log every guest page the device writes, so a VM with a vDPA device can be live-migrated."""


from vdpa_svq.cli.attach import attach  # noqa: E402
from vdpa_svq.cli.dirty_log import dirty_log  # noqa: E402
from vdpa_svq.cli.info import info  # noqa: E402
from vdpa_svq.cli.list import list_devices  # noqa: E402
from vdpa_svq.cli.serve import serve  # noqa: E402

main.add_command(attach)
main.add_command(list_devices)
main.add_command(info)
main.add_command(dirty_log)
main.add_command(serve)
