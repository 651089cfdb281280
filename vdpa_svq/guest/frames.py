"""Test frames that prove themselves: a sequence number and a CRC over a payload derived from it.

Ethernet header, ethertype 0x88B5 (IEEE local experimental), then MAGIC, seq (le32), payload length
(le16), crc32 of the payload (le32), payload. A receiver tells a good frame, a corrupt one and a
foreign one (another ethertype or magic) apart without any shared state with the sender.
"""

from __future__ import annotations

import struct
import zlib

ETHERTYPE = 0x88B5
MAGIC = b"VSVQ"
ETH_HEADER = struct.Struct("!6s6sH")
FRAME_HEADER = struct.Struct("<4sIHI")
MIN_FRAME = ETH_HEADER.size + FRAME_HEADER.size
BROADCAST = b"\xff" * 6


class FrameError(ValueError):
    """A frame of ours that arrived damaged."""


def payload_for(seq: int, length: int) -> bytes:
    """A payload that differs per sequence number, so a frame delivered twice or swapped shows."""
    pattern = seq.to_bytes(4, "little") + b"vdpa-svq"
    return (pattern * (length // len(pattern) + 1))[:length]


def build_frame(seq: int, size: int, *, dst: bytes = BROADCAST, src: bytes = b"\x02\x00\x00\x00\x00\x01") -> bytes:
    """An Ethernet frame of `size` bytes (at least MIN_FRAME) carrying `seq`."""
    length = max(size, MIN_FRAME) - MIN_FRAME
    payload = payload_for(seq, length)
    return ETH_HEADER.pack(dst, src, ETHERTYPE) + FRAME_HEADER.pack(MAGIC, seq, length, zlib.crc32(payload)) + payload


def parse_frame(frame: bytes) -> int | None:
    """The sequence number of one of our frames; None for someone else's; FrameError if damaged."""
    if len(frame) < MIN_FRAME:
        return None
    _, _, ethertype = ETH_HEADER.unpack_from(frame)
    magic, seq, length, crc = FRAME_HEADER.unpack_from(frame, ETH_HEADER.size)
    if ethertype != ETHERTYPE or magic != MAGIC:
        return None
    payload = frame[MIN_FRAME : MIN_FRAME + length]
    if len(payload) != length or zlib.crc32(payload) != crc or payload != payload_for(seq, length):
        raise FrameError(f"frame {seq}: payload damaged ({len(payload)} of {length} bytes)")
    return seq
