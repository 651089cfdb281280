"""`vdpa-svq attach`: whole runs on the software devices, and one exact line per user mistake."""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import time

import pytest
from click.testing import CliRunner

from kernel_iface import VhostVdpa, uapi
from kernel_iface.errors import error_from_errno
from vdpa_svq import devices
from vdpa_svq.cli import main
from vdpa_svq.dump import read_dump
from vdpa_svq.softdev import SoftNetDevice

from .conftest import one_line_error


def run(*args: str):
    return CliRunner().invoke(main, ["attach", *args])


@pytest.mark.parametrize("guest", ["split", "packed"])
@pytest.mark.parametrize("shadow", ["split", "packed"])
def test_attach_soft_net_every_layout_pair_verifies_every_frame(guest, shadow, tmp_path):
    dump = tmp_path / "net.vdl"
    result = run("soft:net", "--guest-layout", guest, "--shadow-layout", shadow, "--duration", "1",
                 "--rounds", "2", "--dirty-log", str(dump), "--json")
    assert result.exit_code == 0, result.output
    s = json.loads(result.stdout)
    assert s["ok"] and s["guest_layout"] == guest and s["shadow_layout"] == shadow
    assert s["frames_sent"] > 0 and s["frames_verified"] == s["frames_sent"]
    assert s["frames_duplicated"] == s["frames_failed"] == 0
    d = read_dump(dump)
    assert len(d.rounds) == 2 and d.union(), "the RX buffers the device wrote must be in the dump"


def test_attach_soft_blk_reads_back_what_it_wrote():
    result = run("soft:blk", "--guest-layout", "packed", "--duration", "1", "--json")
    assert result.exit_code == 0, result.output
    s = json.loads(result.stdout)
    assert s["blk_writes"] > 0 and s["blk_reads_verified"] == s["blk_writes"] and s["blk_failed"] == 0


def test_attach_switch_after_starts_in_passthrough_and_switches():
    result = run("soft:net", "--switch-after", "0.3", "--duration", "1.2", "--json")
    assert result.exit_code == 0, result.output
    s = json.loads(result.stdout)
    assert s["switches"] and s["mode"] == "shadow" and s["frames_verified"] == s["frames_sent"]


# -- busy polling (--poll-us): the C relay's Pump keeps notifications off and polls the rings --------
@pytest.mark.parametrize("guest", ["split", "packed"])
@pytest.mark.parametrize("shadow", ["split", "packed"])
def test_attach_soft_net_busy_polling_every_layout_pair_verifies_every_frame(guest, shadow, tmp_path):
    """Frames cross the relay while the pump polls with notifications off, and again after it turns
    them back on: a buffer that raced in while notifications were off and was not relayed when they
    came back on stalls the queue (frames_sent stays tiny, or frames go unverified)."""
    dump = tmp_path / "net.vdl"
    result = run("soft:net", "--guest-layout", guest, "--shadow-layout", shadow, "--duration", "1",
                 "--rounds", "2", "--dirty-log", str(dump), "--poll-us", "200", "--json")
    assert result.exit_code == 0, result.output
    s = json.loads(result.stdout)
    assert s["ok"] and s["guest_layout"] == guest and s["shadow_layout"] == shadow, s
    assert s["relay_impl"] == "c" and not s["errors"], s
    assert s["frames_sent"] > 1000 and s["frames_verified"] == s["frames_sent"], s
    assert s["frames_duplicated"] == s["frames_failed"] == 0
    loop = s["relay_loop"]
    # Polling really happened: phases (one per wake-up at most) in which rounds relayed buffers.
    assert 0 < loop["poll_phases"] <= loop["wakeups"], loop
    assert loop["poll_rounds"] > 0, loop
    d = read_dump(dump)
    assert len(d.rounds) == 2 and d.union(), "the RX buffers the device wrote while polled must be in the dump"


@pytest.mark.parametrize("guest", ["split", "packed"])
def test_attach_soft_blk_busy_polling_reads_back_what_it_wrote(guest):
    """blk requests one at a time: the next comes well within the polling window, so the pump
    relays nearly all of them without a wake-up (2 per request with notifications only)."""
    result = run("soft:blk", "--guest-layout", guest, "--duration", "1", "--poll-us", "1000", "--json")
    assert result.exit_code == 0, result.output
    s = json.loads(result.stdout)
    assert s["ok"] and s["relay_impl"] == "c" and not s["errors"], s
    assert s["blk_writes"] > 100 and s["blk_reads_verified"] == s["blk_writes"] and s["blk_failed"] == 0, s
    loop, q = s["relay_loop"], s["queues"]["0"]
    assert loop["poll_rounds"] > 0 and 0 < loop["poll_phases"] <= loop["wakeups"], loop
    assert q["forwarded"] == q["returned"] == 2 * s["blk_writes"], q
    assert loop["wakeups"] < q["forwarded"], f"polling saved no wake-ups: {loop}, {q}"


def test_attach_with_poll_us_0_never_polls():
    result = run("soft:net", "--duration", "0.3", "--poll-us", "0", "--json")
    assert result.exit_code == 0, result.output
    loop = json.loads(result.stdout)["relay_loop"]
    assert loop["wakeups"] > 0 and loop["poll_phases"] == loop["poll_rounds"] == 0, loop
    assert loop["window_grows"] == loop["window_shrinks"] == 0, loop


@pytest.mark.parametrize("args", [("--poll-us", "auto"), ()])
def test_attach_learns_a_polling_window_with_poll_us_auto(args):
    """--poll-us auto (the default): traffic grows the window, and the pump runs polling phases
    (how long each lasts is the credit's business, tests/relay/test_pump.py: the in-process guest,
    in Python, is slow beside the C relay)."""
    result = run("soft:net", "--duration", "0.5", *args, "--json")
    assert result.exit_code == 0, result.output
    s = json.loads(result.stdout)
    loop = s["relay_loop"]
    assert s["ok"] and loop["window_grows"] > 0 and loop["poll_phases"] > 0, loop


def test_a_bad_poll_setting_is_a_usage_error():
    result = run("soft:net", "--poll-us", "fast")
    assert result.exit_code == 2 and "'fast' is not 'auto' or a number of microseconds >= 0" in result.output


def test_attach_human_summary_names_what_happened():
    result = run("soft:net", "--duration", "0.5", "--rounds", "2")
    assert result.exit_code == 0, result.output
    assert "OK" in result.stdout.splitlines()[0]
    assert "dirty pages per round" in result.stdout and "relay rate" in result.stdout


# -- one line per user mistake ---------------------------------------------------------------------
def test_missing_node(tmp_path):
    line = one_line_error(run(str(tmp_path / "vhost-vdpa-9")))
    assert line.startswith(f"vdpa-svq: {tmp_path}/vhost-vdpa-9: no such device node")


def test_not_a_vhost_vdpa_node():
    line = one_line_error(run("/dev/null"))
    assert line.startswith("vdpa-svq: /dev/null: is not a vhost-vdpa device")


def test_permission_denied(monkeypatch):
    def denied(path):
        raise error_from_errno(errno.EACCES, "open", path)

    monkeypatch.setattr(devices, "check_node", lambda path: None)
    monkeypatch.setattr(VhostVdpa, "open", staticmethod(denied))
    line = one_line_error(run("/dev/vhost-vdpa-7"))
    assert "/dev/vhost-vdpa-7" in line and "permission denied" in line.lower()


def test_layout_the_device_does_not_offer():
    line = one_line_error(run("soft:net-sim", "--shadow-layout", "packed"))
    assert line == "vdpa-svq: soft:net-sim: packed layout asked for, but the device offers only split rings"


def test_device_without_access_platform(monkeypatch):
    class NoAccessPlatform(SoftNetDevice):
        def get_features(self) -> int:
            return super().get_features() & ~(1 << uapi.VIRTIO_F_ACCESS_PLATFORM)

    monkeypatch.setattr(devices, "_soft_device", lambda spec: NoAccessPlatform(path=spec))
    line = one_line_error(run("soft:net"))
    assert line == "vdpa-svq: soft:net: device lacks VIRTIO_F_ACCESS_PLATFORM, which vDPA needs"


def test_guest_layout_the_passthrough_device_cannot_run():
    line = one_line_error(run("soft:net", "--guest-layout", "packed", "--shadow-layout", "split",
                              "--switch-after", "1"))
    assert "packed rings cannot be given to a device running split rings" in line


@pytest.mark.parametrize("device", ["soft:net", "soft:blk"])
def test_poll_us_with_the_python_relay(device):
    """The Python relay polls too: its pump (vdpa_svq/pump.py) is the C Pump's reference."""
    result = run(device, "--impl", "py", "--poll-us", "100", "--duration", "0.3", "--json")
    assert result.exit_code == 0, result.output
    s = json.loads(result.stdout)
    assert s["ok"] and s["relay_impl"] == "py" and not s["errors"], s
    loop = s["relay_loop"]
    assert 0 < loop["poll_phases"] <= loop["wakeups"], loop


def test_unknown_soft_device():
    assert "unknown software device" in one_line_error(run("soft:gpu"))


def test_corrupt_dump_is_refused_by_show(tmp_path):
    dump = tmp_path / "x.vdl"
    assert run("soft:net", "--duration", "0.3", "--dirty-log", str(dump)).exit_code == 0
    data = bytearray(dump.read_bytes())
    dump.write_bytes(bytes(data[: len(data) // 2]))
    result = CliRunner().invoke(main, ["dirty-log", "show", str(dump)])
    assert result.exit_code == 1 and "x.vdl" in one_line_error(result)


def wait_until_running(directory, proc, timeout: float = 120.0) -> None:
    """The run has its signal handlers once it opened its dump (a .partial file beside the target)."""
    deadline = time.monotonic() + timeout
    while not list(directory.glob(".*.partial")):
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "attach never started its run"
        time.sleep(0.1)
    time.sleep(0.5)  # some traffic before the stop


def test_sigterm_ends_the_run_cleanly_with_a_summary(tmp_path):
    dump = tmp_path / "t.vdl"
    proc = subprocess.Popen(
        [sys.executable, "-m", "vdpa_svq.cli", "attach", "soft:net", "--duration", "60", "--dirty-log", str(dump)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=os.environ | {"NO_COLOR": "1"},
    )
    wait_until_running(tmp_path, proc)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    assert "OK" in out.splitlines()[0]
    assert read_dump(dump).rounds, "the dump is complete even when the run was stopped"


def test_a_bad_cpu_list_is_a_usage_error():
    result = run("soft:net", "--cpus", "0-")
    assert result.exit_code == 2 and "is not a CPU list" in result.output
