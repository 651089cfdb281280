"""Shadow virtqueues in front of real devices: the device sees only vdpa-svq's rings.

Guest split and packed over vdpa_sim net (split shadow ring, kernel vringh as the device) and over
vp_vdpa (packed shadow ring with EVENT_IDX, QEMU's virtio-net as the device): every frame is
verified end to end, and every RX buffer page the device wrote is in the dirty log.
"""

from __future__ import annotations

import pytest

from kernel_iface import VhostVdpa, uapi
from tests.kernel.frames import check_all_arrived, exchange, peer_socket, talk_both_ways_with_peer
from vdpa_svq.attach import net_guest
from vdpa_svq.guest.frames import build_frame
from vdpa_svq.ring import Layout

pytestmark = pytest.mark.kernel


def check_dirty_log(guest, drv) -> None:
    logged = set(guest.shadow.dirty.dirty_pages())
    written = {p for gpa, n in drv.rx_spans if n for p in range(gpa // 4096, (gpa + n - 1) // 4096 + 1)}
    assert written, "the device wrote nothing?"
    assert written <= logged, f"pages the device wrote but the log misses: {sorted(written - logged)[:10]}"
    used_ring_page = guest.layout.rings[0].device // 4096 if guest.guest_layout is Layout.SPLIT else None
    if used_ring_page is not None:
        assert used_ring_page in logged, "the relay's writes to the guest used ring must be logged"


@pytest.mark.parametrize("impl", ["c", "py"])
@pytest.mark.parametrize("guest_layout", [Layout.SPLIT, Layout.PACKED], ids=["guest-split", "guest-packed"])
def test_vdpa_sim_net_through_split_shadow(vdpa_sim_net, guest_layout, impl):
    count = 200
    with VhostVdpa.open(vdpa_sim_net) as dev:
        guest, drv = net_guest(dev, num=64, shadow=True, guest_layout=guest_layout, impl=impl)
        drv.rx_spans = []
        try:
            assert guest.session.layout is Layout.SPLIT
            assert guest.shadow.queues[0].svq.impl == impl
            frames = [build_frame(seq, 60 + (seq * 37) % 1400) for seq in range(count)]
            check_all_arrived(exchange(drv, frames, count), count)
            assert guest.shadow.errors() == {}
            stats = guest.shadow.queues[1].svq.stats
            assert stats.forwarded == count
            check_dirty_log(guest, drv)
        finally:
            guest.close()


@pytest.mark.parametrize("impl", ["c", "py"])
@pytest.mark.parametrize("guest_layout", [Layout.SPLIT, Layout.PACKED], ids=["guest-split", "guest-packed"])
def test_vp_vdpa_through_packed_shadow_with_event_idx(vp_vdpa, peer_iface, guest_layout, impl):
    count = 60
    peer = peer_socket(peer_iface)
    with VhostVdpa.open(vp_vdpa) as dev:
        guest, drv = net_guest(dev, num=64, shadow=True, guest_layout=guest_layout, packed=True, impl=impl)
        drv.rx_spans = []
        try:
            assert guest.session.layout is Layout.PACKED
            assert guest.session.has(uapi.VIRTIO_RING_F_EVENT_IDX)
            talk_both_ways_with_peer(drv, peer, count)
            assert guest.shadow.errors() == {}
            check_dirty_log(guest, drv)
        finally:
            guest.close()
            peer.close()
