"""The CLI on the bench's real devices: `list` finds the three with their drivers, `info` decodes each
one's config space, and a node this process already holds is reported busy in one line."""

from __future__ import annotations

import json
import os

import pytest
from click.testing import CliRunner

from kernel_iface import VhostVdpa
from vdpa_svq.cli import main

pytestmark = pytest.mark.kernel

VP_VDPA_MGMTDEV = "pci/0000:00:10.0"  # fixed by tools/kbench (VP_VDPA_BDF)
VDPASIM_BLK_CAPACITY = 0x40000  # sectors; drivers/vdpa/vdpa_sim/vdpa_sim_blk.c


def run(*args: str):
    result = CliRunner().invoke(main, list(args))
    print(result.output)
    return result


def test_list_shows_the_bench_devices_with_their_drivers(vdpa_sim_net, vdpa_sim_blk, vp_vdpa):
    result = run("list", "--json")
    assert result.exit_code == 0, result.output
    found = {d["dev_path"]: d for d in json.loads(result.stdout)["devices"]}
    expect = {
        vdpa_sim_net: ("vdpasim_net", "vdpa_sim_net", "net"),
        vdpa_sim_blk: ("vdpasim_blk", "vdpa_sim_blk", "blk"),
        vp_vdpa: (VP_VDPA_MGMTDEV, "vp-vdpa", "net"),
    }
    for node, want in expect.items():
        d = found[node]
        assert (d["mgmtdev"], d["provider"], d["type"], d["driver"]) == (*want, "vhost_vdpa")

    text = run("list").stdout
    rows = {line.split()[0]: line.split() for line in text.splitlines()[1:]}
    for node, (mgmtdev, provider, kind) in expect.items():
        assert [mgmtdev, provider, kind] == rows[node][2:5]


def test_info_decodes_the_sim_net_mac(vdpa_sim_net):
    result = run("info", vdpa_sim_net, "--json")
    assert result.exit_code == 0, result.output
    info = json.loads(result.stdout)
    assert (info["device_id"], info["kind"]) == (1, "vhost-vdpa")
    assert info["config"]["mac"] == os.environ["KBENCH_VDPA_SIM_NET_MAC"]
    assert "VIRTIO_F_ACCESS_PLATFORM" in info["features"]["names"]
    assert "VHOST_BACKEND_F_IOTLB_MSG_V2" in info["backend_features"]["names"]
    assert info["vqs"]["count"] >= 2 and info["vqs"]["max_size"] == 256
    assert info["address_spaces"]["as_num"] >= 1
    text = run("info", vdpa_sim_net).stdout
    assert f"mac               {os.environ['KBENCH_VDPA_SIM_NET_MAC']}" in text


def test_info_decodes_the_vp_vdpa_mac(vp_vdpa):
    result = run("info", vp_vdpa, "--json")
    assert result.exit_code == 0, result.output
    info = json.loads(result.stdout)
    assert info["config"]["mac"] == os.environ["KBENCH_VP_VDPA_MAC"]
    assert "VIRTIO_F_RING_PACKED" in info["features"]["names"]


def test_info_decodes_the_sim_blk_capacity(vdpa_sim_blk):
    result = run("info", vdpa_sim_blk, "--json")
    assert result.exit_code == 0, result.output
    cfg = json.loads(result.stdout)["config"]
    assert cfg["capacity_sectors"] == VDPASIM_BLK_CAPACITY
    assert cfg["capacity_bytes"] == VDPASIM_BLK_CAPACITY * 512
    text = run("info", vdpa_sim_blk).stdout
    assert f"capacity          {VDPASIM_BLK_CAPACITY} sectors ({VDPASIM_BLK_CAPACITY * 512} bytes, 128 MiB)" in text


def test_a_node_already_open_and_owned_is_busy(vdpa_sim_net):
    """vhost-vdpa allows one opener: a second open() is EBUSY, whoever holds the first."""
    with VhostVdpa.open(vdpa_sim_net) as dev:
        dev.set_owner()
        result = run("info", vdpa_sim_net)
    assert result.exit_code == 1
    assert "Traceback" not in result.output
    assert result.stderr == (
        f"vdpa-svq: {vdpa_sim_net}: device busy: it is already open (by QEMU? another vdpa-svq?) and vhost-vdpa "
        "allows one opener; close it there, or pick another node from `vdpa-svq list`\n"
    )
    assert run("info", vdpa_sim_net).exit_code == 0, "closing the first fd frees the node"

