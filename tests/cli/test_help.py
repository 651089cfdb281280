"""Every command's --help says what it does, what it takes, and (for the commands with arguments) shows
an example."""

from __future__ import annotations

import click
import pytest
from click.testing import CliRunner

from vdpa_svq.cli import main


def _commands(group: click.Group, prefix: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    out = []
    for name, cmd in sorted(group.commands.items()):
        out.append((*prefix, name))
        if isinstance(cmd, click.Group):
            out.extend(_commands(cmd, (*prefix, name)))
    return out


ALL = _commands(main)
MINE = [c for c in ALL if c[0] in ("list", "info", "dirty-log")]


def test_the_commands_are_wired_up():
    assert {"list", "info", "dirty-log", "attach"} <= set(main.commands)
    assert {("dirty-log", "show"), ("dirty-log", "diff"), ("dirty-log", "heatmap")} <= set(ALL)


@pytest.mark.parametrize("path", [(), *ALL], ids=lambda p: " ".join(p) or "vdpa-svq")
def test_help_works(path):
    result = CliRunner().invoke(main, [*path, "--help"])
    assert result.exit_code == 0, result.output
    assert result.stdout.startswith("Usage: ")


@pytest.mark.parametrize("path", MINE, ids=" ".join)
def test_help_is_informative(path):
    text = CliRunner().invoke(main, [*path, "-h"]).stdout
    body = text.split("Options:")[0]
    assert len(body.split()) >= 15, text  # a real description, not one line
    cmd = main
    for name in path:
        cmd = cmd.commands[name]
    if not isinstance(cmd, click.Group):
        assert "--json" in text
        if cmd.params and any(isinstance(p, click.Argument) for p in cmd.params):
            assert "Example" in text


def test_short_help_lines_are_not_cut():
    text = CliRunner().invoke(main, ["-h"]).stdout
    for name in ("list", "info", "dirty-log"):
        line = next(line for line in text.splitlines() if line.strip().startswith(name + " "))
        assert not line.endswith("..."), line
