"""DPDK testpmd's virtio-user with two queue pairs through `vdpa-svq serve soft:net,pairs=2`, as the scaling
bench (bench/scaling.py) runs it: both pairs carry traffic, and testpmd's per-queue figures, read by
vdpa_svq.vhost_user.testpmd.per_queue, agree with its totals and with what serve relayed on each queue.
A missing dpdk-testpmd FAILS (`make test` installs it)."""

from __future__ import annotations

import os

from vdpa_svq.vhost_user import testpmd as tp

from .testpmd import IN_FLIGHT, RUN_S, TIMEOUT_S, accumulated, find_testpmd, start_serve, stop_serve

PAIRS = 2


def test_testpmd_two_pairs_forward_on_both_and_per_queue_counts_add_up(tmp_path):
    """VIRTIO 1.2 5.1.2 / 5.1.6.5.5: with VIRTIO_NET_F_MQ the queues are rx0, tx0, rx1, tx1, ..., ctrl, and
    the driver enables pairs with VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET; soft:net loops each pair's TX back to
    that pair's RX. testpmd (--rxq=2 --txq=2, one forwarding lcore, a first burst on each queue) then
    receives on both queues; its per-stream RX counts sum to its port total, and serve returned at least
    that many buffers on each RX queue (rx0 = queue 0, rx1 = queue 2)."""
    binary = find_testpmd()
    sock = str(tmp_path / "vu.sock")
    proc = start_serve(f"soft:net,pairs={PAIRS}", sock)
    try:
        run = tp.run_frontend(sock, False, RUN_S, f"vdpasvq-{os.getpid()}-pairs", start_timeout=TIMEOUT_S - RUN_S,
                              stop_timeout=TIMEOUT_S - RUN_S, binary=binary, queues=PAIRS)
        assert run.started, run.log[-3000:]
    finally:
        (summary,) = stop_serve(proc)
    rx, tx = accumulated(run.log)
    streams = tp.per_queue(run.log)
    assert sorted(streams) == list(range(PAIRS)), run.log[-3000:]
    assert all(q_rx > 0 for q_rx, _ in streams.values()), streams
    assert sum(q_rx for q_rx, _ in streams.values()) == rx, (streams, rx)
    assert sum(q_tx for _, q_tx in streams.values()) == tx, (streams, tx)
    assert summary["error"] is None, summary
    for q, (q_rx, q_tx) in streams.items():
        relayed = summary["queues"]
        assert relayed[str(2 * q)]["returned"] >= q_rx, (q, streams, relayed)
        assert relayed[str(2 * q + 1)]["returned"] >= q_tx - IN_FLIGHT, (q, streams, relayed)


def test_per_queue_reads_each_stream_and_leaves_out_other_ports():
    """The per-stream blocks testpmd 22.11 prints at stop (fwd_stream_stats_display), verbatim in form."""
    log = """
  ------- Forward Stats for RX Port= 0/Queue= 0 -> TX Port= 0/Queue= 0 -------
  RX-packets: 1574464        TX-packets: 1574496        TX-dropped: 0

  ------- Forward Stats for RX Port= 0/Queue= 1 -> TX Port= 0/Queue= 1 -------
  RX-packets: 1574176        TX-packets: 1574208        TX-dropped: 0

  ------- Forward Stats for RX Port= 1/Queue= 0 -> TX Port= 1/Queue= 0 -------
  RX-packets: 7        TX-packets: 7        TX-dropped: 0
"""
    assert tp.per_queue(log) == {0: (1574464, 1574496), 1: (1574176, 1574208)}
    assert tp.per_queue("no streams here") == {}
    assert tp.queue_args(1) == [] and tp.queue_args(2) == ["--rxq=2", "--txq=2"]
