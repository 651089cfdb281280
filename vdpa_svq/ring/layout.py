"""Sizes, alignments and offsets of the split and packed virtqueue layouts (VIRTIO 1.2, 2.7 and 2.8).

Each ring has three areas: the descriptor area, the driver area (split: avail ring; packed: driver
event suppression) and the device area (split: used ring; packed: device event suppression).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from enum import Enum
from typing import NamedTuple

DESC_SIZE = 16  # addr (le64) + len (le32) + split: flags, next (le16 each) / packed: id, flags (le16 each)
DESC = struct.Struct("<QIHH")

# split avail ring: flags (le16) + idx (le16) + ring[num] (le16 each) + used_event (le16)
AVAIL_FLAGS, AVAIL_IDX, AVAIL_RING = 0, 2, 4
# split used ring: flags (le16) + idx (le16) + ring[num] of {id le32, len le32} + avail_event (le16)
USED_FLAGS, USED_IDX, USED_RING = 0, 2, 4
USED_ELEM = struct.Struct("<II")
# packed event suppression structure: off_wrap (le16) + flags (le16)
EVENT_OFF_WRAP, EVENT_FLAGS = 0, 2
PACKED_EVENT_SIZE = 4

MAX_SPLIT_SIZE = 32768
MAX_PACKED_SIZE = 32768


class Layout(Enum):
    SPLIT = "split"
    PACKED = "packed"


def desc_area_size(num: int) -> int:
    return DESC_SIZE * num


def driver_area_size(layout: Layout, num: int) -> int:
    return 6 + 2 * num if layout is Layout.SPLIT else PACKED_EVENT_SIZE


def device_area_size(layout: Layout, num: int) -> int:
    return 6 + 8 * num if layout is Layout.SPLIT else PACKED_EVENT_SIZE


# Required alignments (2.7 Table "Virtqueue Part Alignment"; 2.8 for packed).
DESC_ALIGN = 16
DRIVER_ALIGN = {Layout.SPLIT: 2, Layout.PACKED: 4}
DEVICE_ALIGN = {Layout.SPLIT: 4, Layout.PACKED: 4}


def check_size(layout: Layout, num: int) -> None:
    """Split sizes are powers of two up to 32768; packed sizes are any 1..32768."""
    if layout is Layout.SPLIT:
        if not (1 <= num <= MAX_SPLIT_SIZE) or num & (num - 1):
            raise ValueError(f"split ring size must be a power of two in 1..{MAX_SPLIT_SIZE}, not {num}")
    elif not 1 <= num <= MAX_PACKED_SIZE:
        raise ValueError(f"packed ring size must be in 1..{MAX_PACKED_SIZE}, not {num}")


def _align(x: int, a: int) -> int:
    return (x + a - 1) & ~(a - 1)


@dataclass(frozen=True)
class RingAddresses:
    """Guest-physical (or IOVA) addresses of one ring's three areas."""

    desc: int
    driver: int
    device: int


class RingAreas(NamedTuple):
    """Views of one ring's three areas in guest memory, in the order of RingAddresses: the views the
    ring took when it started (a datapath that takes the ring over reaches the ring through them,
    whatever the IOTLB says later)."""

    desc: memoryview
    driver: memoryview
    device: memoryview


def place_ring(layout: Layout, num: int, base: int, *, device_area_align: int = 1) -> tuple[RingAddresses, int]:
    """Lay the three areas out from `base`; return their addresses and the first free byte after.

    `device_area_align` (e.g. a page) puts the device area where it can be mapped with other
    permissions than the rest (the device writes only the device area).
    """
    check_size(layout, num)
    desc = _align(base, DESC_ALIGN)
    driver = _align(desc + desc_area_size(num), DRIVER_ALIGN[layout])
    device = _align(driver + driver_area_size(layout, num), max(DEVICE_ALIGN[layout], device_area_align))
    return RingAddresses(desc, driver, device), device + device_area_size(layout, num)
