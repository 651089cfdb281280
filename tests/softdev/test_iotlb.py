"""IotlbMemory: GuestMemory's read interface in IOVA space, with permissions."""

from __future__ import annotations

import pytest

from kernel_iface import uapi
from vdpa_svq.memory import GuestMemory
from vdpa_svq.softdev import IotlbFault, SoftNetDevice

RO, WO, RW = uapi.VHOST_ACCESS_RO, uapi.VHOST_ACCESS_WO, uapi.VHOST_ACCESS_RW
IOVA = 0x10_0000


@pytest.fixture
def mem():
    m = GuestMemory.create(0x4000)
    yield m
    m.close()


@pytest.fixture
def dev():
    d = SoftNetDevice()
    d.set_owner()
    d.set_backend_features(d.get_backend_features())
    yield d
    d.close()


def test_reads_and_writes_go_to_the_mapped_host_memory(dev, mem):
    dev.iotlb_update(IOVA, 0x2000, mem.hva(0))
    mem.write(0x100, b"hello")
    assert dev.mem.read(IOVA + 0x100, 5) == b"hello"
    dev.mem.write(IOVA + 0x200, b"world")
    assert mem.read(0x200, 5) == b"world"
    assert dev.mem.contains(IOVA, 0x2000) and not dev.mem.contains(IOVA, 0x2001)


def test_access_across_adjacent_mappings(dev, mem):
    """A buffer may straddle two mappings (even of non-adjacent host memory)."""
    dev.iotlb_update(IOVA, 0x1000, mem.hva(0x2000))
    dev.iotlb_update(IOVA + 0x1000, 0x1000, mem.hva(0))
    dev.mem.write(IOVA + 0xFFE, b"abcd")
    assert mem.read(0x2FFE, 2) == b"ab" and mem.read(0, 2) == b"cd"
    assert dev.mem.read(IOVA + 0xFFE, 4) == b"abcd"
    assert dev.mem.contains(IOVA + 0xFFE, 4)
    with pytest.raises(IotlbFault):
        dev.mem.view(IOVA + 0xFFE, 4)  # a view must lie in one mapping


def test_device_cannot_write_a_read_only_mapping(dev, mem):
    dev.iotlb_update(IOVA, 0x1000, mem.hva(0), RO)
    dev.iotlb_update(IOVA + 0x1000, 0x1000, mem.hva(0x1000), RW)
    with pytest.raises(IotlbFault, match="read-only"):
        dev.mem.write(IOVA + 0xFFF, b"xy")
    assert mem.read(0x1000, 1) == b"\0"  # nothing stored, not even the allowed half
    assert not dev.mem.writable(IOVA, 1) and dev.mem.writable(IOVA + 0x1000, 1)
    assert dev.mem.view(IOVA, 16).readonly and not dev.mem.view(IOVA + 0x1000, 16).readonly


def test_device_cannot_read_a_write_only_mapping(dev, mem):
    dev.iotlb_update(IOVA, 0x1000, mem.hva(0), WO)
    with pytest.raises(IotlbFault, match="write-only"):
        dev.mem.read(IOVA, 1)
    dev.mem.write(IOVA, b"ok")


def test_unmapped_iova_faults(dev):
    with pytest.raises(IotlbFault, match="not mapped"):
        dev.mem.read(IOVA, 1)


def test_batch_reaches_the_device_at_its_end(dev, mem):
    """With IOTLB_BATCH acked, updates in a batch are applied together at BATCH_END."""
    with dev.iotlb_batch():
        dev.iotlb_update(IOVA, 0x1000, mem.hva(0))
        assert not dev.mem.contains(IOVA, 1)
        dev.iotlb_update(IOVA + 0x1000, 0x1000, mem.hva(0x1000))
        dev.iotlb_invalidate(IOVA, 1)
    assert [m.iova for m in dev.mem.mappings] == [IOVA + 0x1000]


def test_batch_is_a_no_op_without_the_backend_feature(mem):
    d = SoftNetDevice()
    d.set_owner()
    with d.iotlb_batch():
        d.iotlb_update(IOVA, 0x1000, mem.hva(0))
        assert d.mem.contains(IOVA, 1)
