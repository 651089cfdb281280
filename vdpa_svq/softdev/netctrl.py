"""soft:net's control queue (VIRTIO 1.2 5.1.6.5): what a command chain must look like, and the
answer to each command the device knows.

A command is `struct virtio_net_ctrl { u8 class; u8 command; u8 command_specific_data[]; u8 ack; }`:
class, command and data device-readable, the ack byte device-writable. A chain that cannot carry
one (fewer than two readable bytes, no writable byte) is a broken ring rule, not a refused
command: the queue stops with the reason. A well formed command the device does not offer, or
one with bad data, is answered VIRTIO_NET_ERR and the queue goes on (5.1.6.5: "the device ...
MUST set ack to VIRTIO_NET_ERR" for what it did not do).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from kernel_iface.uapi import (  # noqa: F401 - net.py and the tests take them from here
    VIRTIO_NET_CTRL_MQ,
    VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET,
    VIRTIO_NET_ERR,
    VIRTIO_NET_OK,
)
from vdpa_svq.errors import RingError

# 5.1.6.5.5 Automatic receive steering in multiqueue mode
VIRTIO_NET_CTRL_MQ_VQ_PAIRS_MIN = 1

CTRL_HDR = struct.Struct("<BB")  # class, command
VQ_PAIRS = struct.Struct("<H")  # struct virtio_net_ctrl_mq { le16 virtqueue_pairs; }
# The most of a command's readable part the device reads: the header and the longest data of a
# command it answers. Whatever follows is never gathered (a peer can make the chain as long as it likes).
CTRL_READ_MAX = CTRL_HDR.size + VQ_PAIRS.size


@dataclass(frozen=True)
class Command:
    cls: int
    command: int
    data: bytes


def parse_command(queue: str, readable: int, writable: int, head: bytes) -> Command:
    """The command in a chain with `readable`/`writable` bytes, whose first readable bytes are
    `head` (at most CTRL_READ_MAX); RingError when the chain cannot be a command at all."""
    if readable < CTRL_HDR.size:
        raise RingError(queue, f"control command of {readable} readable bytes: class and command need {CTRL_HDR.size}")
    if writable < 1:
        raise RingError(queue, "control command without a device-writable ack byte")
    cls, command = CTRL_HDR.unpack_from(head)
    return Command(cls, command, head[CTRL_HDR.size :])


def vq_pairs_set(cmd: Command, max_pairs: int) -> int | None:
    """The pair count VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET asks for, or None when it must be refused:
    data shorter than le16, or a count outside 1..max_virtqueue_pairs (5.1.6.5.5: "The driver MUST
    NOT request a virtqueue_pairs of 0 or greater than max_virtqueue_pairs")."""
    if len(cmd.data) < VQ_PAIRS.size:
        return None
    (pairs,) = VQ_PAIRS.unpack_from(cmd.data)
    return pairs if VIRTIO_NET_CTRL_MQ_VQ_PAIRS_MIN <= pairs <= max_pairs else None
