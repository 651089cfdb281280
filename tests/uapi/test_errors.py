"""kernel_iface errors and the IOTLB write path, on the host (no vhost-vdpa device needed).

Real nodes that are not vhost-vdpa (/dev/null) and pipes stand in for the device: a pipe receives the
exact bytes ``VhostVdpa`` writes for IOTLB messages, so their layout can be checked byte for byte.
"""

from __future__ import annotations

import ctypes
import errno
import os
import pickle
import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from kernel_iface import errors, uapi
from kernel_iface.device import IovaRange, PackedVringBase, VhostVdpa

DEV = "/dev/vhost-vdpa-0"


# -- against real nodes ----------------------------------------------------------------------------


def test_opening_a_missing_node_is_device_not_found_naming_the_path(tmp_path) -> None:
    path = str(tmp_path / "vhost-vdpa-42")
    with pytest.raises(errors.DeviceNotFound) as info:
        VhostVdpa.open(path)
    assert info.value.errno == errno.ENOENT
    assert info.value.path == path and info.value.op == "open"
    assert str(info.value) == f"{path}: open: no such device node (ENOENT)"


def test_a_node_that_is_not_vhost_vdpa_answers_not_supported() -> None:
    with VhostVdpa.open("/dev/null") as dev, pytest.raises(errors.NotSupported) as info:
        dev.get_features()
    assert info.value.errno == errno.ENOTTY
    assert info.value.op == "VHOST_GET_FEATURES"
    assert "not a vhost-vdpa device" in str(info.value)
    assert str(info.value).startswith("/dev/null: VHOST_GET_FEATURES: ")


def test_close_is_idempotent_and_a_closed_device_refuses_calls() -> None:
    dev = VhostVdpa.open("/dev/null")
    dev.close()
    dev.close()
    assert dev.closed
    with pytest.raises(ValueError):
        dev.get_features()


def test_an_argument_smaller_than_the_request_encodes_is_refused_before_the_syscall() -> None:
    from kernel_iface._ioctl import _ioctl

    with VhostVdpa.open("/dev/null") as dev, pytest.raises(ValueError, match="8"):
        _ioctl(dev.fileno(), dev.path, "VHOST_GET_FEATURES", uapi.VHOST_GET_FEATURES, ctypes.c_uint32())


# -- the errno table -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("err", "op", "cls"),
    [
        (errno.ENOENT, "open", errors.DeviceNotFound),
        (errno.ENODEV, "VHOST_GET_FEATURES", errors.DeviceNotFound),
        (errno.EACCES, "open", errors.PermissionDenied),
        (errno.EPERM, "VHOST_SET_VRING_NUM", errors.PermissionDenied),
        (errno.EBUSY, "open", errors.DeviceBusy),
        (errno.EBUSY, "VHOST_SET_OWNER", errors.DeviceBusy),
        (errno.EOPNOTSUPP, "VHOST_VDPA_SUSPEND", errors.NotSupported),
        (errors.ENOTSUPP, "open", errors.NotSupported),
        (errors.ENOIOCTLCMD, "VHOST_SET_LOG_BASE", errors.NotSupported),
        (errno.ENOTTY, "VHOST_GET_FEATURES", errors.NotSupported),
        (errno.EEXIST, errors.IOTLB_UPDATE, errors.IovaOverlap),
        (errno.EINVAL, errors.IOTLB_UPDATE, errors.IovaOutOfRange),
        (errno.EFAULT, errors.IOTLB_UPDATE, errors.IotlbRejected),
        (errno.EINVAL, "VHOST_SET_VRING_NUM", errors.InvalidArgument),
    ],
)
def test_errno_table_picks_the_class(err: int, op: str, cls: type[errors.VdpaError]) -> None:
    exc = errors.error_from_errno(err, op, DEV)
    assert type(exc) is cls
    assert isinstance(exc, OSError) and isinstance(exc, errors.VdpaError)
    assert (exc.errno, exc.path, exc.op, exc.filename) == (err, DEV, op, DEV)


def test_operation_specific_rows_do_not_leak_to_other_operations() -> None:
    # EEXIST means overlap only for an IOTLB update; elsewhere it is a plain VdpaError.
    exc = errors.error_from_errno(errno.EEXIST, "VHOST_SET_VRING_ADDR", DEV)
    assert type(exc) is errors.VdpaError
    assert str(exc) == f"{DEV}: VHOST_SET_VRING_ADDR: File exists (EEXIST)"


def test_message_format() -> None:
    exc = errors.error_from_errno(errno.EOPNOTSUPP, "VHOST_VDPA_SUSPEND", DEV)
    assert str(exc) == "/dev/vhost-vdpa-0: VHOST_VDPA_SUSPEND: operation not supported by this device (EOPNOTSUPP)"
    exc = errors.error_from_errno(errors.ENOTSUPP, "open", DEV)
    assert str(exc).endswith("(ENOTSUPP)") and "vIOMMU" in str(exc)
    exc = errors.error_from_errno(errno.ENOTTY, "VHOST_VDPA_GET_DEVICE_ID", DEV)
    assert str(exc) == (
        "/dev/vhost-vdpa-0: VHOST_VDPA_GET_DEVICE_ID: not a vhost-vdpa device or operation unsupported (ENOTTY)"
    )


@given(err=st.integers(1, 600), op=st.sampled_from(["open", "VHOST_SET_OWNER", errors.IOTLB_UPDATE]))
def test_every_errno_gives_a_one_line_message_naming_path_op_and_errno(err: int, op: str) -> None:
    text = str(errors.error_from_errno(err, op, DEV, detail="iova 0x1000 size 0x1000"))
    assert "\n" not in text
    assert text.startswith(f"{DEV}: {op}: ")
    assert text.endswith(f"({errors.errno_name(err)})")


def test_errors_survive_pickling() -> None:
    exc = errors.error_from_errno(errno.EEXIST, errors.IOTLB_UPDATE, DEV, detail="iova 0x0")
    back = pickle.loads(pickle.dumps(exc))
    assert type(back) is errors.IovaOverlap and str(back) == str(exc)


# -- IOTLB messages, written to a pipe instead of a device -----------------------------------------

VP_VDPA_RANGE = IovaRange(0, 0x7F_FFFF_FFFF)


class PipeDevice(VhostVdpa):
    """Writes go to a pipe; the IOVA range is what vp_vdpa reports."""

    def iova_range(self) -> IovaRange:
        return VP_VDPA_RANGE


@pytest.fixture
def piped():
    r, w = os.pipe()
    os.set_blocking(r, False)
    dev = PipeDevice(w, DEV)
    yield dev, r
    dev.close()
    os.close(r)


def read_msgs(r: int) -> list[tuple[int, int, int, int, int, int, int]]:
    try:
        data = os.read(r, 4096)
    except BlockingIOError:
        return []
    assert len(data) % 72 == 0
    # u32 type, u32 asid, then vhost_iotlb_msg: u64 iova, size, uaddr, u8 perm, u8 type, 6 pad, 32 pad
    return [struct.unpack_from("=IIQQQBB", data, off) for off in range(0, len(data), 72)]


def test_iotlb_update_writes_one_v2_message(piped) -> None:
    dev, r = piped
    dev.iotlb_update(0x1000, 0x2000, 0x7F00_0000_0000, uapi.VHOST_ACCESS_RO)
    assert read_msgs(r) == [
        (uapi.VHOST_IOTLB_MSG_V2, 0, 0x1000, 0x2000, 0x7F00_0000_0000, uapi.VHOST_ACCESS_RO, uapi.VHOST_IOTLB_UPDATE)
    ]


def test_overlapping_update_is_iova_overlap_and_writes_nothing(piped) -> None:
    dev, r = piped
    dev.iotlb_update(0x1000, 0x1000, 0xA000)
    read_msgs(r)
    with pytest.raises(errors.IovaOverlap) as info:
        dev.iotlb_update(0x1800, 0x1000, 0xB000)
    assert info.value.errno == errno.EEXIST
    assert "iova 0x1800 size 0x1000 overlaps iova 0x1000 size 0x1000" in str(info.value)
    assert read_msgs(r) == []
    dev.iotlb_update(0x2000, 0x1000, 0xB000)  # adjacent is fine


def test_update_outside_the_iova_range_is_iova_out_of_range_with_the_range(piped) -> None:
    dev, r = piped
    with pytest.raises(errors.IovaOutOfRange) as info:
        dev.iotlb_update(0x7F_FFFF_F000, 0x2000, 0xA000)
    assert info.value.errno == errno.EINVAL
    assert "0x0..0x7fffffffff" in str(info.value)
    with pytest.raises(errors.IovaOutOfRange, match="empty"):
        dev.iotlb_update(0x1000, 0, 0xA000)
    assert read_msgs(r) == []


def test_invalidate_removes_every_intersecting_mapping_whole(piped) -> None:
    dev, r = piped
    dev.iotlb_update(0x1000, 0x3000, 0xA000)
    dev.iotlb_invalidate(0x2000, 0x1000)  # touches the middle: the kernel drops the whole mapping
    dev.iotlb_update(0x1000, 0x1000, 0xC000)
    types = [m[-1] for m in read_msgs(r)]
    assert types == [uapi.VHOST_IOTLB_UPDATE, uapi.VHOST_IOTLB_INVALIDATE, uapi.VHOST_IOTLB_UPDATE]


def test_iotlb_batch_is_a_no_op_unless_batching_was_acked(piped) -> None:
    dev, r = piped
    with dev.iotlb_batch():
        dev.iotlb_update(0x1000, 0x1000, 0xA000)
    assert [m[-1] for m in read_msgs(r)] == [uapi.VHOST_IOTLB_UPDATE]

    dev.acked_backend_features = 1 << uapi.VHOST_BACKEND_F_IOTLB_BATCH
    with dev.iotlb_batch():
        dev.iotlb_update(0x2000, 0x1000, 0xB000)
    assert [m[-1] for m in read_msgs(r)] == [
        uapi.VHOST_IOTLB_BATCH_BEGIN,
        uapi.VHOST_IOTLB_UPDATE,
        uapi.VHOST_IOTLB_BATCH_END,
    ]


def test_iotlb_batch_is_closed_even_when_the_body_raises(piped) -> None:
    dev, r = piped
    dev.acked_backend_features = 1 << uapi.VHOST_BACKEND_F_IOTLB_BATCH
    with pytest.raises(errors.IovaOutOfRange), dev.iotlb_batch():
        dev.iotlb_update(1 << 40, 0x1000, 0xA000)
    assert [m[-1] for m in read_msgs(r)] == [uapi.VHOST_IOTLB_BATCH_BEGIN, uapi.VHOST_IOTLB_BATCH_END]


def test_nonzero_asid_needs_iotlb_asid_acked(piped) -> None:
    dev, r = piped
    with pytest.raises(ValueError, match="IOTLB_ASID"):
        dev.iotlb_update(0x1000, 0x1000, 0xA000, asid=1)
    dev.acked_backend_features = 1 << uapi.VHOST_BACKEND_F_IOTLB_ASID
    dev.iotlb_update(0x1000, 0x1000, 0xA000, asid=1)
    dev.iotlb_update(0x1000, 0x1000, 0xA000, asid=0)  # address spaces do not overlap each other
    assert [m[1] for m in read_msgs(r)] == [1, 0]


def test_short_write_is_a_typed_error(piped, monkeypatch) -> None:
    dev, _ = piped
    monkeypatch.setattr("kernel_iface.device.os.write", lambda fd, data: 10)
    with pytest.raises(errors.ShortWrite, match="short write: 10 of 72 bytes"):
        dev.iotlb_update(0x1000, 0x1000, 0xA000)


def test_write_errno_goes_through_the_table() -> None:
    r, w = os.pipe()
    os.close(r)  # writing to a pipe nobody reads gives EPIPE (Python ignores SIGPIPE)
    with PipeDevice(w, DEV) as dev, pytest.raises(errors.VdpaError) as info:
        dev.iotlb_update(0x1000, 0x1000, 0xA000)
    assert info.value.errno == errno.EPIPE and info.value.op == errors.IOTLB_UPDATE
    assert "iova 0x1000 size 0x1000 uaddr 0xa000" in str(info.value)


# -- packed ring base ------------------------------------------------------------------------------


@given(
    avail=st.integers(0, 0x7FFF), avail_wrap=st.booleans(), used=st.integers(0, 0x7FFF), used_wrap=st.booleans()
)
def test_packed_vring_base_round_trips(avail: int, avail_wrap: bool, used: int, used_wrap: bool) -> None:
    state = PackedVringBase(avail, avail_wrap, used, used_wrap)
    num = state.to_num()
    assert num == (avail | avail_wrap << 15) | (used | used_wrap << 15) << 16
    assert PackedVringBase.from_num(num) == state


def test_packed_vring_base_initial_state_is_what_vp_vdpa_accepts() -> None:
    assert PackedVringBase(0, True, 0, True).to_num() == 0x80008000


def test_packed_vring_base_refuses_indices_that_would_hit_the_wrap_bit() -> None:
    with pytest.raises(ValueError):
        PackedVringBase(0x8000, False, 0, False).to_num()
