"""`vdpa-svq dirty-log diff A B`: which dirty pages two dumps share, and which only one has."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import click

from vdpa_svq.cli._output import echo_json, json_option, print_table
from vdpa_svq.cli.dirty_log._common import check_listable, dump_argument, read_with_progress

if TYPE_CHECKING:
    from vdpa_svq.pageset import PageSet


def parts(a: PageSet, b: PageSet) -> dict[str, PageSet]:
    return {"only_a": a - b, "only_b": b - a, "both": a & b}


def compare(split: dict[str, PageSet], with_pages: bool) -> dict[str, Any]:
    out: dict[str, Any] = {name: len(pages) for name, pages in split.items()}
    if with_pages:
        out["page_ranges"] = {name: [list(s) for s in pages.ranges()] for name, pages in split.items()}
    return out


@click.command(short_help="Compare the dirty pages of two dumps.")
@dump_argument("a", "A")
@dump_argument("b", "B")
@click.option("--per-round", is_flag=True, help="Compare round N of A with round N of B, for every N.")
@click.option("--pages", is_flag=True, help="List the page numbers (as ranges), not just how many.")
@json_option
def diff(a: str, b: str, per_round: bool, pages: bool, as_json: bool) -> None:
    """Compare the dirty pages of dumps A and B: the pages only A has, only B has, and both have.

    By default over the union of all rounds; with --per-round round by round (a round one dump
    lacks counts as empty). Useful to check that two relay implementations, or two runs of the
    same workload, logged the same writes.

    \b
    Examples:
      vdpa-svq dirty-log diff python.vdl c.vdl
      vdpa-svq dirty-log diff a.vdl b.vdl --per-round --json
    """
    da, db = read_with_progress(a), read_with_progress(b)
    union = parts(da.union(), db.union())
    splits = []
    if per_round:
        from vdpa_svq.pageset import PageSet

        empty = PageSet(0)
        for n in range(1, max(len(da.rounds), len(db.rounds)) + 1):
            pa = da.rounds[n - 1].pages if n <= len(da.rounds) else empty
            pb = db.rounds[n - 1].pages if n <= len(db.rounds) else empty
            splits.append((n, parts(pa, pb)))
    if pages:
        check_listable(f"{a} and {b}", [s for split in [union, *(p for _, p in splits)] for s in split.values()])
    result: dict[str, Any] = {
        "a": a,
        "b": b,
        "same_layout": sorted(da.header.regions) == sorted(db.header.regions),
        "union": compare(union, pages),
    }
    if per_round:
        result["rounds"] = [
            {"round": n, "in_a": n <= len(da.rounds), "in_b": n <= len(db.rounds), **compare(split, pages)}
            for n, split in splits
        ]
    if as_json:
        echo_json(result)
        return
    if not result["same_layout"]:
        click.echo("note: the two dumps have different guest memory layouts; pages are compared by number")
    columns = ["", "ONLY A", "ONLY B", "BOTH"]
    rows = []
    for row in result.get("rounds", []):
        label = f"round {row['round']}"
        label += ("" if row["in_a"] else " (not in A)") + ("" if row["in_b"] else " (not in B)")
        rows.append([label, *(str(row[k]) for k in ("only_a", "only_b", "both"))])
    u = result["union"]
    rows.append(["all rounds", str(u["only_a"]), str(u["only_b"]), str(u["both"])])
    print_table(f"A = {a}\nB = {b}", columns, rows)
    if pages:
        for row in [*result.get("rounds", []), {"round": None, **u}]:
            label = "all rounds" if row["round"] is None else f"round {row['round']}"
            for key, name in (("only_a", "only A"), ("only_b", "only B"), ("both", "both")):
                spans = row["page_ranges"][key]
                click.echo(f"{label}, {name}: {_spans(spans)}")
    same = all(r["only_a"] == r["only_b"] == 0 for r in [u, *result.get("rounds", [])])
    click.echo("\nthe dumps dirtied the same pages" if same else "\nthe dumps differ")


def _spans(spans: list[list[int]]) -> str:
    return ", ".join(f"{x}" if x == y else f"{x}-{y}" for x, y in spans) or "-"
