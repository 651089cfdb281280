"""Live migration of a real VM through `vdpa-svq serve` (issue 13): QEMU as the vhost-user frontend,
a Linux guest whose own virtio_net driver carries netcheck's sequence-derived frames, migrated
A -> B -> A while the traffic runs (vdpa_svq/migration/run.py).

Each leg must complete, the guest must go on on the destination, both stopped guests' RAM must be
equal page for page (QEMU's pmemsave: the destination got every page the device wrote), and at the
end netcheck must count corrupt = 0, missing = 0, dup = 0. Needs the kernel bench's cache (its
kernel, and the backports QEMU `tools/kbench setup` unpacks): `make migrate-test` sets it up.
"""

from __future__ import annotations

import pytest

from vdpa_svq.migration.run import Config, run

pytestmark = pytest.mark.migration


@pytest.mark.parametrize("packed", [False, True], ids=["split", "packed"])
def test_migrates_there_and_back_with_nothing_lost(packed: bool, tmp_path) -> None:
    result = run(Config(packed=packed), workdir=tmp_path)
    assert result.ok, result.verdict() + "\n" + "\n".join(
        f"serve {name}: " + "\n  ".join(lines) for name, lines in result.serve.items())
    assert len(result.legs) == 2
    assert all(leg.pages_differ == 0 for leg in result.legs)


def test_reference_backend_migrates_too(tmp_path) -> None:
    """QEMU's own virtio-net on the same guest: the figures vdpa-svq is measured beside. Frames in
    flight in the host's UDP socket at the switchover are lost there, so only memory and the guest
    going on are checked."""
    result = run(Config(backend="qemu"), workdir=tmp_path)
    assert result.error is None, result.verdict()
    assert all(leg.status == "completed" and leg.frames_after > leg.frames_before for leg in result.legs)
    assert all(leg.pages_differ == 0 for leg in result.legs), result.verdict()
    assert result.final.get("corrupt") == 0 and result.final.get("dup") == 0, result.verdict()


# Paced traffic: at full rate Linux frees and reallocates (and zeroes) its receive pages faster than
# QEMU's iterations go, so QEMU sends nearly every page the device wrote for the guest's own write,
# and a dead dirty log goes unseen. At PACED_RATE a receive buffer waits about a second between the
# guest posting it and the device filling it: only the dirty log can tell QEMU about that page.
PACED_RATE = 300


@pytest.mark.parametrize("packed", [False, True], ids=["split", "packed"])
def test_paced_traffic_migrates_exactly(packed: bool, tmp_path) -> None:
    result = run(Config(packed=packed, rate=PACED_RATE), workdir=tmp_path)
    assert result.ok, result.verdict()


def test_a_dead_dirty_log_fails_the_migration(tmp_path) -> None:
    """serve with its test-only fault hook (VDPA_SVQ_FAULT_DROP_DIRTY_PAGES): every mark the device
    makes is thrown away. The destination must miss pages the device wrote, and the test say so.
    Without MRG_RXBUF: with it, Linux writes into its receive pages itself (Config.mrg_rxbuf)."""
    result = run(Config(rate=PACED_RATE, fault=True, legs=1, mrg_rxbuf=False), workdir=tmp_path)
    assert not result.ok, result.verdict()
    assert result.legs and result.legs[0].status == "completed", result.verdict()
    assert result.legs[0].pages_differ, result.verdict()


@pytest.mark.parametrize("packed", [False, True], ids=["split", "packed"])
def test_multiqueue_migrates_there_and_back_with_nothing_lost(packed: bool, tmp_path) -> None:
    """queues=2 (mq=on, 2 vCPUs, a netcheck stream per pair): the guest's VQ_PAIRS_SET reaches
    QEMU, QEMU enables pair 1 on serve, serve tells soft:net,pairs=2's control queue (VIRTIO 1.2
    5.1.6.5.5); both pairs carry frames on both sides, and nothing is lost or corrupted."""
    result = run(Config(packed=packed, queues=2), workdir=tmp_path)
    assert result.ok, result.verdict() + "\n" + "\n".join(
        f"serve {name}: " + "\n  ".join(lines) for name, lines in result.serve.items())
    assert all(leg.pages_differ == 0 for leg in result.legs)
    assert result.final.get("streams") == 2
    for lines in result.serve.values():  # pair 1 (queues 2, 3) moved frames through serve
        assert not any("device queue" in line and "stopped" in line for line in lines), lines
        assert any("2 queue pair(s) enabled" in line for line in lines), lines
        assert any(line.strip().startswith("queue 3:") and not line.strip().startswith("queue 3: 0 ")
                   for line in lines), lines
