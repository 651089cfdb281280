"""SoftNetDevice: a loopback virtio-net device, like vdpa_sim_net (device id 1, vq0 RX, vq1 TX).

Every frame sent on TX comes back on RX of the same queue pair. Backpressure differs from vdpa_sim on purpose: when
the RX queue has no buffer, vdpa_sim drops the frame; we leave the TX chain in the TX ring (not
even popped) until the driver adds RX buffers, so tests see every frame, deterministically, and
GET_VRING_BASE never has to account for chains held inside the device. With MRG_RXBUF a frame
may need several RX buffers: until that many are there, its TX chain and the RX buffers popped
to count them go back to their rings (unpop), and the frame waits whole. A frame is dropped (TX
completed, counted in stats) only when RX cannot take it at all: RX disabled or broken, the TX
chain shorter than a virtio_net_hdr, or (MRG_RXBUF) longer than every RX buffer the ring can
hold together.

Multiqueue (queue_pairs > 1): VIRTIO_NET_F_MQ and VIRTIO_NET_F_CTRL_VQ, max_virtqueue_pairs =
queue_pairs, and the queues of VIRTIO 1.2 5.1.2: rx0, tx0, ..., rxN-1, txN-1, then the control
queue (netctrl.py). Which index is the control queue depends on what the driver acked: 2N with
MQ, 2 without (N is 1 then). Until the driver sends VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET only the first
pair moves frames (5.1.6.5.5: after reset the device queues packets only on receiveq1); then the
first `virtqueue_pairs` pairs do, each its own loopback. The queues of the other pairs are left as
they are (chains stay in their rings), as a disabled queue's would.
"""

from __future__ import annotations

import enum
import functools
import os
import struct
from collections.abc import Callable

from kernel_iface import uapi
from vdpa_svq.cinputs import device_ring_spec, iotlb_regions, ring_area_regions
from vdpa_svq.errors import GuestRingError
from vdpa_svq.native import NetLoop  # the loopback in C (softdev/_netloop.c); None: the Python datapath
from vdpa_svq.ring import Chain
from vdpa_svq.softdev.base import QUEUE_FAULTS, SoftDevice
from vdpa_svq.softdev.chainio import gather, scatter
from vdpa_svq.softdev.netctrl import (
    CTRL_READ_MAX,
    VIRTIO_NET_CTRL_MQ,
    VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET,
    VIRTIO_NET_ERR,
    VIRTIO_NET_OK,
    Command,
    parse_command,
    vq_pairs_set,
)
from vdpa_svq.softdev.queue import SoftQueue

RX, TX = 0, 1
VIRTIO_NET_S_LINK_UP = 1
# struct virtio_net_hdr_v1: flags u8, gso_type u8, hdr_len le16, gso_size le16, csum_start le16,
# csum_offset le16, num_buffers le16 -- 12 bytes with VERSION_1 (which this device requires).
NET_HDR_SIZE = 12
_NUM_BUFFERS_OFF = 10
# The longest TX packet taken: header + the largest IP datagram with an Ethernet header and one
# VLAN tag. A GSO frame is no longer (Linux's virtio_net keeps GSO frames within 64 KiB,
# GSO_LEGACY_MAX_SIZE, headers included), so nothing legitimate is; a longer chain is dropped
# unread (not gathered into memory a peer could make as large as it likes). _netloop.c: the same.
NET_MAX_PACKET = NET_HDR_SIZE + 65535 + 18
# struct virtio_net_config up to supported_hash_types: mac[6], status le16, max_virtqueue_pairs le16,
# mtu le16, speed le32, duplex u8, rss_max_key_size u8, rss_max_indirection_table_length le16,
# supported_hash_types le32 -- 24 bytes, the size vdpa_sim net reports.
_NET_CONFIG = struct.Struct("<6sHHHIBBHI")
SPEED_UNKNOWN = 0xFFFFFFFF
DUPLEX_UNKNOWN = 0xFF

DEFAULT_MAC = bytes.fromhex("525400000001")
MAX_QUEUE_PAIRS = 0x8000  # VIRTIO_NET_CTRL_MQ_VQ_PAIRS_MAX (5.1.4): le16 max_virtqueue_pairs, 1..0x8000
MQ_FEATURES = 1 << uapi.VIRTIO_NET_F_MQ | 1 << uapi.VIRTIO_NET_F_CTRL_VQ


def queue_names(queue_pairs: int, *, ctrl: bool | None = None) -> tuple[str, ...]:
    """rx, tx, rx1, tx1, ..., and ctrl (by default when more than one pair): pair 0 keeps the
    names of the single-pair device."""
    pairs = [(f"rx{i}", f"tx{i}") if i else ("rx", "tx") for i in range(queue_pairs)]
    data = tuple(name for pair in pairs for name in pair)
    return (*data, "ctrl") if (queue_pairs > 1 if ctrl is None else ctrl) else data

# The offloads a loopback can honestly offer, as veth does: what the sender left undone (a partial
# checksum, a TCP segment of up to 64 KiB) reaches the receiver undone, in the header, when the
# receiver acked taking it so (the GUEST_ bit); otherwise the device does the checksum itself
# (_offload_for_rx), and drops a GSO frame (it does not segment).
OFFLOAD_FEATURES = (
    1 << uapi.VIRTIO_NET_F_CSUM
    | 1 << uapi.VIRTIO_NET_F_GUEST_CSUM
    | 1 << uapi.VIRTIO_NET_F_HOST_TSO4
    | 1 << uapi.VIRTIO_NET_F_HOST_TSO6
    | 1 << uapi.VIRTIO_NET_F_HOST_ECN
    | 1 << uapi.VIRTIO_NET_F_GUEST_TSO4
    | 1 << uapi.VIRTIO_NET_F_GUEST_TSO6
    | 1 << uapi.VIRTIO_NET_F_GUEST_ECN
)
# struct virtio_net_hdr's flags and gso_type values (5.1.6).
VIRTIO_NET_HDR_F_NEEDS_CSUM = 1
VIRTIO_NET_HDR_GSO_NONE = 0
VIRTIO_NET_HDR_GSO_TCPV4 = 1
VIRTIO_NET_HDR_GSO_TCPV6 = 4
VIRTIO_NET_HDR_GSO_ECN = 0x80
# What RX must have acked to take a GSO frame as one, by gso_type (without the ECN bit).
_GSO_RX_FEATURE = {
    VIRTIO_NET_HDR_GSO_TCPV4: uapi.VIRTIO_NET_F_GUEST_TSO4,
    VIRTIO_NET_HDR_GSO_TCPV6: uapi.VIRTIO_NET_F_GUEST_TSO6,
}
# For NetLoop.attach: which offloads RX takes (the C datapath punts a header it cannot pass as is).
RX_TAKES_CSUM, RX_TAKES_TSO4, RX_TAKES_TSO6, RX_TAKES_ECN = 1, 2, 4, 8


def complete_checksum(frame: bytes, start: int, offset: int) -> bytes | None:
    """The frame with its partial checksum done, as a NIC does for NEEDS_CSUM (5.1.6.2): the
    ones' complement sum of frame[start:] (the field holds the pseudo-header sum) stored
    complemented at start + offset. None when the field lies outside the frame."""
    field = start + offset
    if field + 2 > len(frame):
        return None
    data = frame[start:] + b"\0" * ((len(frame) - start) & 1)
    # RFC 1071: the sum is the same in either byte order, so native 16-bit words will do.
    total = sum(memoryview(data).cast("H"))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    csum = ~total & 0xFFFF or 0xFFFF  # 0 is "no checksum" to UDP; 0xFFFF is the same sum
    return frame[:field] + struct.pack("=H", csum) + frame[field + 2 :]


class Delivery(enum.Enum):
    """What became of a TX frame on its way to RX."""

    DELIVERED = "delivered"
    DROPPED = "dropped"  # TX completed, the frame lost (counted in the TX stats)
    HELD = "held"  # too few RX buffers yet: the TX chain goes back to its ring, to come again


class SoftNetDevice(SoftDevice):
    DEVICE_ID = uapi.VIRTIO_ID_NET
    KIND = "net"
    QUEUE_NAMES = ("rx", "tx")
    # One queue pair: no CTRL_VQ, no control queue to model. More pairs: MQ_FEATURES, per instance.
    DEVICE_FEATURES = (
        1 << uapi.VIRTIO_NET_F_MAC
        | 1 << uapi.VIRTIO_NET_F_STATUS
        | 1 << uapi.VIRTIO_NET_F_MTU
        | 1 << uapi.VIRTIO_NET_F_MRG_RXBUF  # a frame may span RX buffers (_deliver_merged)
        | OFFLOAD_FEATURES
    )

    # What datapath=None means; the soft device tests run once per value.
    DEFAULT_DATAPATH = "auto"

    def __init__(
        self,
        *,
        mac: bytes = DEFAULT_MAC,
        mtu: int = 1500,
        datapath: str | None = None,
        queue_pairs: int = 1,
        **kwargs: object,
    ) -> None:
        """datapath: "c" (the loopback in C, for the regular case), "py" (all in Python), or
        "auto" (C when the extension is built). queue_pairs: more than 1 offers multiqueue."""
        datapath = datapath or self.DEFAULT_DATAPATH
        if isinstance(queue_pairs, bool) or not isinstance(queue_pairs, int) or not 1 <= queue_pairs <= MAX_QUEUE_PAIRS:
            raise ValueError(f"queue pairs are 1..{MAX_QUEUE_PAIRS}, not {queue_pairs!r}")
        if len(mac) != 6:
            raise ValueError(f"a MAC address has 6 bytes, not {len(mac)}")
        if datapath not in ("auto", "c", "py"):
            raise ValueError(f"datapath is auto, c or py, not {datapath!r}")
        if datapath == "c" and NetLoop is None:
            raise ValueError("datapath 'c' needs the C extension (vdpa_svq.softdev._netloop), which is not built")
        self.queue_pairs = queue_pairs
        # Per instance, before the base class reads them.
        self.QUEUE_NAMES = queue_names(queue_pairs)  # type: ignore[misc]
        self.DEVICE_FEATURES = type(self).DEVICE_FEATURES | (MQ_FEATURES if queue_pairs > 1 else 0)  # type: ignore[misc]
        # One C loopback per pair. Before the base class makes the lock, which calls take_back_rings().
        self._c = (
            [NetLoop(functools.partial(self._punt_kick, pair)) for pair in range(queue_pairs)]
            if NetLoop is not None and datapath != "py"
            else None
        )
        # Pairs moving frames: 1 until VQ_PAIRS_SET (and again after reset).
        self.active_pairs = 1
        super().__init__(**kwargs)  # type: ignore[arg-type]
        self.mac = bytes(mac)
        self.mtu = mtu
        if self._c is not None:
            self.mem.on_change = self._iotlb_changed

    @property
    def datapath(self) -> str:
        """Which datapath serves the regular case: "c" or "py"."""
        return "py" if self._c is None else "c"

    @classmethod
    def like_vdpa_sim(cls, **kwargs: object) -> SoftNetDevice:
        """The ring features of vdpa_sim net: split only, no EVENT_IDX, no INDIRECT, 256 entries."""
        return cls(packed=False, event_idx=False, indirect=False, vring_num=256, **kwargs)  # type: ignore[arg-type]

    def config(self) -> bytes:
        return _NET_CONFIG.pack(
            self.mac, VIRTIO_NET_S_LINK_UP, self.queue_pairs, self.mtu, SPEED_UNKNOWN, DUPLEX_UNKNOWN, 0, 0, 0
        )

    # -- queue roles (5.1.2): they depend on what the driver acked ---------------------------------
    def _pairs(self) -> int:
        """Queue pairs the driver may set up: max_virtqueue_pairs with MQ, else 1."""
        return self.queue_pairs if self._has(uapi.VIRTIO_NET_F_MQ) else 1

    def ctrl_queue(self) -> SoftQueue | None:
        """The control queue, when CTRL_VQ was acked: after the last pair's TX queue."""
        if not self._has(uapi.VIRTIO_NET_F_CTRL_VQ):
            return None
        return self.queues[2 * self._pairs()]

    def set_features(self, features: int) -> None:
        super().set_features(features)
        if self.queue_pairs > 1:
            # Name each queue for its role under these features (errors and stats say it).
            roles = queue_names(self._pairs(), ctrl=self._has(uapi.VIRTIO_NET_F_CTRL_VQ))
            for q in self.queues:
                q.name = roles[q.index] if q.index < len(roles) else f"unused{q.index}"

    def _reset(self) -> None:
        super()._reset()
        self.active_pairs = 1
        for q, name in zip(self.queues, self.QUEUE_NAMES, strict=True):
            q.name = name

    def _data_pairs(self) -> list[tuple[SoftQueue, SoftQueue]]:
        """The (rx, tx) queues of the pairs that move frames now."""
        return [(self.queues[2 * p], self.queues[2 * p + 1]) for p in range(self.active_pairs)]

    # -- the C datapath: who owns the rings ----------------------------------------------------------
    def service_fast(self) -> bool:
        """With the lock held (the datapath thread): serve in C each pair whose two queues run;
        False when the Python datapath must (a pair half down, a control command, or a chain C
        leaves to it). The rings are all back in Python's hands then."""
        loops = self._c
        if loops is None or not self.running:
            return False
        for p, (rx, tx) in enumerate(self._data_pairs()):
            c = loops[p]
            if not c.loaded:
                if not (rx.usable and tx.usable):
                    if rx.usable or tx.usable:
                        break  # the Python datapath drops what TX sends with RX down
                    continue
                c.attach(
                    device_ring_spec(rx.ring, ring_area_regions(rx.ring)),  # type: ignore[arg-type]
                    device_ring_spec(tx.ring, ring_area_regions(tx.ring)),  # type: ignore[arg-type]
                    iotlb_regions(self.mem.mappings),
                    (rx.call_fd, tx.call_fd),
                    self._has(uapi.VIRTIO_RING_F_INDIRECT_DESC),
                    self._has(uapi.VIRTIO_NET_F_MRG_RXBUF),
                    self._rx_takes(),
                )
            if c.service() != 0:
                break  # a chain for the Python datapath
        else:
            ctrl = self.ctrl_queue()
            if ctrl is None or not ctrl.usable or not self.guard(ctrl, ctrl.ring.has_avail):  # type: ignore[union-attr]
                return True
        self.take_back_rings()  # the Python datapath needs every ring current
        return False

    def take_back_rings(self) -> None:
        for p, c in enumerate(self._c or ()):
            handed = c.detach()
            if handed is None:
                continue
            states, counts = handed
            for q, state, count in zip(self.queues[2 * p : 2 * p + 2], states, counts, strict=True):
                q.ring.import_state(state)  # type: ignore[union-attr]
                for attr, n in count.items():
                    setattr(q.stats, attr, getattr(q.stats, attr) + n)

    def _iotlb_changed(self) -> None:
        with self.lock:  # takes the rings back: the C copy of the mappings is stale now
            pass

    def _punt_kick(self, pair: int, index: int) -> None:
        fd = self.queues[2 * pair + index].kick_fd
        if fd >= 0:
            os.eventfd_write(fd, 1)

    def activity(self) -> list[str]:
        return [f"{self.active_pairs} queue pair(s) moving frames", *super().activity()]

    def inline_kick(self, index: int) -> Callable[[], None] | None:
        self._queue("inline kick", index)
        if self._c is None or index >= 2 * self._pairs():
            return None  # the control queue (and unused ones): the device's thread, through the eventfd
        return functools.partial(self._c[index // 2].kick, index % 2)

    # -- datapath --------------------------------------------------------------------------------
    def process(self) -> bool:
        progress = False
        ctrl = self.ctrl_queue()
        if ctrl is not None:
            progress = self._process_ctrl(ctrl)
        for rx, tx in self._data_pairs():
            progress |= self._process_pair(rx, tx)
        return progress

    def _process_ctrl(self, ctrl: SoftQueue) -> bool:
        """Answer every control command there is (netctrl.py); a chain that is no command stops the queue."""
        progress = False
        while (chain := self.pop(ctrl)) is not None:
            readable = sum(length for _, length in chain.readable)
            try:
                head = gather(self.mem, chain, CTRL_READ_MAX)
                cmd = parse_command(ctrl.name, readable, chain.writable_bytes, head)
            except QUEUE_FAULTS as e:
                self.break_queue(ctrl, e)
                break
            ack = self._control(cmd)
            try:
                written = scatter(self.mem, chain, bytes([ack]))
            except QUEUE_FAULTS as e:
                self.break_queue(ctrl, e)
                break
            self.push(ctrl, chain, written, read=len(head))
            progress = True
        return progress

    def _control(self, cmd: Command) -> int:
        """The ack of one command: VIRTIO_NET_OK once done, VIRTIO_NET_ERR for anything else."""
        if (
            cmd.cls == VIRTIO_NET_CTRL_MQ
            and cmd.command == VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET
            and self._has(uapi.VIRTIO_NET_F_MQ)
        ):
            pairs = vq_pairs_set(cmd, self.queue_pairs)
            if pairs is None:
                return VIRTIO_NET_ERR
            # Frames of pairs beyond the new count stay in their rings from here on (5.1.6.5.5:
            # no packets on receive queues past virtqueue_pairs once the command is used).
            self.active_pairs = pairs
            return VIRTIO_NET_OK
        return VIRTIO_NET_ERR

    def _process_pair(self, rx: SoftQueue, tx: SoftQueue) -> bool:
        progress = False
        while tx.usable and tx.ring.has_avail():  # type: ignore[union-attr]
            if rx.usable and not rx.ring.has_avail():  # type: ignore[union-attr]
                break  # hold: the frame stays in the TX ring until RX buffers arrive (RX kicks us)
            chain = self.pop(tx)
            if chain is None:
                break
            if sum(length for _, length in chain.readable) > NET_MAX_PACKET:
                tx.stats.dropped += 1
                self.push(tx, chain, 0, read=0)
                progress = True
                continue
            try:
                packet = gather(self.mem, chain)
            except QUEUE_FAULTS as e:
                self.break_queue(tx, e)
                break
            outcome = self._deliver(rx, packet)
            if outcome is Delivery.HELD:
                tx.ring.unpop(chain)  # type: ignore[union-attr]  # back in its ring until RX buffers arrive
                break
            if outcome is Delivery.DROPPED:
                tx.stats.dropped += 1
            self.push(tx, chain, 0, read=len(packet))
            progress = True
        return progress

    def _deliver(self, rx: SoftQueue, packet: bytes) -> Delivery:
        """Copy one TX packet (header + frame) into the next RX buffer(s)."""
        if len(packet) < NET_HDR_SIZE:
            return Delivery.DROPPED
        offloaded = self._offload_for_rx(packet)
        if offloaded is None:
            return Delivery.DROPPED
        packet = offloaded
        if self._has(uapi.VIRTIO_NET_F_MRG_RXBUF):
            return self._deliver_merged(rx, packet)
        chain = self.pop(rx)
        if chain is None:
            return Delivery.DROPPED
        # Without MRG_RXBUF the device MUST set num_buffers to 1 (5.1.6.4.1); the rest of the
        # header is the sender's, as _offload_for_rx left it.
        hdr = packet[:_NUM_BUFFERS_OFF] + struct.pack("<H", 1)
        try:
            # A too-small RX buffer gets the frame truncated: there is no MRG_RXBUF to spread it.
            written = scatter(self.mem, chain, hdr + packet[NET_HDR_SIZE:])
        except QUEUE_FAULTS as e:
            self.break_queue(rx, e)
            return Delivery.DROPPED
        self.push(rx, chain, written)
        return Delivery.DELIVERED

    def _offload_for_rx(self, packet: bytes) -> bytes | None:
        """The packet as RX may take it (5.1.6.4.1), or None to drop it. A GSO frame goes as one
        GSO frame, header as is, when RX acked its GUEST_TSO bit (and GUEST_ECN for the ECN bit);
        else it is dropped: a loopback does not segment, and the spec (5.1.3.1) lets a driver
        ack HOST_TSO4 without GUEST_TSO4, so refusing that at FEATURES_OK would refuse a valid
        driver. A partial checksum (NEEDS_CSUM) goes as is when RX acked GUEST_CSUM, else the
        device completes it and RX gets flags 0 (the device MUST set them so without GUEST_CSUM)."""
        flags, gso_type = packet[0], packet[1]
        if gso_type != VIRTIO_NET_HDR_GSO_NONE:
            wanted = _GSO_RX_FEATURE.get(gso_type & ~VIRTIO_NET_HDR_GSO_ECN)
            if wanted is None or not self._has(wanted):
                return None
            if gso_type & VIRTIO_NET_HDR_GSO_ECN and not self._has(uapi.VIRTIO_NET_F_GUEST_ECN):
                return None
            return packet
        if flags == 0 or self._has(uapi.VIRTIO_NET_F_GUEST_CSUM):
            return packet
        frame = packet[NET_HDR_SIZE:]
        if flags & VIRTIO_NET_HDR_F_NEEDS_CSUM:
            start, offset = struct.unpack_from("<HH", packet, 6)
            done = complete_checksum(frame, start, offset)
            if done is None:
                return None
            frame = done
        return b"\0" + packet[1:NET_HDR_SIZE] + frame

    def _rx_takes(self) -> int:
        """The RX_TAKES_* bits for NetLoop.attach."""
        return (
            RX_TAKES_CSUM * self._has(uapi.VIRTIO_NET_F_GUEST_CSUM)
            | RX_TAKES_TSO4 * self._has(uapi.VIRTIO_NET_F_GUEST_TSO4)
            | RX_TAKES_TSO6 * self._has(uapi.VIRTIO_NET_F_GUEST_TSO6)
            | RX_TAKES_ECN * self._has(uapi.VIRTIO_NET_F_GUEST_ECN)
        )

    def _deliver_merged(self, rx: SoftQueue, packet: bytes) -> Delivery:
        """VIRTIO_NET_F_MRG_RXBUF (5.1.6.4.1): the frame fills as many RX buffers as it needs, in
        ring order, each but the last to its full length; num_buffers in the first one's header
        says how many; all are used together. Held (every buffer put back) until enough are there."""
        chains = self._take_rx_buffers(rx, len(packet))
        if not isinstance(chains, list):
            return chains
        data = packet[:_NUM_BUFFERS_OFF] + struct.pack("<H", len(chains)) + packet[NET_HDR_SIZE:]
        used: list[tuple[Chain, int]] = []
        done = 0
        try:
            for chain in chains:
                n = scatter(self.mem, chain, memoryview(data)[done:])
                used.append((chain, n))
                done += n
        except QUEUE_FAULTS as e:
            self.break_queue(rx, e)
            return Delivery.DROPPED
        self._push_together(rx, used)
        return Delivery.DELIVERED

    def _take_rx_buffers(self, rx: SoftQueue, size: int) -> list[Chain] | Delivery:
        """Pop RX buffers until they hold `size` bytes: the chains, or HELD with every one put back
        (more may come), or DROPPED (RX broke, or the whole descriptor table is not enough)."""
        chains: list[Chain] = []
        room = descs = 0
        while room < size:
            chain = self.pop(rx)
            if chain is None:
                if not rx.usable:
                    return Delivery.DROPPED
                # Every descriptor of the ring in our hands and still short: no buffer can come.
                held = descs < rx.ring.num  # type: ignore[union-attr]
                for c in reversed(chains):
                    rx.ring.unpop(c)  # type: ignore[union-attr]
                return Delivery.HELD if held else Delivery.DROPPED
            if chain.writable_bytes < NET_HDR_SIZE:
                # 5.1.6.3.1: with MRG_RXBUF, the driver MUST make every buffer at least a header long.
                reason = f"RX buffer of {chain.writable_bytes} bytes with MRG_RXBUF, shorter than a virtio_net_hdr"
                self.break_queue(rx, GuestRingError(rx.name, reason, chain.id))
                return Delivery.DROPPED
            chains.append(chain)
            room += chain.writable_bytes
            descs += chain.ndescs
        return chains

    def _push_together(self, rx: SoftQueue, used: list[tuple[Chain, int]]) -> None:
        """Use the RX buffers of one frame so that the driver sees them all at once (5.1.6.4.1)."""
        ring = rx.ring
        assert ring is not None

        def stage_and_publish() -> None:
            for chain, written in used:
                ring.stage_used(chain, written)
            ring.publish_used()

        self.guard(rx, stage_and_publish)
        rx.stats.chains += len(used)
        rx.stats.written_bytes += sum(written for _, written in used)
