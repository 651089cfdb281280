"""`vdpa-svq serve`: mistakes give one line and exit 1; SIGTERM ends it cleanly (see test_testpmd.py)."""

from __future__ import annotations

import os
import socket

import pytest
from click.testing import CliRunner

from vdpa_svq.cli import main
from vdpa_svq.ring import Layout

from .client import VhostUserFrontend
from .test_backend import loop_frames
from .testpmd import start_serve, stop_serve


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


def test_poll_us_with_the_python_relay_polls(tmp_path):
    """The Python relay busy-polls too (pump.py, the C Pump's twin): serve takes --impl py --poll-us,
    relays a frontend's frames and reports its polling phases."""
    sock = str(tmp_path / "s")
    proc = start_serve("soft:net", sock, impl="py", extra=("--poll-us", "5000"))
    try:
        fe = VhostUserFrontend(socket.socket(socket.AF_UNIX, socket.SOCK_STREAM), Layout.SPLIT)
        fe.sock.connect(sock)
        drv = fe.setup()
        assert sorted(loop_frames(drv, 50)) == list(range(50))
        fe.close()
    finally:
        summaries = stop_serve(proc)
    (summary,) = summaries
    assert summary["error"] is None, summary
    assert 0 < summary["relay_loop"]["poll_phases"] <= summary["relay_loop"]["wakeups"], summary["relay_loop"]


def test_negative_poll_us_is_a_usage_error(tmp_path):
    r = run("serve", "soft:net", "--socket", str(tmp_path / "s"), "--poll-us", "-1")
    assert r.exit_code == 2 and "--poll-us" in r.output


@pytest.mark.parametrize("cpus,why", [("abc", "is not a CPU list"), ("3-1", "is not a CPU list"),
                                      ("4096", "not available here")])
def test_a_bad_cpu_list_is_a_usage_error(tmp_path, cpus, why):
    r = run("serve", "soft:net", "--socket", str(tmp_path / "s"), "--cpus", cpus)
    assert r.exit_code == 2 and why in r.output, r.output


def test_cpus_pins_every_thread_of_the_server(tmp_path):
    """The relay loop's thread starts later than the option is applied: it must inherit the CPU set."""
    sock = str(tmp_path / "s")
    proc = start_serve("soft:net", sock, extra=("--cpus", "0"))
    try:
        fe = VhostUserFrontend(socket.socket(socket.AF_UNIX, socket.SOCK_STREAM), Layout.SPLIT)
        fe.sock.connect(sock)
        fe.setup()  # the relay runs: its loop thread exists now
        tasks = f"/proc/{proc.pid}/task"
        allowed = {_cpus_allowed(f"{tasks}/{t}/status") for t in os.listdir(tasks)}
        assert len(os.listdir(tasks)) >= 3 and allowed == {"0"}, allowed
        fe.close()
    finally:
        summaries = stop_serve(proc)
    assert summaries and summaries[0]["started"] == 1


def _cpus_allowed(status_path: str) -> str:
    with open(status_path) as f:
        return f.read().split("Cpus_allowed_list:")[1].split()[0]
