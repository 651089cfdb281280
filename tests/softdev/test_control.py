"""The soft device's control plane: VhostVdpa's method names, values and kernel errors."""

from __future__ import annotations

import errno
import os
import struct

import pytest

from kernel_iface import (
    DeviceBusy,
    InvalidArgument,
    IotlbRejected,
    IovaOutOfRange,
    IovaOverlap,
    NotSupported,
    PermissionDenied,
    VdpaError,
    VhostVdpa,
    uapi,
)
from kernel_iface.device import IovaRange
from tests.softdev.driver import STATUS_UP_TO_FEATURES, NetDriver
from vdpa_svq.memory import GuestMemory
from vdpa_svq.softdev import SoftBlkDevice, SoftDevice, SoftNetDevice

BACKEND_OFFERED = (
    1 << uapi.VHOST_BACKEND_F_IOTLB_MSG_V2
    | 1 << uapi.VHOST_BACKEND_F_IOTLB_BATCH
    | 1 << uapi.VHOST_BACKEND_F_SUSPEND
    | 1 << uapi.VHOST_BACKEND_F_RESUME
)


@pytest.fixture
def dev():
    d = SoftNetDevice()
    yield d
    d.close()


@pytest.fixture
def mem():
    m = GuestMemory.create(0x10000)
    yield m
    m.close()


def test_soft_device_has_the_vhost_vdpa_methods_a_session_uses():
    """Session code is device-agnostic: every VhostVdpa method it calls exists here with the
    same parameter names."""
    import inspect

    used = [
        "set_owner", "get_features", "set_features", "get_backend_features", "set_backend_features",
        "has_backend_feature", "device_id", "get_status", "set_status", "config_size", "get_config",
        "set_config", "vqs_count", "vring_num", "set_vring_num", "set_vring_addr", "set_vring_base",
        "get_vring_base", "set_vring_kick", "set_vring_call", "set_vring_err", "set_vring_enable",
        "iova_range", "iotlb_update", "iotlb_invalidate", "iotlb_batch", "suspend", "resume", "close",
        "__enter__", "__exit__",
    ]  # fmt: skip
    for name in used:
        real = inspect.signature(getattr(VhostVdpa, name))
        soft = inspect.signature(getattr(SoftDevice, name))
        assert list(soft.parameters) == list(real.parameters), name


def test_identity_features_and_config(dev):
    assert dev.path == "soft:net" and dev.device_id() == uapi.VIRTIO_ID_NET
    f = dev.get_features()
    for bit in (
        uapi.VIRTIO_F_VERSION_1,
        uapi.VIRTIO_F_ACCESS_PLATFORM,
        uapi.VIRTIO_F_RING_PACKED,
        uapi.VIRTIO_RING_F_EVENT_IDX,
        uapi.VIRTIO_RING_F_INDIRECT_DESC,
        uapi.VIRTIO_NET_F_MAC,
        uapi.VIRTIO_NET_F_STATUS,
    ):
        assert f >> bit & 1, bit
    assert not f >> uapi.VIRTIO_NET_F_CTRL_VQ & 1
    assert dev.get_backend_features() == BACKEND_OFFERED
    assert dev.vqs_count() == 2 and dev.vring_num() == 1024
    assert dev.config_size() == 24
    mac, status, pairs, mtu = struct.unpack_from("<6sHHH", dev.get_config())
    assert (mac, status, pairs, mtu) == (bytes.fromhex("525400000001"), 1, 1, 1500)
    assert dev.get_config(6, 2) == b"\x01\x00"
    assert dev.iova_range() == IovaRange(0, 2**64 - 1)
    assert SoftBlkDevice().device_id() == uapi.VIRTIO_ID_BLOCK


def test_without_packed_the_feature_is_not_offered():
    d = SoftNetDevice(packed=False)
    assert not d.get_features() >> uapi.VIRTIO_F_RING_PACKED & 1
    with pytest.raises(InvalidArgument):
        d.set_features(1 << uapi.VIRTIO_F_RING_PACKED)


def test_vring_and_iotlb_operations_need_the_owner(dev, mem):
    """vhost_dev_ioctl: "You must be the owner to do anything else" (EPERM)."""
    with pytest.raises(PermissionDenied) as e:
        dev.set_vring_num(0, 256)
    assert e.value.errno == errno.EPERM and e.value.op == "VHOST_SET_VRING_NUM"
    with pytest.raises(PermissionDenied):
        dev.iotlb_update(0, 0x1000, mem.hva(0))
    dev.set_owner()
    with pytest.raises(DeviceBusy):
        dev.set_owner()


def test_iotlb_errors_are_the_kernel_ones(dev, mem):
    dev.set_owner()
    dev.iotlb_update(0, 0x4000, mem.hva(0))
    with pytest.raises(IovaOverlap):
        dev.iotlb_update(0x3000, 0x2000, mem.hva(0x3000))
    with pytest.raises(IovaOutOfRange):
        dev.iotlb_update(0x8000, 0, mem.hva(0x8000))
    # An address that is not mapped in this process: the kernel could not pin it (EFAULT).
    with pytest.raises(IotlbRejected):
        dev.iotlb_update(0x10000, 0x1000, 0x1000)
    with pytest.raises(ValueError):
        dev.iotlb_update(0x8000, 0x1000, mem.hva(0x8000), asid=1)
    dev.iotlb_invalidate(0x1000, 1)  # removes the whole mapping that contains it
    dev.iotlb_update(0x3000, 0x2000, mem.hva(0x3000))


def test_iova_range_limits_mappings(mem):
    d = SoftNetDevice(iova_range=IovaRange(0x1000, 0xFFFF))
    d.set_owner()
    with pytest.raises(IovaOutOfRange):
        d.iotlb_update(0, 0x2000, mem.hva(0))
    d.iotlb_update(0x1000, 0xF000, mem.hva(0x1000))


def test_vring_argument_errors(dev):
    dev.set_owner()
    with pytest.raises(VdpaError) as e:
        dev.set_vring_num(2, 256)  # net has vq0 and vq1 only
    assert e.value.errno == errno.ENOBUFS
    with pytest.raises(InvalidArgument):
        dev.set_vring_num(0, 100)  # not a power of two
    with pytest.raises(InvalidArgument):
        dev.set_vring_num(0, 2048)  # above vring_num()
    with pytest.raises(InvalidArgument):
        dev.set_vring_addr(0, 0x1008, 0x2000, 0x3000)  # desc not 16-aligned
    with pytest.raises(InvalidArgument):
        dev.set_vring_base(0, 0x10000)  # split base is 16 bits
    r, w = os.pipe()
    try:
        with pytest.raises(InvalidArgument):
            dev.set_vring_kick(0, r)  # not an eventfd
    finally:
        os.close(r)
        os.close(w)


def test_status_rules(dev):
    with pytest.raises(InvalidArgument):
        dev.set_status(uapi.VIRTIO_CONFIG_S_DRIVER_OK)  # before FEATURES_OK
    dev.set_status(uapi.VIRTIO_CONFIG_S_ACKNOWLEDGE | uapi.VIRTIO_CONFIG_S_DRIVER)
    with pytest.raises(InvalidArgument):
        dev.set_status(uapi.VIRTIO_CONFIG_S_ACKNOWLEDGE)  # clearing a bit needs a reset
    # Without VERSION_1 this modern-only device does not accept the features (3.1.1).
    dev.set_status(STATUS_UP_TO_FEATURES)
    assert not dev.get_status() & uapi.VIRTIO_CONFIG_S_FEATURES_OK
    dev.set_status(0)
    dev.set_features(1 << uapi.VIRTIO_F_VERSION_1)
    dev.set_status(STATUS_UP_TO_FEATURES)
    assert dev.get_status() == STATUS_UP_TO_FEATURES
    with pytest.raises(DeviceBusy):
        dev.set_features(1 << uapi.VIRTIO_F_VERSION_1)  # already negotiated


def test_running_ring_cannot_be_changed_until_suspended():
    drv = NetDriver(SoftNetDevice(), num=8)
    try:
        with pytest.raises(DeviceBusy):
            drv.dev.set_vring_base(0, 0)
        drv.dev.suspend()
        drv.dev.set_vring_base(0, 0)
        drv.dev.resume()
    finally:
        drv.close()


def test_suspend_not_offered_is_eopnotsupp():
    d = SoftNetDevice(suspend=False)
    assert not d.get_backend_features() >> uapi.VHOST_BACKEND_F_SUSPEND & 1
    with pytest.raises(NotSupported):
        d.suspend()


def test_config_range_errors(dev):
    with pytest.raises(InvalidArgument):
        dev.get_config(25, 1)
    with pytest.raises(VdpaError) as e:
        dev.get_config(20, 8)
    assert e.value.errno == errno.E2BIG


def test_closed_device_refuses_calls():
    d = SoftNetDevice()
    with d:
        pass
    assert d.closed
    with pytest.raises(ValueError):
        d.get_features()
