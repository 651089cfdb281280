"""The project's DRIVER-side rings driving real devices directly (no shadow ring yet).

Two independent device implementations check the ring code: the kernel's vringh (vdpa_sim, split)
and QEMU's virtio.c packed-ring code behind vp_vdpa (packed, EVENT_IDX).
"""

from __future__ import annotations

import os

import pytest

from kernel_iface import VhostVdpa, uapi
from tests.kernel.frames import check_all_arrived, exchange, peer_socket, talk_both_ways_with_peer
from vdpa_svq.attach import blk_guest, net_guest
from vdpa_svq.guest.frames import build_frame
from vdpa_svq.ring import Layout

pytestmark = pytest.mark.kernel

@pytest.mark.parametrize("count", [300])
def test_vdpa_sim_net_loops_frames_back_through_split_rings(vdpa_sim_net, count):
    with VhostVdpa.open(vdpa_sim_net) as dev:
        guest, drv = net_guest(dev, num=64)
        try:
            assert guest.session.layout is Layout.SPLIT
            frames = [build_frame(seq, 60 + (seq * 37) % 1400) for seq in range(count)]
            received = exchange(drv, frames, count)
            check_all_arrived(received, count)
            assert drv.stats.tx_done == count
            # 64-entry rings carried 300 frames: both rings wrapped several times.
        finally:
            guest.close()


def test_vdpa_sim_blk_sectors_read_back_equal(vdpa_sim_blk):
    with VhostVdpa.open(vdpa_sim_blk) as dev:
        capacity = int.from_bytes(dev.get_config(0, 8), "little")
        guest, blk = blk_guest(dev, num=16)
        try:
            rnd = os.urandom(64 * 1024)
            for i, sector in enumerate([0, 1, 129, capacity - 128]):
                data = rnd[i * 4096 : i * 4096 + 4096 * (i + 1)]
                blk.write(sector, data)
                assert blk.read(sector, len(data)) == data
            blk.flush()
            assert blk.get_id()  # vdpa_sim answers with its id string
        finally:
            guest.close()


def test_vp_vdpa_packed_ring_with_event_idx_talks_to_the_kernel_stack(vp_vdpa, peer_iface):
    count = 100
    peer = peer_socket(peer_iface)
    with VhostVdpa.open(vp_vdpa) as dev:
        guest, drv = net_guest(dev, num=64, packed=True)
        try:
            assert guest.session.layout is Layout.PACKED
            assert guest.session.has(uapi.VIRTIO_RING_F_EVENT_IDX)
            # Our TX -> QEMU's packed virtqueue -> hub -> the guest kernel's virtio_net -> AF_PACKET.
            talk_both_ways_with_peer(drv, peer, count)
        finally:
            guest.close()
            peer.close()
