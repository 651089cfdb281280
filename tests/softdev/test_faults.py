"""Device faults: what the IOTLB forbids breaks one queue with a clear reason; the rest goes on."""

from __future__ import annotations

import pytest

from kernel_iface import uapi
from tests.softdev.driver import PAGE, RX, TX, BlkDriver, NetDriver, net_hdr
from vdpa_svq.guest.blk import VIRTIO_BLK_T_IN
from vdpa_svq.softdev import SoftBlkDevice, SoftNetDevice

RO, RW = uapi.VHOST_ACCESS_RO, uapi.VHOST_ACCESS_RW


def _data_ro(drv_cls, dev, **kw):
    """A driver whose data slots are mapped read-only (rings and indirect tables read-write)."""
    plan = drv_cls.plan_for(dev, **kw)
    data_base, end = plan.pools[0].gpa, plan.size
    return drv_cls(dev, maps=[(0, data_base, RW), (data_base, end - data_base, RO)], **kw)


@pytest.mark.parametrize("packed", [False, True], ids=["split", "packed"])
def test_rx_buffer_in_read_only_mapping_breaks_rx_and_tx_goes_on(packed):
    """The device must not write a read-only mapping: the RX queue breaks (reported on its err
    eventfd, reason in queue_errors()), and TX keeps completing frames, dropped for want of RX."""
    drv = _data_ro(NetDriver, SoftNetDevice(), packed=packed, num=16)
    try:
        drv.post_rx(2)
        drv.send(b"frame", net_hdr(0))
        reason = drv.wait_error(RX)
        assert reason.startswith("rx: ") and "device write to a read-only mapping" in reason
        assert drv.complete_tx(1) == 1
        for i in range(3):  # TX goes on
            drv.send(b"more", net_hdr(i))
        assert drv.complete_tx(3) == 3
        assert drv.dev.queue_errors().keys() == {RX}
        stats = drv.dev.stats()
        assert stats["tx"].dropped == 4 and stats["rx"].chains == 0
        assert drv.reap_all(RX) == []  # nothing was marked used on the broken queue
    finally:
        drv.close()


def test_blk_read_into_read_only_buffer_breaks_the_queue():
    drv = _data_ro(BlkDriver, SoftBlkDevice(sectors=8), num=8)
    try:
        drv.submit(VIRTIO_BLK_T_IN, 0, in_len=512)
        drv.kick(0)
        assert "read-only" in drv.wait_error(0)
        assert drv.dev.get_status() & uapi.VIRTIO_CONFIG_S_DRIVER_OK  # the device itself is fine
    finally:
        drv.close()


def test_used_ring_in_read_only_mapping_breaks_the_queue_at_driver_ok():
    """The split used ring is device-written; mapped RO, the queue cannot start."""
    dev = SoftBlkDevice()
    plan = BlkDriver.plan_for(dev, num=8)
    size = plan.size
    dev_page = plan.rings[0].device
    maps = [(0, dev_page, RW), (dev_page, PAGE, RO), (dev_page + PAGE, size - dev_page - PAGE, RW)]
    drv = BlkDriver(dev, num=8, maps=maps)
    try:
        reason = drv.dev.queue_errors()[0]
        assert "cannot start ring" in reason and "not writable" in reason
    finally:
        drv.close()


def test_unmapped_buffer_breaks_the_queue():
    """A descriptor pointing outside every IOTLB mapping is a guest ring error."""
    drv = NetDriver(SoftNetDevice(), num=8)
    try:
        ring = drv.queues[TX].ring
        ring.add([(0x7000_0000, 12)], (), "nowhere")
        drv.post_rx(1)
        drv.kick(TX)
        assert "outside guest memory" in drv.wait_error(TX)
    finally:
        drv.close()


def test_datapath_exception_is_recorded_never_silent():
    """An unexpected exception in the datapath thread is kept, the device asks for a reset
    (DEVICE_NEEDS_RESET) and every queue reports it on its err eventfd."""
    dev = SoftNetDevice(datapath="py")  # the Python datapath's process() is the one made to fail
    drv = NetDriver(dev, num=8)
    try:

        def boom() -> bool:
            raise RuntimeError("boom")

        dev.process = boom  # type: ignore[method-assign]
        drv.post_rx(1)
        drv.send(b"x", net_hdr(0))
        assert "datapath thread died (RuntimeError): boom" in drv.wait_error(TX)
        assert isinstance(dev.datapath_error, RuntimeError)
        assert dev.get_status() & uapi.VIRTIO_CONFIG_S_NEEDS_RESET
        dev.set_status(0)  # a reset recovers
        assert dev.datapath_error is None and dev.queue_errors() == {}
    finally:
        drv.close()


def test_invalidated_mapping_is_no_longer_reachable():
    """Buffers are translated on every access: after IOTLB invalidate the device cannot reach
    them any more (the rings, translated at DRIVER_OK, keep working)."""
    drv = NetDriver(SoftNetDevice(), num=8)
    try:
        drv.post_rx(2)
        drv.send(b"before", net_hdr(0))
        assert drv.recv(1)[0][12:] == b"before"
        drv.complete_tx(1)
        drv.dev.iotlb_invalidate(drv.data_base, 1)  # removes the one mapping of all memory...
        drv.dev.iotlb_update(0, drv.data_base, drv.mem.hva(0))  # ...give the rings back only
        drv.send(b"after", net_hdr(1))
        # The device ring checks each descriptor against the IOTLB before any byte is read.
        assert "outside guest memory" in drv.wait_error(TX)
    finally:
        drv.close()


def test_reset_while_frames_flow_stops_the_thread():
    import threading

    drv = NetDriver(SoftNetDevice(), num=16)
    try:
        drv.post_rx(16)
        for i in range(6):
            drv.send(b"z" * 500, net_hdr(i))
        drv.dev.set_status(0)
        assert not [t for t in threading.enumerate() if t.name.startswith("soft:net")]
        assert drv.dev.get_status() == 0 and drv.dev.queue_errors() == {}
    finally:
        drv.close()
