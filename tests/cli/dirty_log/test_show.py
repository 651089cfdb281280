"""`vdpa-svq dirty-log show`."""

from __future__ import annotations

import json

from click.testing import CliRunner

from vdpa_svq.cli import main

from ..conftest import one_line_error, sample_dump


def run(*args: str):
    return CliRunner().invoke(main, ["dirty-log", "show", *args])


def test_show_prints_header_rounds_and_totals(tmp_path):
    path = sample_dump(tmp_path / "d.vdl")
    result = run(str(path))
    assert result.exit_code == 0, result.output
    text = result.stdout
    assert text.splitlines()[0] == f"dirty log {path}"
    assert "/dev/vhost-vdpa-0 (net, virtio id 1)" in text
    assert "2023-11-14T22:13:20.000Z by vdpa-svq 0.1.0" in text
    assert "2 regions, 512 KiB (128 pages): 0x0-0x3ffff, 0x80000-0xbffff" in text
    assert "VIRTIO_NET_F_MAC" in text and "VHOST_BACKEND_F_IOTLB_BATCH" in text
    rows = [line.split() for line in text.splitlines() if line[:1].isdigit()]
    assert rows == [["1", "0.000", "5", "20", "KiB"], ["2", "1.000", "4", "16", "KiB"], ["3", "2.000", "0", "0", "B"]]
    assert "total: 3 rounds, 9 dirty pages summed over the rounds (36 KiB), 7 distinct pages" in text


def test_show_pages_lists_ranges(tmp_path):
    text = run(str(sample_dump(tmp_path / "d.vdl")), "--pages").stdout
    assert "0-3, 130" in text and "2-4, 191" in text
    assert text.splitlines()[-1] == "distinct pages: 0-4, 130, 191"


def test_show_json(tmp_path):
    out = json.loads(run(str(sample_dump(tmp_path / "d.vdl")), "--json", "--pages").stdout)
    assert out["header"]["device"] == {"path": "/dev/vhost-vdpa-0", "id": 1}
    assert [r["pages"] for r in out["rounds"]] == [5, 4, 0]
    assert out["rounds"][0]["page_ranges"] == [[0, 3], [130, 130]]
    assert out["totals"] == {
        "rounds": 3, "dirty_total": 9, "distinct": 7, "guest_pages": 128,
        "page_ranges": [[0, 4], [130, 130], [191, 191]],
    }


def test_show_a_dump_without_rounds(tmp_path):
    result = run(str(sample_dump(tmp_path / "d.vdl", rounds=[])))
    assert result.exit_code == 0
    assert "no rounds" in result.stdout


def test_truncated_dump_is_one_line_exit_1(tmp_path):
    path = sample_dump(tmp_path / "d.vdl")
    path.write_bytes(path.read_bytes()[:-5])
    result = run(str(path))
    assert result.exit_code == 1
    line = one_line_error(result)
    assert line.startswith(f"vdpa-svq: {path}: offset ") and "truncated" in line


def test_corrupt_dump_is_one_line_exit_1(tmp_path):
    path = sample_dump(tmp_path / "d.vdl")
    data = bytearray(path.read_bytes())
    data[60] ^= 0xFF
    path.write_bytes(data)
    result = run(str(path))
    assert result.exit_code == 1
    assert "CRC32 mismatch" in one_line_error(result) or "corrupt" in result.stderr


def test_missing_file_and_not_a_dump(tmp_path):
    result = run(str(tmp_path / "nope.vdl"))
    assert result.exit_code == 1
    assert one_line_error(result) == f"vdpa-svq: {tmp_path / 'nope.vdl'}: no such file or directory"
    (tmp_path / "x.txt").write_text("hello world\n")
    assert "not a vdpa-svq dirty-log dump" in one_line_error(run(str(tmp_path / "x.txt")))
