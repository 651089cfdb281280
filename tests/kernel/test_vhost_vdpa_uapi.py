"""kernel_iface against real /dev/vhost-vdpa-N nodes (run inside the kernel bench: make kernel).

Every node found is tested. No node at all is a failure, not a skip: the bench always creates them, so
an empty /dev means the bench is broken or the tests run in the wrong place.

Where the public API checks something itself (IOVA range, overlap), the raw kernel answer is checked too,
by writing the same message with ``write_iotlb_msg``: the kernel must refuse it as well. vhost reports
IOTLB failures as EFAULT (vhost_chr_write_iter), so the errno accepted is either the specific one or EFAULT.
"""

from __future__ import annotations

import ctypes
import errno
import glob
import mmap
import os
from collections.abc import Iterator

import pytest

from kernel_iface import errors, uapi
from kernel_iface.device import IovaRange, VhostVdpa

pytestmark = pytest.mark.kernel

DEVICES = sorted(glob.glob("/dev/vhost-vdpa-*"))
NO_DEVICES = "no /dev/vhost-vdpa-* — run inside the kernel bench (make kernel)"
PAGE = mmap.PAGESIZE
U64_MAX = (1 << 64) - 1
IOTLB_BACKEND_FEATURES = (
    uapi.VHOST_BACKEND_F_IOTLB_MSG_V2,
    uapi.VHOST_BACKEND_F_IOTLB_BATCH,
    uapi.VHOST_BACKEND_F_IOTLB_ASID,
)


@pytest.fixture(params=DEVICES or [None], ids=DEVICES or ["no-vhost-vdpa-device"])
def path(request: pytest.FixtureRequest) -> str:
    if request.param is None:
        pytest.fail(NO_DEVICES)
    return request.param


@pytest.fixture
def dev(path: str) -> Iterator[VhostVdpa]:
    with VhostVdpa.open(path) as d:
        d.set_owner()
        yield d


@pytest.fixture
def iotlb_dev(dev: VhostVdpa) -> VhostVdpa:
    """Owner set, and the IOTLB backend features the device offers acked."""
    offered = dev.get_backend_features()
    dev.set_backend_features(sum(1 << bit for bit in IOTLB_BACKEND_FEATURES if offered >> bit & 1))
    return dev


@pytest.fixture
def page() -> Iterator[int]:
    """The user address of one page of a shared memfd mapping, touched so it is populated."""
    fd = os.memfd_create("vdpa-svq-iotlb-test")
    os.ftruncate(fd, PAGE)
    mem = mmap.mmap(fd, PAGE)
    mem[:4] = b"svq!"
    anchor = ctypes.c_char.from_buffer(mem)
    try:
        yield ctypes.addressof(anchor)
    finally:
        del anchor  # release the buffer export before unmapping
        mem.close()
        os.close(fd)


def raw_update(iova: int, size: int, uaddr: int) -> uapi.vhost_msg_v2:
    msg = uapi.vhost_msg_v2(type=uapi.VHOST_IOTLB_MSG_V2, asid=0)
    msg.iotlb.iova, msg.iotlb.size, msg.iotlb.uaddr = iova, size, uaddr
    msg.iotlb.perm, msg.iotlb.type = uapi.VHOST_ACCESS_RW, uapi.VHOST_IOTLB_UPDATE
    return msg


def first_page_iova(rng: IovaRange) -> int:
    return (rng.first + PAGE - 1) // PAGE * PAGE


def test_no_devices_is_a_failure_not_a_skip() -> None:
    assert DEVICES, NO_DEVICES


def test_describe_device(dev: VhostVdpa) -> None:
    features = dev.get_features()
    backend = dev.get_backend_features()
    device_id = dev.device_id()
    rng = dev.iova_range()
    print(f"\n{dev.path}: device id {device_id}, status {uapi.decode_status(dev.get_status())}")
    print(f"  features {features:#x}: {' '.join(uapi.decode_features(features, device_id))}")
    print(f"  backend features {backend:#x}: {' '.join(uapi.decode_backend_features(backend))}")
    print(f"  vqs {dev.vqs_count()}, max ring {dev.vring_num()}, config size {dev.config_size()}")
    print(f"  iova range {rng.first:#x}..{rng.last:#x}, address spaces {dev.as_num()}, groups {dev.group_num()}")

    assert device_id in (uapi.VIRTIO_ID_NET, uapi.VIRTIO_ID_BLOCK)
    # Every provider in the bench is a modern device behind an IOMMU-like translation.
    assert features >> uapi.VIRTIO_F_VERSION_1 & 1
    assert features >> uapi.VIRTIO_F_ACCESS_PLATFORM & 1
    assert backend >> uapi.VHOST_BACKEND_F_IOTLB_MSG_V2 & 1
    assert dev.vqs_count() >= 1
    num = dev.vring_num()
    assert num > 0 and num & (num - 1) == 0, "split rings need a power-of-two size"
    assert dev.config_size() > 0
    assert rng.first <= rng.last
    assert dev.as_num() >= 1 and dev.group_num() >= 1


def test_net_config_starts_with_the_mac(dev: VhostVdpa) -> None:
    if dev.device_id() != uapi.VIRTIO_ID_NET:
        assert dev.device_id() == uapi.VIRTIO_ID_BLOCK
        # virtio-blk config starts with le64 capacity (in 512-byte sectors).
        capacity = int.from_bytes(dev.get_config(0, 8), "little")
        print(f"\n{dev.path}: blk capacity {capacity} sectors")
        return
    mac = dev.get_config(0, 6)
    print(f"\n{dev.path}: mac {mac.hex(':')}")
    assert len(mac) == 6
    if dev.get_features() >> uapi.VIRTIO_NET_F_MAC & 1:
        assert not mac[0] & 1, "a device MAC must be unicast"


def test_config_past_the_end_is_refused(dev: VhostVdpa) -> None:
    with pytest.raises(errors.InvalidArgument):
        dev.get_config(dev.config_size(), 4)


def test_second_open_is_device_busy(dev: VhostVdpa) -> None:
    with pytest.raises(errors.DeviceBusy):
        VhostVdpa.open(dev.path)


def test_set_owner_twice_is_device_busy(dev: VhostVdpa) -> None:
    with pytest.raises(errors.DeviceBusy):
        dev.set_owner()


def test_iotlb_update_and_invalidate_a_memfd_page(iotlb_dev: VhostVdpa, page: int) -> None:
    dev = iotlb_dev
    iova = first_page_iova(dev.iova_range())
    dev.iotlb_update(iova, PAGE, page)
    dev.iotlb_invalidate(iova, PAGE)
    # Unmapped, so the same range can be mapped again, inside a batch when the device takes batches.
    with dev.iotlb_batch():
        dev.iotlb_update(iova, PAGE, page, uapi.VHOST_ACCESS_RO)
    dev.iotlb_invalidate(iova, PAGE)


def test_overlapping_update_is_iova_overlap(iotlb_dev: VhostVdpa, page: int) -> None:
    dev = iotlb_dev
    iova = first_page_iova(dev.iova_range())
    dev.iotlb_update(iova, PAGE, page)
    with pytest.raises(errors.IovaOverlap):
        dev.iotlb_update(iova, PAGE, page)
    # And the kernel itself refuses it (vhost_vdpa_process_iotlb_update: EEXIST, surfaced as EFAULT).
    with pytest.raises(errors.VdpaError) as info:
        dev.write_iotlb_msg(raw_update(iova, PAGE, page), errors.IOTLB_UPDATE)
    print(f"\n{dev.path}: kernel answer to an overlapping update: {info.value}")
    assert info.value.errno in (errno.EEXIST, errno.EFAULT)
    dev.iotlb_invalidate(iova, PAGE)


def test_update_outside_the_iova_range_is_iova_out_of_range(iotlb_dev: VhostVdpa, page: int) -> None:
    dev = iotlb_dev
    rng = dev.iova_range()
    if rng.last < U64_MAX:
        # e.g. vp_vdpa: 0..0x7fffffffff. One page straddling the end.
        iova = rng.last + 1 - PAGE // 2
        print(f"\n{dev.path}: iova range ends at {rng.last:#x}: mapping {iova:#x}+{PAGE:#x} past it")
    else:
        # e.g. vdpa_sim: the whole 64-bit space. The only way out is to wrap around 2^64.
        assert rng.first == 0
        iova = U64_MAX + 1 - PAGE
        print(f"\n{dev.path}: iova range is the full 64-bit space: mapping {iova:#x}+{2 * PAGE:#x} wraps")
    size = PAGE if rng.last < U64_MAX else 2 * PAGE

    with pytest.raises(errors.IovaOutOfRange) as info:
        dev.iotlb_update(iova, size, page)
    assert f"{rng.last:#x}" in str(info.value)
    # A 2-page update of one page of memory is fine to send: the kernel checks the range first.
    with pytest.raises(errors.VdpaError) as raw:
        dev.write_iotlb_msg(raw_update(iova, size, page), errors.IOTLB_UPDATE)
    print(f"{dev.path}: kernel answer: {raw.value}")
    assert raw.value.errno in (errno.EINVAL, errno.EFAULT)


def test_empty_update_is_refused_by_the_kernel(iotlb_dev: VhostVdpa, page: int) -> None:
    iova = first_page_iova(iotlb_dev.iova_range())
    with pytest.raises(errors.VdpaError) as raw:
        iotlb_dev.write_iotlb_msg(raw_update(iova, 0, page), errors.IOTLB_UPDATE)
    # vhost_chr_write_iter refuses size 0 itself, before the vdpa handler, so this one is a real EINVAL.
    assert raw.value.errno == errno.EINVAL
    assert isinstance(raw.value, errors.IovaOutOfRange)
