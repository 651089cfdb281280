"""`vdpa-svq dirty-log show FILE`: the header, each round's dirty pages, and the totals."""

from __future__ import annotations

from typing import Any

import click

from vdpa_svq.cli._output import echo_json, format_ranges, human_bytes, json_option, print_fields, print_table
from vdpa_svq.cli.dirty_log._common import check_listable, dump_argument, header_fields, read_with_progress
from vdpa_svq.dump import Dump


def summary(dump: Dump, with_pages: bool) -> dict[str, Any]:
    h = dump.header
    union = dump.union()
    if with_pages:
        check_listable(dump.path, [*(r.pages for r in dump.rounds), union])
    out: dict[str, Any] = {
        "file": dump.path,
        "header": h.to_json(),
        "rounds": [],
        "totals": {
            "rounds": len(dump.rounds),
            "dirty_total": dump.dirty_total,
            "distinct": len(union),
            "guest_pages": h.memory_size // h.page_size,
        },
    }
    for r in dump.rounds:
        row: dict[str, Any] = {"round": r.number, "time": r.when, "pages": r.count}
        if with_pages:
            row["page_ranges"] = [list(span) for span in r.pages.ranges()]
        out["rounds"].append(row)
    if with_pages:
        out["totals"]["page_ranges"] = [list(span) for span in union.ranges()]
    return out


@click.command(short_help="Show a dump's header, pages per round, and totals.")
@dump_argument()
@click.option("--pages", is_flag=True, help="Also list the dirty page numbers (as ranges) of each round and overall.")
@json_option
def show(file: str, pages: bool, as_json: bool) -> None:
    """Show a dirty-log dump: its header (device, features, guest memory layout), the number of
    pages dirtied in each sync round, and the totals: pages summed over the rounds (what pre-copy
    would resend) and distinct pages.

    A page is 4 KiB of guest-physical memory; page N starts at guest-physical address N * 4096.

    \b
    Examples:
      vdpa-svq dirty-log show run.vdl
      vdpa-svq dirty-log show run.vdl --pages --json
    """
    dump = read_with_progress(file)
    data = summary(dump, pages)
    if as_json:
        echo_json(data)
        return
    h = dump.header
    print_fields(f"dirty log {file}", header_fields(h))
    click.echo()
    start = dump.rounds[0].when if dump.rounds else h.created
    columns = ["ROUND", "+SECONDS", "DIRTY PAGES", "SIZE"] + (["PAGES"] if pages else [])
    rows = [
        [str(r.number), f"{r.when - start:.3f}", str(r.count), human_bytes(r.count * h.page_size)]
        + ([format_ranges(r.pages.ranges())] if pages else [])
        for r in dump.rounds
    ]
    if rows:
        print_table(None, columns, rows)
    else:
        click.echo("no rounds")
    t = data["totals"]
    share = t["distinct"] / t["guest_pages"] if t["guest_pages"] else 0.0
    click.echo(
        f"\ntotal: {t['rounds']} rounds, {t['dirty_total']} dirty pages summed over the rounds "
        f"({human_bytes(t['dirty_total'] * h.page_size)}), {t['distinct']} distinct pages "
        f"({share:.1%} of guest memory)"
    )
    if pages:
        click.echo(f"distinct pages: {format_ranges(dump.union().ranges())}")
