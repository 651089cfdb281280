"""A vhost-user backend as the device (`vhost-user:PATH`): DPDK's vhost PMD, an independent device
implementation of split and packed rings with EVENT_IDX, forwarding frames back (testpmd io mode).

The in-process guest (`attach`) and DPDK's virtio-user (`serve`) drive it through the shadow
virtqueues; every frame is checked, and the dirty log holds the pages DPDK wrote.
"""

from __future__ import annotations

import json
import os
import socket

import pytest
from click.testing import CliRunner

from bench.vhost_user import backend, stop
from vdpa_svq import devices
from vdpa_svq.cli import main
from vdpa_svq.dump import read_dump
from vdpa_svq.errors import GuestMemoryError, VdpaSvqError
from vdpa_svq.memory.guest import GuestMemory, backing
from vdpa_svq.ring import Layout
from vdpa_svq.vhost_user.device import VhostUserDevice

from .client import VhostUserFrontend
from .testpmd import find_testpmd, split_then_packed, start_serve


@pytest.fixture
def dpdk_device(tmp_path):
    """DPDK testpmd's vhost PMD listening on a socket, forwarding what it receives back (io mode)."""
    find_testpmd()  # fails (never skips) when dpdk-testpmd is missing
    sock = str(tmp_path / "device.sock")
    proc = backend("dpdk-vhost", "", sock, f"dev-{os.getpid()}")
    yield sock
    out = stop(proc)
    # What DPDK counted (RX/TX packets, dropped), shown with a failing test's captured output: it
    # tells frames DPDK dropped for want of RX buffers from frames it never took.
    print("dpdk-testpmd's last output:", *out.splitlines()[-25:], sep="\n")


@pytest.mark.parametrize("guest", ["split", "packed"])
@pytest.mark.parametrize("shadow", ["split", "packed"])
def test_attach_through_dpdk_vhost_verifies_every_frame_and_logs_its_writes(dpdk_device, guest, shadow, tmp_path):
    dump = tmp_path / "x.vdl"
    result = CliRunner().invoke(main, ["attach", f"vhost-user:{dpdk_device}", "--guest-layout", guest,
                                       "--shadow-layout", shadow, "--duration", "1", "--dirty-log", str(dump),
                                       "--json"])
    assert result.exit_code == 0, result.output
    s = json.loads(result.stdout)
    assert s["ok"] and s["shadow_layout"] == shadow and s["guest_layout"] == guest
    counters = {k: s[k] for k in ("frames_sent", "frames_tx_done", "frames_received", "frames_verified", "queues",
                                  "relay_loop", "errors")}
    assert s["frames_sent"] > 100 and s["frames_verified"] == s["frames_sent"], json.dumps(counters)
    assert s["queues"]["0"]["bytes_written"] > 0, "DPDK wrote the frames into the RX buffers"
    assert read_dump(dump).union(), "the pages DPDK wrote are in the dirty log"


def test_testpmd_through_serve_to_dpdk_vhost_split_then_packed(dpdk_device, tmp_path):
    """Two independent DPDK drivers, virtio-user as the guest and the vhost PMD as the device, with
    vdpa-svq's shadow virtqueues between them: traffic both ways, counts that agree, and a second
    frontend (packed after split) on the same device connection, renegotiated after a reset."""
    sock = str(tmp_path / "serve.sock")
    proc = start_serve(f"vhost-user:{dpdk_device}", sock)
    try:
        counts = split_then_packed(find_testpmd(), sock, proc, 2, 60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert all(rx > 1000 for rx, _ in counts.values()), counts


def test_a_socket_nobody_listens_on_is_one_clear_error(tmp_path):
    with pytest.raises(OSError, match="no vhost-user backend listens there"):
        devices.open_device(f"vhost-user:{tmp_path}/nothing.sock")


@pytest.mark.parametrize("spec,why", [("vhost-user:", "no socket path"), ("vhost-user:/x,kind=gpu", "unknown option")])
def test_bad_specs_are_refused(spec, why):
    with pytest.raises(VdpaSvqError, match=why):
        devices.open_device(spec)


def test_the_cli_says_it_in_one_line(tmp_path):
    result = CliRunner().invoke(main, ["attach", f"vhost-user:{tmp_path}/nothing.sock", "--duration", "0.1"])
    assert result.exit_code != 0 and "Traceback" not in result.output
    assert "no vhost-user backend listens there" in result.output


def test_iotlb_updates_name_memory_of_this_process():
    """What a vhost-user device sends instead of addresses: the file and offset behind them."""
    with GuestMemory.create(3 * 4096, gpa=0x10000) as mem:
        region = mem.regions[0]
        assert backing(region.hva + 4096, 4096) == (region.fd, 4096)
        with pytest.raises(GuestMemoryError):
            backing(region.hva + 2 * 4096, 2 * 4096)  # runs past the region
    with pytest.raises(GuestMemoryError):
        backing(region.hva, 4096)  # closed: forgotten


def test_a_backend_that_hangs_up_is_an_error_not_a_hang(tmp_path):
    import threading

    path = str(tmp_path / "rude.sock")
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.bind(path)
    srv.listen(1)

    def rude() -> None:
        conn, _ = srv.accept()
        conn.recv(64)
        conn.close()

    t = threading.Thread(target=rude)
    t.start()
    dev = VhostUserDevice.connect(path)
    try:
        with pytest.raises(OSError, match="hung up"):
            dev.get_features()
    finally:
        dev.close()
        t.join()
        srv.close()



def test_info_on_a_vhost_user_backend(dpdk_device):
    result = CliRunner().invoke(main, ["info", f"vhost-user:{dpdk_device}"])
    assert result.exit_code == 0, result.output
    assert "VIRTIO_F_RING_PACKED" in result.output  # DPDK's features, as the backend offers them
    assert "none (the device has no config space)" in result.output


def test_a_device_that_dies_closes_the_connection_and_ends_serve(tmp_path):
    """DPDK's backend killed while the relay runs: the frontend sees its connection closed (not queues
    that silently stopped), and serve ends with one line naming the device, exit 1."""
    find_testpmd()
    dev_sock, sock = str(tmp_path / "device.sock"), str(tmp_path / "serve.sock")
    device = backend("dpdk-vhost", "", dev_sock, f"die-{os.getpid()}")
    proc = start_serve(f"vhost-user:{dev_sock}", sock)
    try:
        conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        conn.connect(sock)
        fe = VhostUserFrontend(conn, Layout.SPLIT)
        fe.setup()
        device.kill()
        device.communicate()
        conn.settimeout(10)
        assert conn.recv(1) == b"", "serve must close the frontend's connection"
        fe.close()
        out, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
        if device.poll() is None:
            device.kill()
            device.communicate()
    assert proc.returncode == 1, (out, err)
    assert "the backend hung up" in out + err and "Traceback" not in err
