"""The `vdpa-svq` command line."""

import click

from vdpa_svq import __version__


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="vdpa-svq")
def main() -> None:
    """Shadow virtqueues for vhost-vdpa devices: relay every buffer through rings vdpa-svq owns,
    and log every guest page the device writes, so a VM with a vDPA device can be live-migrated."""


from vdpa_svq.cli.attach import attach  # noqa: E402

main.add_command(attach)
