"""`vdpa-svq list`."""

from __future__ import annotations

import json

from click.testing import CliRunner

from kernel_iface.discovery import VhostVdpaDevice, discover
from vdpa_svq.cli import list as list_cmd
from vdpa_svq.cli import main

SIM_NET = VhostVdpaDevice(
    dev_path="/dev/vhost-vdpa-0", index=0, devnum=(240, 0), vdpa_name="vdpa0", sys_path="/sys/devices/vdpa0",
    driver="vhost_vdpa", parent=None, mgmtdev="vdpasim_net", provider="vdpa_sim_net", device_id=1,
    vendor_id=0, max_vqs=3, max_vq_size=256,
)
VP = VhostVdpaDevice(
    dev_path="/dev/vhost-vdpa-2", index=2, devnum=(240, 2), vdpa_name="vp0",
    sys_path="/sys/devices/pci0000:00/0000:00:10.0/vp0", driver="vhost_vdpa", parent="pci/0000:00:10.0",
    mgmtdev="pci/0000:00:10.0", provider="vp-vdpa", device_id=2, vendor_id=0x1af4, max_vqs=None, max_vq_size=None,
)


def test_list_on_this_host_exits_0():
    """Whatever this host has: a table, or the friendly message."""
    result = CliRunner().invoke(main, ["list"])
    assert result.exit_code == 0, result.output
    if not discover():
        assert result.stdout.startswith("No vhost-vdpa devices found.")


def test_no_devices_says_what_the_host_needs(monkeypatch, tmp_path):
    monkeypatch.setattr(list_cmd, "discover", lambda: [])
    monkeypatch.setattr(list_cmd, "SYS_BUS_VDPA", str(tmp_path / "absent"))
    result = CliRunner().invoke(main, ["list"])
    assert result.exit_code == 0
    assert result.stderr == ""
    text = result.stdout
    for needed in ("No vhost-vdpa devices found", "vhost_vdpa", "vdpa_sim_net", "`make kernel`", "tools/kbench"):
        assert needed in text
    assert text.splitlines()[-1] == "Here: there is no vdpa bus (no vdpa module loaded)."


def test_why_none_names_the_missing_piece(tmp_path):
    bus = tmp_path / "vdpa"
    assert "no vdpa bus" in list_cmd.why_none(str(bus))
    (bus / "devices").mkdir(parents=True)
    assert "vhost_vdpa module is not loaded" in list_cmd.why_none(str(bus))
    (bus / "drivers" / "vhost_vdpa").mkdir(parents=True)
    assert "no devices" in list_cmd.why_none(str(bus))
    (bus / "devices" / "vdpa0").mkdir()
    assert "vdpa0 are bound to another driver" in list_cmd.why_none(str(bus))


def test_devices_are_listed_with_driver_and_type(monkeypatch):
    monkeypatch.setattr(list_cmd, "discover", lambda: [SIM_NET, VP])
    result = CliRunner().invoke(main, ["list"])
    assert result.exit_code == 0
    lines = result.stdout.splitlines()
    assert lines[0].split() == ["NODE", "VDPA", "DEVICE", "MGMTDEV", "DRIVER", "TYPE", "VQS", "QSIZE"]
    assert lines[1].split() == ["/dev/vhost-vdpa-0", "vdpa0", "vdpasim_net", "vdpa_sim_net", "net", "3", "256"]
    assert lines[2].split() == ["/dev/vhost-vdpa-2", "vp0", "pci/0000:00:10.0", "vp-vdpa", "blk", "-", "-"]


def test_list_json(monkeypatch):
    monkeypatch.setattr(list_cmd, "discover", lambda: [SIM_NET])
    out = json.loads(CliRunner().invoke(main, ["list", "--json"]).stdout)
    (dev,) = out["devices"]
    assert dev["dev_path"] == "/dev/vhost-vdpa-0" and dev["provider"] == "vdpa_sim_net" and dev["type"] == "net"
    monkeypatch.setattr(list_cmd, "discover", lambda: [])
    assert json.loads(CliRunner().invoke(main, ["list", "--json"]).stdout) == {"devices": []}


def test_list_on_a_terminal_uses_rich(monkeypatch):
    monkeypatch.setattr(list_cmd, "discover", lambda: [SIM_NET])
    monkeypatch.setattr("vdpa_svq.cli._output.is_terminal", lambda: True)
    result = CliRunner().invoke(main, ["list"], env={"COLUMNS": "160"})
    assert result.exit_code == 0
    assert "/dev/vhost-vdpa-0" in result.stdout and "vdpa_sim_net" in result.stdout
    assert "───" in result.stdout  # a rich table's header rule
