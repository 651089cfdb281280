"""`vdpa-svq attach` on the bench's real devices, as a user runs it (a subprocess, JSON summary)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import pytest

from tests.cli.test_attach import wait_until_running
from vdpa_svq.dump import read_dump

pytestmark = pytest.mark.kernel


def attach(*args: str, timeout: float = 300) -> dict:
    proc = subprocess.run([sys.executable, "-m", "vdpa_svq.cli", "attach", *args, "--json"],
                          capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr + proc.stdout
    return json.loads(proc.stdout)


@pytest.mark.parametrize("guest", ["split", "packed"])
def test_attach_vdpa_sim_net(vdpa_sim_net, guest, tmp_path):
    dump = tmp_path / "net.vdl"
    s = attach(vdpa_sim_net, "--guest-layout", guest, "--duration", "4", "--rounds", "2", "--dirty-log", str(dump))
    assert s["ok"] and s["shadow_layout"] == "split" and s["guest_layout"] == guest
    assert s["frames_sent"] > 0 and s["frames_verified"] == s["frames_sent"]
    assert len(read_dump(dump).rounds) == 2


def test_attach_vdpa_sim_blk(vdpa_sim_blk):
    s = attach(vdpa_sim_blk, "--guest-layout", "packed", "--duration", "3")
    assert s["ok"] and s["blk_writes"] > 0 and s["blk_reads_verified"] == s["blk_writes"]


def test_attach_vp_vdpa_packed_shadow_with_event_idx(vp_vdpa):
    s = attach(vp_vdpa, "--shadow-layout", "packed", "--duration", "3")
    assert s["ok"] and s["shadow_layout"] == "packed"
    assert int(s["features"], 16) & 1 << 29, "EVENT_IDX must be negotiated with vp_vdpa"
    assert s["frames_tx_done"] > 0  # the frames left through QEMU's packed virtqueue


@pytest.mark.parametrize("device", ["vdpa_sim_net", "vp_vdpa"])
def test_attach_busy_polling_on_real_devices(device, request, tmp_path):
    """--poll-us: vdpa_sim's worker shares the guest's CPUs with the polling relay; QEMU's packed
    device (vp_vdpa) stops interrupting while the shadow ring's events are disabled."""
    node = request.getfixturevalue(device)
    dump = tmp_path / "poll.vdl"
    s = attach(node, "--guest-layout", "packed", "--poll-us", "200", "--duration", "3", "--dirty-log", str(dump))
    assert s["ok"] and s["relay_impl"] == "c"
    assert s["frames_sent"] > 0 and s["frames_tx_done"] > 0  # the last TX completions may be unreaped at the end
    if device == "vdpa_sim_net":  # a loopback: every frame comes back, checked
        assert s["frames_verified"] == s["frames_sent"] and read_dump(dump).union()
    assert s["relay_loop"]["poll_rounds"] > 0


def test_attach_switch_mid_traffic_on_vdpa_sim(vdpa_sim_net, tmp_path):
    dump = tmp_path / "switch.vdl"
    s = attach(vdpa_sim_net, "--switch-after", "2", "--duration", "5", "--rounds", "2", "--dirty-log", str(dump))
    assert s["switches"] and s["mode"] == "shadow"
    assert s["frames_verified"] == s["frames_sent"] and s["frames_duplicated"] == 0
    assert read_dump(dump).union(), "shadowed traffic dirtied pages"


def test_sigterm_tears_down_and_a_second_attach_works(vdpa_sim_net, tmp_path):
    proc = subprocess.Popen([sys.executable, "-m", "vdpa_svq.cli", "attach", vdpa_sim_net, "--duration", "300",
                             "--dirty-log", str(tmp_path / "t.vdl")],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=os.environ | {"NO_COLOR": "1"})
    wait_until_running(tmp_path, proc, timeout=240)  # TCG: interpreter start and bring-up are slow
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    assert "OK" in out.splitlines()[0]
    s = attach(vdpa_sim_net, "--duration", "2")
    assert s["ok"] and s["frames_verified"] == s["frames_sent"] > 0
