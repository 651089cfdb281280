"""The live switch on real devices: passthrough -> shadowed -> passthrough mid-traffic.

vdpa_sim offers VHOST_BACKEND_F_SUSPEND: the switch must lose and repeat nothing. vp_vdpa cannot
suspend nor report its ring state: the switch must refuse with the reason, and leave the device
working.
"""

from __future__ import annotations

import os
import time

import pytest

from kernel_iface import VhostVdpa
from tests.kernel.frames import check_all_arrived
from vdpa_svq.attach import SHADOW, blk_guest, net_guest
from vdpa_svq.guest.frames import build_frame
from vdpa_svq.session import SessionError

pytestmark = pytest.mark.kernel


class Traffic:
    def __init__(self, drv) -> None:
        self.drv, self.seq, self.got = drv, 0, []

    def pump(self, rounds: int) -> None:
        for _ in range(rounds):
            while self.drv.send(build_frame(self.seq, 60 + (self.seq * 29) % 1400)):
                self.seq += 1
            self.drv.flush()
            self.got.extend(self.drv.reap())
            self.drv.wait(0.01)

    def finish(self, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while len(self.got) < self.seq and time.monotonic() < deadline:
            self.drv.flush()
            self.got.extend(self.drv.reap())
            self.drv.wait(0.05)
        check_all_arrived(self.got, self.seq)


def test_vdpa_sim_net_switches_both_ways_mid_traffic_without_loss(vdpa_sim_net):
    with VhostVdpa.open(vdpa_sim_net) as dev:
        guest, drv = net_guest(dev, num=64)
        drv.rx_spans = []
        t = Traffic(drv)
        try:
            t.pump(5)
            guest.switch_to_shadow()
            assert guest.mode == SHADOW
            before = t.seq
            t.pump(5)
            assert t.seq > before, "no traffic while shadowed"
            logged = set(guest.shadow.dirty.dirty_pages())
            assert logged, "shadowed traffic must dirty pages"
            guest.switch_to_passthrough()
            t.pump(5)
            guest.switch_to_shadow()
            t.pump(5)
            t.finish()
            assert guest.errors() == {}
        finally:
            guest.close()


def test_vdpa_sim_blk_through_shadow_reads_back(vdpa_sim_blk):
    with VhostVdpa.open(vdpa_sim_blk) as dev:
        guest, blk = blk_guest(dev, num=16)
        try:
            data = os.urandom(8192)
            blk.write(8, data)
            guest.switch_to_shadow()
            assert blk.read(8, len(data)) == data
            blk.write(64, data[::-1])
            assert blk.read(64, len(data)) == data[::-1]
            data_page = blk.pool.gpa // 4096
            assert data_page in guest.shadow.dirty.dirty_pages(), "the read's buffer must be logged dirty"
            assert guest.errors() == {}
        finally:
            guest.close()


def test_vp_vdpa_refuses_the_switch_and_says_why(vp_vdpa):
    with VhostVdpa.open(vp_vdpa) as dev:
        guest, drv = net_guest(dev, num=64, packed=True)
        try:
            with pytest.raises(SessionError, match="cannot suspend"):
                guest.switch_to_shadow()
            assert guest.mode == "passthrough"
        finally:
            guest.close()
