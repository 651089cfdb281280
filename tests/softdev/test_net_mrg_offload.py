"""SoftNetDevice's checksum and TSO offloads, as a loopback offers them (like veth).

VIRTIO 1.2 5.1.6.2: a driver that acked CSUM may send a partial checksum (NEEDS_CSUM, csum_start,
csum_offset); one that acked HOST_TSO4/6 a GSO frame (gso_type, gso_size, hdr_len). 5.1.6.4.1:
with GUEST_CSUM the device may hand RX a partial checksum; without it, it MUST set flags to 0
(and SHOULD hand a checksummed frame); without the GUEST_TSO bit of a gso_type, it MUST NOT hand
RX such a frame. 5.1.3.1 ties GUEST_TSO4/6 to GUEST_CSUM and HOST_TSO4/6 to CSUM, and nothing to
the other direction: a driver may ack HOST_TSO4 and not GUEST_TSO4. This loopback then drops the
GSO frame (counted): it does not segment.
"""

from __future__ import annotations

import struct

import pytest

from kernel_iface import uapi
from tests.softdev.test_net_mrg import LAYOUTS, MRG, MrgDriver, packet
from vdpa_svq.softdev import SoftNetDevice
from vdpa_svq.softdev.net import complete_checksum


def bits(*names: str) -> int:
    out = 0
    for n in names:
        out |= 1 << getattr(uapi, f"VIRTIO_NET_F_{n}")
    return out


HOST = bits("CSUM", "HOST_TSO4", "HOST_TSO6", "HOST_ECN")
GUEST = bits("GUEST_CSUM", "GUEST_TSO4", "GUEST_TSO6", "GUEST_ECN")


class OffloadDriver(MrgDriver):
    """MrgDriver acking `extra` besides MRG_RXBUF."""

    extra = 0

    def setup(self) -> None:
        self.session.extra_features |= self.extra
        super().setup()
        assert self.session.features & self.extra == self.extra


@pytest.fixture
def make_drv():
    made: list[OffloadDriver] = []

    def make(extra: int, **kw: object) -> OffloadDriver:
        cls = type("Driver", (OffloadDriver,), {"extra": extra})
        drv = cls(SoftNetDevice(), **kw)  # type: ignore[arg-type]
        made.append(drv)
        return drv

    yield make
    for drv in made:
        drv.close()


def csum16(data: bytes) -> int:
    """The Internet checksum's ones' complement sum, the textbook way (big-endian words)."""
    if len(data) & 1:
        data += b"\0"
    total = sum(int.from_bytes(data[i : i + 2], "big") for i in range(0, len(data), 2))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return total


def tcp4_frame(payload: bytes) -> tuple[bytes, int, int]:
    """An Ethernet + IPv4 + TCP frame whose checksum field holds the pseudo-header sum only, as a
    driver leaves it for NEEDS_CSUM; with csum_start and csum_offset."""
    src, dst = bytes([10, 0, 0, 1]), bytes([10, 0, 0, 2])
    tcp_len = 20 + len(payload)
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + tcp_len, 1, 0, 64, 6, 0, src, dst)
    ip = ip[:10] + struct.pack("!H", ~csum16(ip) & 0xFFFF) + ip[12:]
    pseudo = csum16(src + dst + struct.pack("!BBH", 0, 6, tcp_len))
    tcp = struct.pack("!HHIIBBHHH", 1234, 80, 1, 0, 5 << 4, 0x18, 65535, pseudo, 0) + payload
    eth = bytes.fromhex("525400000001" "525400000002" "0800")
    return eth + ip + tcp, len(eth) + len(ip), 16


def header(flags: int = 0, gso_type: int = 0, hdr_len: int = 0, gso_size: int = 0, start: int = 0,
           offset: int = 0) -> bytes:
    return struct.pack("<BBHHHHH", flags, gso_type, hdr_len, gso_size, start, offset, 0)


def tcp_checksum_ok(frame: bytes, start: int) -> bool:
    """The receiver's check: pseudo-header + segment sum to 0xFFFF."""
    ip = frame[14:start]
    pseudo = ip[12:20] + struct.pack("!BBH", 0, 6, len(frame) - start)
    return csum16(pseudo + frame[start:]) == 0xFFFF


def test_soft_net_offers_the_offloads():
    with SoftNetDevice() as dev:
        assert dev.get_features() & (HOST | GUEST) == HOST | GUEST


@pytest.mark.parametrize("packed", LAYOUTS)
def test_partial_checksum_reaches_rx_as_is_with_guest_csum(make_drv, packed):
    """GUEST_CSUM acked: NEEDS_CSUM, csum_start and csum_offset arrive as sent, the frame untouched."""
    drv = make_drv(bits("CSUM", "GUEST_CSUM"), packed=packed)
    frame, start, offset = tcp4_frame(bytes(range(200)))
    hdr = header(1, start=start, offset=offset)
    drv.post([2048])
    drv.send_packet(hdr + frame)
    (got,) = drv.receive(1)
    assert got.packet == hdr[:10] + b"\x01\x00" + frame
    assert not tcp_checksum_ok(frame, start)  # still partial: the receiver's stack completes it


@pytest.mark.parametrize("packed", LAYOUTS)
@pytest.mark.parametrize("payload_len", [0, 1, 200, 1401])
def test_partial_checksum_is_completed_without_guest_csum(make_drv, packed, payload_len):
    """CSUM acked, GUEST_CSUM not: RX gets flags 0 and a frame whose TCP checksum verifies; the
    rest of the frame as sent (5.1.6.4.1)."""
    drv = make_drv(bits("CSUM"), packed=packed)
    frame, start, offset = tcp4_frame(bytes((7 * i) & 0xFF for i in range(payload_len)))
    hdr = header(1, start=start, offset=offset)
    drv.post([2048])
    drv.send_packet(hdr + frame)
    (got,) = drv.receive(1)
    rx_hdr, rx_frame = got.packet[:12], got.packet[12:]
    assert rx_hdr == b"\0" + hdr[1:10] + b"\x01\x00"
    assert tcp_checksum_ok(rx_frame, start)
    field = start + offset
    assert rx_frame[:field] == frame[:field] and rx_frame[field + 2 :] == frame[field + 2 :]


def test_complete_checksum_refuses_a_field_outside_the_frame():
    assert complete_checksum(bytes(40), 30, 9) is None
    assert complete_checksum(bytes(40), 30, 8) is not None


@pytest.mark.parametrize("packed", LAYOUTS)
@pytest.mark.parametrize("gso_type, guest_bit", [(1, "GUEST_TSO4"), (4, "GUEST_TSO6"), (0x81, "GUEST_ECN")])
def test_gso_frame_arrives_as_one_gso_frame(make_drv, packed, gso_type, guest_bit):
    """HOST_TSO acked and the matching GUEST_ bit(s): a 30 000-byte GSO frame comes back as one,
    its header as sent, across 15 merged 2 KiB buffers."""
    tso = "GUEST_TSO6" if gso_type == 4 else "GUEST_TSO4"
    drv = make_drv(HOST | bits("GUEST_CSUM", tso, guest_bit), packed=packed, num=32)
    hdr = header(1, gso_type, 54, 1448, 34, 16)
    sent = hdr + packet(9, 30_000 - 12)[12:]
    drv.post([2048] * 16)
    drv.send_packet(sent)
    (got,) = drv.receive(1)
    assert got.num_buffers == 15
    assert got.packet == sent[:10] + b"\x0f\x00" + sent[12:]


@pytest.mark.parametrize("packed", LAYOUTS)
@pytest.mark.parametrize(
    "acked, gso_type",
    [
        (HOST | bits("GUEST_CSUM"), 1),  # HOST_TSO4 without GUEST_TSO4
        (HOST | bits("GUEST_CSUM", "GUEST_TSO4"), 4),  # a TCPV6 frame, GUEST_TSO6 not acked
        (HOST | bits("GUEST_CSUM", "GUEST_TSO4"), 0x81),  # ECN without GUEST_ECN
        (bits("CSUM", "GUEST_CSUM"), 3),  # UDP (UFO): never offered
    ],
    ids=["no-guest-tso4", "no-guest-tso6", "no-guest-ecn", "ufo"],
)
def test_gso_frame_rx_cannot_take_is_dropped_and_counted(make_drv, packed, acked, gso_type):
    """RX did not ack taking this GSO type: the frame is dropped (TX completed, counted in the TX
    stats; no segmentation here), and the next ordinary frame arrives."""
    drv = make_drv(acked, packed=packed)
    drv.post([2048] * 4)
    drv.send_packet(header(1, gso_type, 54, 1448, 34, 16) + bytes(1500))  # one buffer: C decides
    assert drv.complete_tx(1) == 1
    assert drv.dev.stats()["tx"].dropped == 1
    plain = packet(4, 100)
    drv.send_packet(plain)
    (got,) = drv.receive(1)
    assert got.packet == plain[:10] + b"\x01\x00" + plain[12:]
    assert drv.dev.stats()["rx"].chains == 1


def test_mrg_alone_keeps_offload_bits_out(make_drv):
    """A driver that acks none of the offloads (MRG_RXBUF only) negotiates none."""
    drv = make_drv(0)
    assert drv.session.features & (HOST | GUEST) == 0
    assert drv.session.features & MRG
