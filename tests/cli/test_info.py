"""`vdpa-svq info DEV`: software devices decoded; the wrong kind of path gets one exact line."""

from __future__ import annotations

import errno
import json
import os
import struct

import pytest
from click.testing import CliRunner

from kernel_iface.errors import error_from_errno
from vdpa_svq import devices
from vdpa_svq.cli import _device, main
from vdpa_svq.cli.info import decode_blk_config, decode_net_config

from .conftest import one_line_error

PICK = "pick a node from `vdpa-svq list`, or soft:net / soft:blk"


def run(*args: str, **kw):
    return CliRunner().invoke(main, list(args), **kw)


@pytest.fixture
def no_sysfs(monkeypatch, tmp_path):
    """As in a container without /sys/dev/char: only the ioctl probe can tell."""
    monkeypatch.setattr(devices, "SYS_DEV_CHAR", str(tmp_path / "no-sysfs"))


@pytest.fixture
def fake_sysfs(monkeypatch, tmp_path):
    """/sys/dev/char with /dev/null's numbers pointing where `name` says."""

    def make(name: str) -> None:
        st = os.stat("/dev/null")
        target = tmp_path / "devices" / name
        target.mkdir(parents=True)
        (tmp_path / "char").mkdir()
        os.symlink(target, tmp_path / "char" / f"{os.major(st.st_rdev)}:{os.minor(st.st_rdev)}")
        monkeypatch.setattr(devices, "SYS_DEV_CHAR", str(tmp_path / "char"))

    return make


def test_soft_net_is_decoded():
    result = run("info", "soft:net")
    assert result.exit_code == 0, result.output
    fields = {line[:20].strip(): line[20:].strip() for line in result.stdout.splitlines()[1:] if line[:20].strip()}
    assert fields["device"] == "net (virtio id 1), software (SoftNetDevice)"
    assert fields["mac"] == "52:54:00:00:00:01"
    assert fields["link status"] == "0x0001 link up"
    assert fields["mtu"] == "1500"
    assert fields["max vq pairs"] == "1"
    assert fields["status"] == "0x00 (reset)"
    assert fields["virtqueues"] == "2, max size 1024 (vq0 1024, vq1 1024)"
    assert fields["IOVA range"] == "0x0 - 0xffffffffffffffff"
    assert fields["relay"].split()[0] in ("python", "py", "c")
    assert "VIRTIO_NET_F_MAC" in result.stdout and "VHOST_BACKEND_F_SUSPEND" in result.stdout


def test_soft_blk_is_decoded():
    result = run("info", "soft:blk")
    assert result.exit_code == 0, result.output
    assert "capacity          2048 sectors (1048576 bytes, 1 MiB)" in result.stdout
    assert "block size        512" in result.stdout


def test_info_json():
    net = json.loads(run("info", "soft:net", "--json").stdout)
    assert (net["device_id"], net["device_type"]) == (1, "net")
    assert net["config"]["mac"] == "52:54:00:00:00:01"
    assert "VIRTIO_F_VERSION_1" in net["features"]["names"]
    assert int(net["features"]["bits"], 16) >> 32 & 1
    assert net["datapath"] == "c"  # the extension is built for the tests: soft:net's loopback runs in C
    blk = json.loads(run("info", "soft:blk", "--json").stdout)
    assert blk["config"]["capacity_sectors"] == 2048 and blk["config"]["capacity_bytes"] == 2048 * 512
    assert blk["vqs"] == {"count": 1, "max_size": 1024, "sizes": [1024]}
    assert "datapath" not in blk  # soft:blk has only the Python one: nothing to choose, nothing said


def test_info_on_a_terminal_uses_rich(monkeypatch):
    monkeypatch.setattr("vdpa_svq.cli._output.is_terminal", lambda: True)
    result = run("info", "soft:net", env={"COLUMNS": "160"})
    assert result.exit_code == 0
    assert "52:54:00:00:00:01" in result.stdout


def test_dev_null_is_not_a_vhost_vdpa_device_by_sysfs(fake_sysfs):
    fake_sysfs("virtual/mem/null")
    st = os.stat("/dev/null")
    numbers = f"{os.major(st.st_rdev)}:{os.minor(st.st_rdev)}"
    assert one_line_error(run("info", "/dev/null")) == (
        f"vdpa-svq: /dev/null: is not a vhost-vdpa device (character device {numbers} is mem/null); {PICK}"
    )


def test_vhost_net_is_not_a_vhost_vdpa_device(fake_sysfs):
    fake_sysfs("virtual/misc/vhost-net")
    assert "is misc/vhost-net); " in one_line_error(run("info", "/dev/null"))


def test_dev_null_is_not_a_vhost_vdpa_device_by_ioctl(no_sysfs):
    """Without sysfs, /dev/null answers VHOST_VDPA_GET_DEVICE_ID (the probe) with ENOTTY."""
    result = run("info", "/dev/null")
    assert result.exit_code == 1
    assert one_line_error(result) == (
        f"vdpa-svq: /dev/null: is not a vhost-vdpa device (VHOST_VDPA_GET_DEVICE_ID answered ENOTTY); {PICK}"
    )


def test_missing_node():
    result = run("info", "/dev/vhost-vdpa-999")
    assert result.exit_code == 1
    assert one_line_error(result) == f"vdpa-svq: /dev/vhost-vdpa-999: no such device node; {PICK}"


def test_regular_file_and_directory(tmp_path):
    f = tmp_path / "vhost-vdpa-0"
    f.write_text("")
    assert one_line_error(run("info", str(f))) == f"vdpa-svq: {f}: is not a vhost-vdpa device (a regular file); {PICK}"
    assert one_line_error(run("info", str(tmp_path))) == (
        f"vdpa-svq: {tmp_path}: is not a vhost-vdpa device (a directory); {PICK}"
    )


def test_unknown_software_device():
    assert one_line_error(run("info", "soft:scsi")).startswith("vdpa-svq: soft:scsi: unknown software device")


def _open_fails(monkeypatch, err: int) -> None:
    def fail(path: str):
        raise error_from_errno(err, "open", path)

    monkeypatch.setattr("vdpa_svq.devices.VhostVdpa.open", fail)


def test_permission_denied(monkeypatch, no_sysfs):
    _open_fails(monkeypatch, errno.EACCES)
    result = run("info", "/dev/null")
    assert result.exit_code == 1
    assert one_line_error(result) == (
        "vdpa-svq: /dev/null: permission denied opening the device; run as root, or give your user read-write "
        "access to the node (a udev rule, or chmod)"
    )


def test_device_opened_elsewhere_is_busy(monkeypatch, no_sysfs):
    _open_fails(monkeypatch, errno.EBUSY)
    line = one_line_error(run("info", "/dev/null"))
    assert line.startswith("vdpa-svq: /dev/null: device busy: it is already open (by QEMU? another vdpa-svq?)")


def test_owner_already_set_is_busy(monkeypatch):
    """SET_OWNER on an fd that already has an owner: EBUSY from VHOST_SET_OWNER."""
    from vdpa_svq.softdev import SoftNetDevice

    def owned(spec: str):
        dev = SoftNetDevice()
        dev.set_owner()
        return dev

    monkeypatch.setattr(_device, "open_device", owned)
    assert one_line_error(run("info", "soft:net")) == (
        "vdpa-svq: soft:net: device busy: it already has an owner (VHOST_SET_OWNER: EBUSY); close the other user first"
    )


def test_net_config_fields_follow_the_feature_bits():
    """VIRTIO 1.2, 5.1.4: mac only with VIRTIO_NET_F_MAC, status with _STATUS, mtu with _MTU, pairs with _MQ."""
    cfg = bytes.fromhex("525400123456") + struct.pack("<HHH", 1, 4, 9000)  # mac, status, pairs, mtu
    assert decode_net_config(cfg, 0) == {"mac": None, "status": None, "max_virtqueue_pairs": 1, "mtu": None}
    full = decode_net_config(cfg, 1 << 5 | 1 << 16 | 1 << 22 | 1 << 3)
    assert full == {
        "mac": "52:54:00:12:34:56",
        "status": {"value": 1, "link_up": True, "announce": False},
        "max_virtqueue_pairs": 4,
        "mtu": 9000,
    }
    assert decode_net_config(cfg[:6], 1 << 3)["mtu"] is None  # config space too short for the field


def test_blk_config_fields_follow_the_feature_bits():
    """VIRTIO 1.2, 5.2.4: capacity always (512-byte sectors), blk_size with VIRTIO_BLK_F_BLK_SIZE."""
    cfg = bytearray(36)
    cfg[0:8] = (0x40000).to_bytes(8, "little")
    cfg[20:24] = (4096).to_bytes(4, "little")
    cfg[34:36] = (4).to_bytes(2, "little")
    assert decode_blk_config(bytes(cfg), 0) == {
        "capacity_sectors": 0x40000, "capacity_bytes": 0x40000 * 512, "block_size": None, "read_only": False,
        "num_queues": 1,
    }
    got = decode_blk_config(bytes(cfg), 1 << 6 | 1 << 5 | 1 << 12)
    assert (got["block_size"], got["read_only"], got["num_queues"]) == (4096, True, 4)
