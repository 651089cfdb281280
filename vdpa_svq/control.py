"""The driver side of a net device's control queue (VIRTIO 1.2 5.1.6.5), for serve.

A vhost-user frontend (QEMU, DPDK's virtio-user) keeps the guest's control queue to itself: it
answers VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET and tells the backend which queues run with
SET_VRING_ENABLE. The device behind serve has a control queue of its own, and serve is its only
driver: a small ring in vdpa-svq's memory (ShadowSession places it like a shadow ring) and one
buffer page for the command and its ack. Commands go one at a time, synchronously, from the
connection's thread; a device that does not answer within CONTROL_TIMEOUT_S fails the command.
"""

from __future__ import annotations

import struct

from kernel_iface.uapi import VIRTIO_NET_CTRL_MQ, VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET, VIRTIO_NET_OK
from vdpa_svq.errors import VdpaSvqError
from vdpa_svq.guest.queue import GuestQueue
from vdpa_svq.memory.guest import GuestMemory

ACK_OFFSET = 64  # the ack byte's place in the buffer page, after the longest command we send
CONTROL_TIMEOUT_S = 5.0
CONTROL_RING_NUM = 8


class ControlError(VdpaSvqError):
    """The device refused a control command (VIRTIO_NET_ERR) or did not answer it."""


class ControlQueue:
    """Queue `queue.index` of the device, driven by us; `buf` is a page of `mem` the device may write."""

    def __init__(self, queue: GuestQueue, mem: GuestMemory, buf: int) -> None:
        self.queue = queue
        self.mem = mem
        self.buf = buf
        self.commands = 0

    def command(self, cls: int, command: int, data: bytes = b"") -> None:
        """Send one command and wait for its ack; ControlError unless VIRTIO_NET_OK."""
        what = f"control command class {cls} command {command}"
        assert 2 + len(data) <= ACK_OFFSET
        self.mem.write(self.buf, bytes([cls, command]) + data)
        self.mem.write(self.buf + ACK_OFFSET, b"\xff")  # neither OK nor ERR until the device writes it
        self.queue.ring.add([(self.buf, 2 + len(data))], [(self.buf + ACK_OFFSET, 1)], self.buf)
        self.queue.kick()
        used = self.queue.reap(1, CONTROL_TIMEOUT_S)
        if used is None:
            raise ControlError(f"the device did not answer the {what} within {CONTROL_TIMEOUT_S} s")
        (_, written), = used
        ack = self.mem.read(self.buf + ACK_OFFSET, 1)[0]
        self.commands += 1
        if written < 1 or ack != VIRTIO_NET_OK:
            raise ControlError(f"the device refused the {what} (ack {ack:#x}, {written} bytes written)")

    def set_queue_pairs(self, pairs: int) -> None:
        """VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET (5.1.6.5.5): frames move on the first `pairs` pairs."""
        self.command(VIRTIO_NET_CTRL_MQ, VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET, struct.pack("<H", pairs))

    def close(self) -> None:
        self.queue.close()
