"""SoftBlkDevice driven through the project's driver rings: a ramdisk behind virtio-blk requests."""

from __future__ import annotations

import random
import struct

import pytest

from kernel_iface import uapi
from tests.softdev.driver import BlkDriver
from vdpa_svq.guest.blk import VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT
from vdpa_svq.softdev import SoftBlkDevice
from vdpa_svq.softdev.blk import VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK, VIRTIO_BLK_S_UNSUPP

SECTORS = 64


@pytest.fixture(params=["split", "packed-evidx-ind"])
def blk(request):
    packed = request.param != "split"
    drv = BlkDriver(SoftBlkDevice(sectors=SECTORS), packed=packed, event_idx=packed, indirect=packed, num=16)
    yield drv
    drv.close()


def test_config_space_reports_capacity_and_block_size(blk):
    """virtio_blk_config: capacity le64 at 0 (in 512-byte sectors), blk_size le32 at 20 (5.2.4)."""
    cfg = blk.dev.get_config()
    assert struct.unpack_from("<Q", cfg, 0)[0] == SECTORS
    assert struct.unpack_from("<I", cfg, 20)[0] == 512
    assert blk.dev.device_id() == uapi.VIRTIO_ID_BLOCK
    f = blk.dev.get_features()
    assert f >> uapi.VIRTIO_BLK_F_BLK_SIZE & 1 and f >> uapi.VIRTIO_BLK_F_FLUSH & 1


def test_written_sectors_read_back_identical(blk):
    """OUT then IN of the same sectors returns the same bytes; status OK; used length counts
    the data written plus the status byte (5.2.6)."""
    data = random.Random(2).randbytes(8 * 512)  # four SLOT pieces
    w = blk.do(VIRTIO_BLK_T_OUT, 10, out=data)
    assert (w.status, w.written) == (VIRTIO_BLK_S_OK, 1)
    r = blk.do(VIRTIO_BLK_T_IN, 10, in_len=len(data))
    assert (r.status, r.written) == (VIRTIO_BLK_S_OK, len(data) + 1)
    assert r.data == data
    assert bytes(blk.dev.disk[10 * 512 : 18 * 512]) == data
    r = blk.do(VIRTIO_BLK_T_IN, 9, in_len=512)
    assert r.data == bytes(512)  # untouched sector


def test_flush_and_get_id(blk):
    f = blk.do(VIRTIO_BLK_T_FLUSH, 0)
    assert f.status == VIRTIO_BLK_S_OK and blk.dev.flushes == 1
    g = blk.do(VIRTIO_BLK_T_GET_ID, 0, in_len=20)
    assert g.status == VIRTIO_BLK_S_OK
    assert g.data == b"vdpa-svq-softblk".ljust(20, b"\0")


@pytest.mark.parametrize(
    "req_type, sector, out_len, in_len",
    [
        (VIRTIO_BLK_T_IN, SECTORS, 0, 512),  # starts past the end
        (VIRTIO_BLK_T_IN, SECTORS - 1, 0, 1024),  # runs past the end
        (VIRTIO_BLK_T_OUT, SECTORS, 512, 0),
        (VIRTIO_BLK_T_OUT, 0, 100, 0),  # not a whole sector
        (VIRTIO_BLK_T_GET_ID, 0, 0, 10),  # no room for the 20-byte id
    ],
)
def test_out_of_range_requests_fail_with_ioerr_and_touch_nothing(blk, req_type, sector, out_len, in_len):
    req = blk.do(req_type, sector, out=b"\xaa" * out_len, in_len=in_len)
    assert req.status == VIRTIO_BLK_S_IOERR
    assert req.written == 1
    assert blk.dev.disk == bytearray(SECTORS * 512)
    assert blk.dev.queue_errors() == {}


def test_unknown_request_type_is_unsupp(blk):
    assert blk.do(0x42, 0, in_len=0).status == VIRTIO_BLK_S_UNSUPP


def test_many_requests_in_flight_wrap_the_ring(blk):
    """60 writes then 60 reads through a 16-entry ring, several in flight at once."""
    rng = random.Random(3)
    contents = {}
    pending = 0
    for _ in range(60):
        sector = rng.randrange(SECTORS)
        contents[sector] = rng.randbytes(512)
        blk.submit(VIRTIO_BLK_T_OUT, sector, out=contents[sector])
        pending += 1
        if pending == 4:
            blk.kick(0)
            assert all(r.status == VIRTIO_BLK_S_OK for r in blk.complete(pending))
            pending = 0
    for sector, data in contents.items():
        assert blk.do(VIRTIO_BLK_T_IN, sector, in_len=512).data == data
    assert blk.dev.stats()["requestq"].chains == 60 + len(contents)
