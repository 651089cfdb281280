"""`vdpa-svq dirty-log heatmap`."""

from __future__ import annotations

import json

import numpy as np
from click.testing import CliRunner

from vdpa_svq.cli import main
from vdpa_svq.cli.dirty_log.heatmap import heat
from vdpa_svq.dump import read_dump

from ..conftest import one_line_error, sample_dump

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def run(*args: str):
    return CliRunner().invoke(main, ["dirty-log", "heatmap", *args])


def test_heatmap_writes_a_png(tmp_path):
    out = tmp_path / "h.png"
    result = run(str(sample_dump(tmp_path / "d.vdl")), "-o", str(out))
    assert result.exit_code == 0, result.output
    assert out.read_bytes().startswith(PNG_MAGIC)
    assert result.stdout == f"wrote {out}: 3 rounds x 128 bins over 128 pages\n"


def test_heatmap_json_and_bins(tmp_path):
    out = tmp_path / "h.png"
    result = run(str(sample_dump(tmp_path / "d.vdl")), "-o", str(out), "--bins", "16", "--json")
    assert json.loads(result.stdout) == {
        "file": str(tmp_path / "d.vdl"), "output": str(out), "rounds": 3, "bins": 16, "pages": 128,
    }
    assert out.read_bytes().startswith(PNG_MAGIC)


def test_heat_lays_regions_back_to_back(tmp_path):
    """Pages 0-63 and 128-191 become columns 0-63 and 64-127: page 130 is column 66."""
    matrix, edges = heat(read_dump(sample_dump(tmp_path / "d.vdl")), 128)
    assert matrix.shape == (3, 128) and edges[-1] == 128
    assert list(np.flatnonzero(matrix[0])) == [0, 1, 2, 3, 66]
    assert list(np.flatnonzero(matrix[1])) == [2, 3, 4, 127]
    assert not matrix[2].any()
    coarse, _ = heat(read_dump(tmp_path / "d.vdl"), 2)
    assert coarse[0].tolist() == [4 / 64, 1 / 64]


def test_heatmap_of_no_rounds_is_a_user_error(tmp_path):
    path = sample_dump(tmp_path / "d.vdl", rounds=[])
    result = run(str(path), "-o", str(tmp_path / "h.png"))
    assert result.exit_code == 1
    assert one_line_error(result) == f"vdpa-svq: {path}: the dump has no rounds, so there is nothing to plot"
    assert not (tmp_path / "h.png").exists()


def test_heatmap_of_a_corrupt_dump(tmp_path):
    path = sample_dump(tmp_path / "d.vdl")
    data = bytearray(path.read_bytes())
    data[-3] ^= 1
    path.write_bytes(data)
    result = run(str(path), "-o", str(tmp_path / "h.png"))
    assert result.exit_code == 1
    assert "CRC32 mismatch in the TAIL section" in one_line_error(result)


def test_heatmap_into_a_missing_directory(tmp_path):
    out = tmp_path / "no" / "h.png"
    result = run(str(sample_dump(tmp_path / "d.vdl")), "-o", str(out))
    assert result.exit_code == 1
    assert one_line_error(result) == f"vdpa-svq: {out}: no such file or directory"


def test_heatmap_needs_an_output():
    result = CliRunner().invoke(main, ["dirty-log", "heatmap", "x.vdl"])
    assert result.exit_code == 2
    assert "Missing option '-o' / '--output'" in result.stderr
