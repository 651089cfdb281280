"""`vdpa-svq dirty-log ...`: read the dirty-log dumps that vdpa-svq writes (docs/dirty-log-format.md)."""

import click

from vdpa_svq.cli.dirty_log.diff import diff
from vdpa_svq.cli.dirty_log.heatmap import heatmap
from vdpa_svq.cli.dirty_log.show import show


@click.group(name="dirty-log", short_help="Inspect dirty-log dumps: show, diff, heatmap.")
def dirty_log() -> None:
    """Inspect dirty-log dumps: which guest pages the device wrote, sync round by sync round.

    A dump (docs/dirty-log-format.md) holds the guest memory layout, the device and its features,
    and one vhost-format bitmap per sync round, each checked by CRC32.
    """


dirty_log.add_command(show)
dirty_log.add_command(diff)
dirty_log.add_command(heatmap)
