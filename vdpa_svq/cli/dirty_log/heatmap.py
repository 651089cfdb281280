"""`vdpa-svq dirty-log heatmap FILE -o PNG`: where in guest memory each round's writes landed."""

from __future__ import annotations

import os

import click

from vdpa_svq.cli._output import echo_json, json_option
from vdpa_svq.cli.dirty_log._common import dump_argument, read_with_progress
from vdpa_svq.cli.errors import UserError
from vdpa_svq.dump import Dump

DEFAULT_BINS = 256


def heat(dump: Dump, bins: int):
    """(rounds x bins array of the share of each bin's pages dirtied in each round, bin edges).

    The regions are laid back to back (holes between them left out, or a VM with memory above 4 GiB
    would plot mostly holes); edges are page offsets into that concatenation. Counts come from the
    rounds' PageSets (count of pages below each edge), never from whole bitmaps: the work follows
    the bins and the dirty chunks, not the guest size the dump claims.
    """
    import numpy as np

    spans = np.array(dump.header.page_spans(), dtype=np.int64)
    firsts, ends = spans[:, 0], spans[:, 1]
    offsets = np.concatenate(([0], np.cumsum(ends - firsts)))  # where each region starts, back to back
    total = int(offsets[-1])
    bins = max(1, min(bins, total))
    edges = np.linspace(0, total, bins + 1).round().astype(np.int64)
    # Edge e lies in region i (the last one for the final edge), at page firsts[i] + e - offsets[i].
    region = np.minimum(np.searchsorted(offsets, edges, side="right") - 1, len(firsts) - 1)
    edge_pages = firsts[region] + edges - offsets[region]
    rows = []
    for r in dump.rounds:
        below_first = r.pages.counts_below(firsts)
        in_region = r.pages.counts_below(ends) - below_first
        before = np.concatenate(([0], np.cumsum(in_region)))  # dirty pages in the regions before i
        # Dirty pages at back-to-back offsets < edge: whole regions before, plus a part of its own.
        cumulative = before[region] + r.pages.counts_below(edge_pages) - below_first[region]
        rows.append(np.diff(cumulative) / np.diff(edges))
    return np.vstack(rows), edges


def plot(dump: Dump, output: str, bins: int) -> dict:
    from matplotlib.figure import Figure  # Agg canvas, no pyplot state, no display needed

    h = dump.header
    matrix, edges = heat(dump, bins)
    nrounds, total = len(dump.rounds), int(edges[-1])
    fig = Figure(figsize=(11, max(3.0, min(12.0, 1.5 + 0.25 * nrounds))), layout="constrained")
    ax = fig.add_subplot()
    image = ax.imshow(
        matrix, aspect="auto", interpolation="nearest", cmap="inferno", vmin=0.0, vmax=1.0,
        extent=(0, total, nrounds + 0.5, 0.5),
    )
    fig.colorbar(image, ax=ax, label="share of the bin's pages dirtied")
    starts, offset = [], 0
    for first, end in h.page_spans():
        starts.append((offset, first * h.page_size))
        offset += end - first
    ax.set_xticks([o for o, _ in starts], [f"{gpa:#x}" for _, gpa in starts])
    for o, _ in starts[1:]:
        ax.axvline(o, color="white", linewidth=0.8, linestyle="--")
    nbins = len(edges) - 1
    per_bin = f"{total // nbins}" if total % nbins == 0 else f"~{total / nbins:.1f}"
    ax.set_xlabel(f"guest memory, regions back to back (ticks: region GPAs; {per_bin} pages per bin)")
    ax.set_ylabel("sync round")
    if nrounds <= 20:
        ax.set_yticks(range(1, nrounds + 1))
    ax.set_title(f"{os.path.basename(dump.path)}: {h.device_path}, {nrounds} rounds, {dump.dirty_total} dirty pages")
    fig.savefig(output, format="png", dpi=100)
    return {"file": dump.path, "output": output, "rounds": nrounds, "bins": len(edges) - 1, "pages": total}


@click.command(short_help="Draw a dump as a PNG heatmap: rounds x guest memory.")
@dump_argument()
@click.option("-o", "--output", required=True, metavar="PNG", type=click.Path(dir_okay=False, path_type=str),
              help="Where to write the PNG image.")
@click.option("--bins", default=DEFAULT_BINS, show_default=True, type=click.IntRange(1, 65536),
              help="How many columns guest memory is cut into.")
@json_option
def heatmap(file: str, output: str, bins: int, as_json: bool) -> None:
    """Draw a heatmap of a dump as a PNG: one row per sync round, guest memory from left to right
    (cut into --bins columns, the regions laid back to back), the colour the share of each column's
    pages dirtied in that round. Shows whether writes stay in a few buffers or sweep memory.

    \b
    Example:
      vdpa-svq dirty-log heatmap run.vdl -o run.png
    """
    dump = read_with_progress(file)
    if not dump.rounds:
        raise UserError(f"{file}: the dump has no rounds, so there is nothing to plot")
    result = plot(dump, output, bins)
    if as_json:
        echo_json(result)
    else:
        click.echo(f"wrote {output}: {result['rounds']} rounds x {result['bins']} bins over {result['pages']} pages")
