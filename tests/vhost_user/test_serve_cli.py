"""`vdpa-svq serve`: mistakes give one line and exit 1; SIGTERM ends it cleanly (see test_testpmd.py)."""

from __future__ import annotations

from click.testing import CliRunner

from vdpa_svq.cli import main


def run(*args: str):
    return CliRunner().invoke(main, list(args))


def test_help_names_the_socket_option():
    r = run("serve", "--help")
    assert r.exit_code == 0 and "--socket" in r.output and "vhost-user" in r.output


def test_socket_is_required():
    r = run("serve", "soft:net")
    assert r.exit_code == 2 and "--socket" in r.output


def test_missing_device_is_one_line(tmp_path):
    r = run("serve", "/dev/vhost-vdpa-99", "--socket", str(tmp_path / "s"))
    assert r.exit_code == 1
    assert r.output.count("\n") == 1 and "/dev/vhost-vdpa-99" in r.output


def test_socket_in_a_missing_directory_is_one_line(tmp_path):
    path = str(tmp_path / "nowhere" / "s")
    r = run("serve", "soft:net", "--socket", path)
    assert r.exit_code == 1, r.output
    assert r.output.count("\n") == 1 and path in r.output and "cannot listen" in r.output
