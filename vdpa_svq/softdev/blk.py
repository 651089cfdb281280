"""SoftBlkDevice: a virtio-blk ramdisk, like vdpa_sim_blk (device id 2, one queue).

A request (VIRTIO 1.2, 5.2.6) is a device-readable header {le32 type, le32 reserved, le64 sector},
then data (readable for OUT, writable for IN / GET_ID), then the status byte: the last
device-writable byte of the chain.
"""

from __future__ import annotations

import struct

from kernel_iface import uapi
from vdpa_svq.ring import Chain
from vdpa_svq.softdev.base import QUEUE_FAULTS, SoftDevice
from vdpa_svq.softdev.chainio import gather, scatter

SECTOR_SIZE = 512
VIRTIO_BLK_T_IN = 0
VIRTIO_BLK_T_OUT = 1
VIRTIO_BLK_T_FLUSH = 4
VIRTIO_BLK_T_GET_ID = 8
VIRTIO_BLK_S_OK = 0
VIRTIO_BLK_S_IOERR = 1
VIRTIO_BLK_S_UNSUPP = 2
VIRTIO_BLK_ID_BYTES = 20

BLK_REQ_HDR = struct.Struct("<IIQ")  # type, reserved, sector
# struct virtio_blk_config up to num_queues: capacity le64, size_max le32, seg_max le32,
# geometry {cylinders le16, heads u8, sectors u8}, blk_size le32, topology {physical_block_exp u8,
# alignment_offset u8, min_io_size le16, opt_io_size le32}, writeback u8, unused0 u8, num_queues le16.
_BLK_CONFIG = struct.Struct("<QIIHBBIBBHIBBH")


class SoftBlkDevice(SoftDevice):
    DEVICE_ID = uapi.VIRTIO_ID_BLOCK
    KIND = "blk"
    QUEUE_NAMES = ("requestq",)
    DEVICE_FEATURES = 1 << uapi.VIRTIO_BLK_F_BLK_SIZE | 1 << uapi.VIRTIO_BLK_F_FLUSH

    def __init__(self, *, sectors: int = 2048, disk_id: bytes = b"vdpa-svq-softblk", **kwargs: object) -> None:
        if len(disk_id) > VIRTIO_BLK_ID_BYTES:
            raise ValueError(f"disk id longer than {VIRTIO_BLK_ID_BYTES} bytes")
        super().__init__(**kwargs)  # type: ignore[arg-type]
        self.disk = bytearray(sectors * SECTOR_SIZE)
        self.disk_id = disk_id
        self.flushes = 0

    @classmethod
    def like_vdpa_sim(cls, **kwargs: object) -> SoftBlkDevice:
        """The ring features of vdpa_sim blk: split only, no EVENT_IDX, no INDIRECT, 256 entries."""
        return cls(packed=False, event_idx=False, indirect=False, vring_num=256, **kwargs)  # type: ignore[arg-type]

    @property
    def capacity(self) -> int:
        """In 512-byte sectors, whatever blk_size says (5.2.4)."""
        return len(self.disk) // SECTOR_SIZE

    def config(self) -> bytes:
        return _BLK_CONFIG.pack(self.capacity, 0, 0, 0, 0, 0, SECTOR_SIZE, 0, 0, 0, 0, 0, 0, 1)

    # -- datapath --------------------------------------------------------------------------------
    def process(self) -> bool:
        q = self.queues[0]
        progress = False
        while q.usable:
            chain = self.pop(q)
            if chain is None:
                break
            try:
                read, written = self._request(chain)
            except QUEUE_FAULTS as e:
                self.break_queue(q, e)
                break
            self.push(q, chain, written, read=read)
            progress = True
        return progress

    def _range_ok(self, sector: int, length: int) -> bool:
        return length % SECTOR_SIZE == 0 and sector * SECTOR_SIZE + length <= len(self.disk)

    def _request(self, chain: Chain) -> tuple[int, int]:
        """Serve one request; return (bytes read, bytes written) for the used element and stats."""
        readable = gather(self.mem, chain)
        if len(readable) < BLK_REQ_HDR.size or chain.writable_bytes < 1:
            # No header or nowhere to put a status: nothing sensible to answer. Complete it empty
            # (as vdpa_sim_blk does) rather than break the queue for a protocol, not ring, error.
            return len(readable), 0
        req_type, _, sector = BLK_REQ_HDR.unpack_from(readable)
        data_room = chain.writable_bytes - 1  # everything writable before the status byte
        written = 0
        if req_type == VIRTIO_BLK_T_IN:
            if self._range_ok(sector, data_room):
                off = sector * SECTOR_SIZE
                written = scatter(self.mem, chain, memoryview(self.disk)[off : off + data_room])
                status = VIRTIO_BLK_S_OK
            else:
                status = VIRTIO_BLK_S_IOERR
        elif req_type == VIRTIO_BLK_T_OUT:
            data = readable[BLK_REQ_HDR.size :]
            if self._range_ok(sector, len(data)):
                off = sector * SECTOR_SIZE
                self.disk[off : off + len(data)] = data
                status = VIRTIO_BLK_S_OK
            else:
                status = VIRTIO_BLK_S_IOERR
        elif req_type == VIRTIO_BLK_T_FLUSH:
            self.flushes += 1  # a ramdisk has nothing to flush; counted so tests can see it arrive
            status = VIRTIO_BLK_S_OK
        elif req_type == VIRTIO_BLK_T_GET_ID:
            if data_room >= VIRTIO_BLK_ID_BYTES:
                # NUL-padded; not NUL-terminated when exactly 20 bytes long (5.2.6).
                written = scatter(self.mem, chain, self.disk_id.ljust(VIRTIO_BLK_ID_BYTES, b"\0"))
                status = VIRTIO_BLK_S_OK
            else:
                status = VIRTIO_BLK_S_IOERR
        else:
            status = VIRTIO_BLK_S_UNSUPP
        scatter(self.mem, chain, bytes([status]), data_room)
        return len(readable), written + 1
