"""`vdpa-svq dirty-log diff`."""

from __future__ import annotations

import json

from click.testing import CliRunner

from vdpa_svq.cli import main

from ..conftest import SAMPLE_REGIONS, one_line_error, sample_dump


def run(*args: str):
    return CliRunner().invoke(main, ["dirty-log", "diff", *args])


def two(tmp_path):
    a = sample_dump(tmp_path / "a.vdl")  # rounds [0-3, 130], [2-4, 191], []
    b = sample_dump(tmp_path / "b.vdl", rounds=[[0, 1, 2, 9], [2, 3, 4, 191, 150]])
    return str(a), str(b)


def test_diff_over_the_union(tmp_path):
    a, b = two(tmp_path)
    result = run(a, b)
    assert result.exit_code == 0, result.output
    rows = {line.split("  ")[0]: line.split()[-3:] for line in result.stdout.splitlines() if line.startswith("all")}
    assert rows == {"all rounds": ["1", "2", "6"]}  # only A {130}, only B {9, 150}, both {0-4, 191}
    assert result.stdout.splitlines()[-1] == "the dumps differ"


def test_diff_per_round_with_pages(tmp_path):
    a, b = two(tmp_path)
    text = run(a, b, "--per-round", "--pages").stdout
    assert "round 3 (not in B)" in text
    assert "round 1, only A: 3, 130" in text
    assert "round 2, only B: 150" in text
    assert "all rounds, both: 0-4, 191" in text


def test_diff_json(tmp_path):
    a, b = two(tmp_path)
    out = json.loads(run(a, b, "--per-round", "--json", "--pages").stdout)
    assert out["same_layout"] is True
    assert {k: out["union"][k] for k in ("only_a", "only_b", "both")} == {"only_a": 1, "only_b": 2, "both": 6}
    assert out["union"]["page_ranges"]["only_b"] == [[9, 9], [150, 150]]
    assert [(r["round"], r["in_a"], r["in_b"], r["only_a"], r["only_b"], r["both"]) for r in out["rounds"]] == [
        (1, True, True, 2, 1, 3),
        (2, True, True, 0, 1, 4),
        (3, True, False, 0, 0, 0),
    ]


def test_diff_of_a_dump_with_itself(tmp_path):
    a, _ = two(tmp_path)
    assert run(a, a, "--per-round").stdout.splitlines()[-1] == "the dumps dirtied the same pages"


def test_diff_notes_different_layouts(tmp_path):
    a, _ = two(tmp_path)
    c = sample_dump(tmp_path / "c.vdl", regions=[*SAMPLE_REGIONS, (1 << 20, 1 << 12)])
    assert "different guest memory layouts" in run(a, str(c)).stdout


def test_diff_with_a_damaged_dump(tmp_path):
    a, b = two(tmp_path)
    with open(b, "r+b") as f:
        f.truncate(40)
    result = run(a, b)
    assert result.exit_code == 1
    assert one_line_error(result).startswith(f"vdpa-svq: {b}: offset ")
