"""Output shared by the commands: JSON, and tables that are rich on a terminal and plain text in a pipe."""

from __future__ import annotations

import json
import sys
import textwrap
from collections.abc import Iterable, Sequence
from typing import Any

import click

PLAIN_WIDTH = 100

json_option = click.option("--json", "as_json", is_flag=True, help="Print JSON (one document) instead of text.")


def is_terminal() -> bool:
    # sys.stdout at call time: click's test runner swaps it.
    return sys.stdout.isatty()


def echo_json(obj: Any) -> None:
    click.echo(json.dumps(obj, indent=2))


def print_fields(title: str, fields: Sequence[tuple[str, str]]) -> None:
    """A titled list of name/value pairs; a value may hold several lines."""
    if is_terminal():
        from rich.table import Table
        from rich.text import Text

        table = Table(title=Text(title, style="bold"), title_justify="left", show_header=False, box=None)
        table.add_column(style="cyan", no_wrap=True)
        table.add_column(overflow="fold")
        for name, value in fields:
            table.add_row(Text(name), Text(value))  # Text: a value's "[...]" is not rich markup
        _console().print(table)
        return
    click.echo(title)
    width = max((len(name) for name, _ in fields), default=0)
    for name, value in fields:
        lines = _wrap(value, PLAIN_WIDTH - width - 4)
        click.echo(f"  {name:<{width}}  {lines[0]}".rstrip())
        for line in lines[1:]:
            click.echo(f"  {'':<{width}}  {line}")


def print_table(title: str | None, columns: Sequence[str], rows: Iterable[Sequence[str]]) -> None:
    rows = [list(map(str, row)) for row in rows]
    if is_terminal():
        from rich import box
        from rich.table import Table
        from rich.text import Text

        # Light box, no outer padding: a device listing still fits an 80-column console.
        table = Table(title=Text(title, style="bold") if title else None, title_justify="left",
                      box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False, collapse_padding=True)
        for i, name in enumerate(columns):
            # The first column names the thing (a device node, a round): never folded. The others fold
            # rather than end in "…": a cut "vdpa_sim_n…" is useless.
            table.add_column(name, overflow="fold", no_wrap=i == 0)
        for row in rows:
            table.add_row(*(Text(cell) for cell in row))
        _console().print(table)
        return
    if title:
        click.echo(title)
    widths = [max([len(c)] + [len(r[i]) for r in rows]) for i, c in enumerate(columns)]
    for row in [list(columns), *rows]:
        click.echo("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())


def _console():
    from rich.console import Console

    return Console(highlight=False)


def _wrap(value: str, width: int) -> list[str]:
    lines: list[str] = []
    for line in value.split("\n") or [""]:
        lines.extend(textwrap.wrap(line, max(width, 40), break_on_hyphens=False) or [""])
    return lines


def format_ranges(spans: Iterable[tuple[int, int]]) -> str:
    """Inclusive (first, last) runs as `0-3, 130, 190-191`; `-` for none."""
    return ", ".join(f"{a}" if a == b else f"{a}-{b}" for a, b in spans) or "-"


def human_bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n} {unit}" if unit == "B" else f"{n:.1f} {unit}".replace(".0 ", " ")
        n /= 1024
    raise AssertionError("unreachable")
