"""A real, independent vhost-user frontend: DPDK testpmd's virtio-user against `vdpa-svq serve soft:net`
(see testpmd.py). A missing dpdk-testpmd FAILS: `make test` installs it (tools/debian-packages.txt)."""

from __future__ import annotations

import json
import signal

import pytest

from kernel_iface import uapi
from vdpa_svq.softdev.net import DEFAULT_MAC
from vdpa_svq.vhost_user.messages import ProtocolFeature

from .testpmd import (
    IN_FLIGHT,
    accumulated,
    find_testpmd,
    port_mac,
    run_testpmd,
    split_then_packed,
    start_serve,
    stop_serve,
)


# Both relays: the Python one once tore le16 indexes (struct writes byte by byte) and DPDK, reading
# them concurrently from another process, saw a used index run backwards and re-posted buffers in flight.
@pytest.fixture(params=["c", "py"])
def served(tmp_path, request):
    sock = str(tmp_path / "vu.sock")
    proc = start_serve("soft:net", sock, impl=request.param)
    yield sock, proc
    if proc.poll() is None:
        proc.kill()
        proc.communicate()


def test_testpmd_virtio_user_split_then_packed_through_the_relay(served):
    """Split, then packed (a reconnect), from DPDK's virtio-user: frames loop back through the
    shadow relay; testpmd's RX and TX agree within the frames in flight; the server survives both."""
    binary = find_testpmd()
    sock, proc = served
    split_then_packed(binary, sock, proc)


def test_testpmd_virtio_user_and_the_device_mac(tmp_path):
    """serve offers protocol feature CONFIG and VIRTIO_NET_F_MAC (soft:net has a MAC). A frontend
    that acks CONFIG must show the device's MAC. DPDK 22.11's virtio-user does not: over vhost-user
    it has no get_config (virtio_ops_user in drivers/net/virtio/virtio_user/vhost_user.c has none;
    only virtio_ops_vdpa, for /dev/vhost-vdpa-N, has), it acks only MQ, REPLY_ACK and STATUS
    (VHOST_USER_SUPPORTED_PROTOCOL_FEATURES), and virtio_user_dev_set_features strips MAC and
    STATUS from SET_FEATURES. So virtio_user_dev_init_mac finds no MAC and makes one up; this
    checks that is the reason, and fails when a DPDK that reads the config gets a wrong MAC."""
    binary = find_testpmd()
    sock = str(tmp_path / "vu.sock")
    proc = start_serve("soft:net", sock)
    try:
        log = run_testpmd(binary, sock, False, "mac", run_s=1)
        (summary,) = stop_serve(proc)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert summary["error"] is None, summary
    device_mac = DEFAULT_MAC.hex(":").upper()
    if summary["protocol_features"] >> ProtocolFeature.CONFIG & 1:
        assert port_mac(log) == device_mac
    else:
        assert "No valid MAC in devargs or device, use random" in log, log[-3000:]
        assert port_mac(log) != device_mac
        assert not summary["features"] >> uapi.VIRTIO_NET_F_MAC & 1


@pytest.mark.parametrize("packed", [False, True], ids=["split", "packed"])
def test_testpmd_virtio_user_through_the_busy_polling_relay(tmp_path, packed):
    """`serve --poll-us 100` under DPDK's PMD (which polls its own rings and suppresses
    notifications its way): frames flow both ways through a relay that spends its bursts polling with
    notifications off, no queue stops, and the pump really polled.

    Bursts of 8: soft:net (a Python thread) answers those within the 100 us window, and the pump
    polls thousands of rounds in 2 s. With testpmd's 32 it mostly answers later, each phase ends
    empty, and the rounds over a run were anywhere from 2 to thousands (on 2 CPUs)."""
    binary = find_testpmd()
    sock = str(tmp_path / "vu.sock")
    proc = start_serve("soft:net", sock, impl="c", extra=("--poll-us", "100"))
    try:
        log = run_testpmd(binary, sock, packed, "poll-packed" if packed else "poll-split", run_s=2, burst=8)
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, err
    assert " stopped: " not in err, f"the relay stopped a queue:\n{err}"
    rx, tx = accumulated(log)
    assert rx > 0 and tx > 0, f"RX {rx}, TX {tx}\n{log[-3000:]}\n{out}\n{err}"
    assert 0 <= tx - rx <= IN_FLIGHT, f"RX {rx} and TX {tx} differ by more than the in-flight window"
    summaries = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    assert [s["guest_layout"] for s in summaries] == ["packed" if packed else "split"], out + err
    (s,) = summaries
    assert s["error"] is None, s
    assert s["queues"]["0"]["returned"] >= rx and s["queues"]["1"]["returned"] >= tx - IN_FLIGHT, s
    for q in s["queues"].values():
        assert {"device_kicks", "guest_calls"} <= q.keys(), q
    loop = s["relay_loop"]
    assert loop["poll_rounds"] > 0, f"the pump never polled: {loop}"
    assert 0 < loop["poll_phases"] <= loop["wakeups"], loop
