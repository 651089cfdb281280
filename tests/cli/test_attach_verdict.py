"""`vdpa-svq attach` exits through the CLI's exit-code table when the run's verdict is FAILED:
ExitCode.DEVICE (3), one line naming what failed, the summary still printed."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from vdpa_svq.cli import main
from vdpa_svq.cli.errors import ExitCode
from vdpa_svq.workload import AttachRun, Summary


@pytest.mark.parametrize(
    "failed, says",
    [
        ({"frames_failed": 2}, "soft:net: the run failed: 2 frames damaged"),
        ({"frames_duplicated": 1, "errors": {0: "broken"}},
         "soft:net: the run failed: 1 frames duplicated, 1 queues stopped"),
        ({}, None),
    ],
)
def test_a_failed_verdict_exits_with_the_device_code(monkeypatch, failed, says):
    summary = Summary("soft:net", "net", "split", "split", "", "py", **failed)
    monkeypatch.setattr(AttachRun, "run", lambda self: summary)
    result = CliRunner().invoke(main, ["attach", "soft:net", "--duration", "0.1", "--json"])
    assert json.loads(result.stdout)["ok"] is (says is None)
    if says is None:
        assert result.exit_code == ExitCode.OK and result.stderr == ""
    else:
        assert result.exit_code == ExitCode.DEVICE == 3
        assert result.stderr == f"vdpa-svq: {says}\n"
