"""BENCHMARKS.md is shared: each bench rewrites its own section and nothing else (the relay bench once
rewrote the whole file and erased every other bench's figures)."""

from __future__ import annotations

from bench.sections import TITLE, write_section


def test_a_section_is_replaced_in_place_and_the_others_are_kept(tmp_path):
    path = tmp_path / "BENCHMARKS.md"
    write_section(str(path), "relay", "## Relay\nold relay figures")
    write_section(str(path), "latency", "## Latency\nlatency figures")
    write_section(str(path), "relay", "## Relay\nnew relay figures")
    text = path.read_text()
    assert text.startswith(TITLE)
    assert "old relay figures" not in text
    assert text.index("new relay figures") < text.index("latency figures")
    assert text.count("<!-- bench:relay -->") == 1 and text.count("<!-- /bench:relay -->") == 1


def test_a_new_section_is_appended_after_what_is_there(tmp_path):
    path = tmp_path / "BENCHMARKS.md"
    path.write_text("# Benchmarks\n\nhand-written notes\n")
    write_section(str(path), "scaling", "## Scaling\nfigures")
    text = path.read_text()
    assert text.startswith("# Benchmarks\n\nhand-written notes\n\n<!-- bench:scaling -->\n")


def test_the_relay_bench_writes_into_its_section_only(tmp_path, monkeypatch):
    from bench import relay

    path = tmp_path / "BENCHMARKS.md"
    write_section(str(path), "vhost-user-host", "## vhost-user\nclosed-loop figures")
    monkeypatch.setattr(relay, "run", lambda seconds, log: "")
    monkeypatch.setattr(relay, "verdict", lambda table: "verdict")
    relay.main(["--seconds", "0.01", "--out", str(path)])
    text = path.read_text()
    assert "closed-loop figures" in text
    assert "<!-- bench:relay -->" in text
