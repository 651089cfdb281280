"""Frames through a real device, verified: the helpers the kernel tests share."""

from __future__ import annotations

import socket
import time

from vdpa_svq.guest.frames import ETHERTYPE, build_frame, parse_frame

TIMEOUT = 60.0  # the bench guest runs under TCG: slow, but never this slow


def exchange(drv, frames: list[bytes], expect: int, timeout: float = TIMEOUT) -> list[bytes]:
    """Send `frames` (respecting a full ring) and collect `expect` received frames."""
    got: list[bytes] = []
    pending = list(frames)
    deadline = time.monotonic() + timeout
    while (pending or len(got) < expect) and time.monotonic() < deadline:
        while pending and drv.send(pending[0]):
            pending.pop(0)
        drv.flush()
        got.extend(drv.reap())
        if pending or len(got) < expect:
            drv.wait(0.05)
    got.extend(drv.reap())
    return got


def check_all_arrived(received: list[bytes], count: int) -> None:
    seqs = [s for s in (parse_frame(f) for f in received) if s is not None]
    assert sorted(seqs) == list(range(count)), f"lost or duplicated frames: got {len(seqs)} of {count}"


def talk_both_ways_with_peer(drv, peer: socket.socket, count: int) -> None:
    """Our TX -> the device -> QEMU's hub -> the guest kernel's virtio_net -> AF_PACKET `peer`,
    then back: the kernel stack sends, our RX ring receives. Every frame verified, both ways."""
    pending = [build_frame(seq, 60 + seq * 13) for seq in range(count)]
    heard: list[bytes] = []
    deadline = time.monotonic() + TIMEOUT
    while len(heard) < count and time.monotonic() < deadline:
        while pending and drv.send(pending[0]):
            pending.pop(0)
        drv.flush()
        drv.reap()
        try:
            while True:
                heard.append(peer.recv(4096))
        except TimeoutError:
            pass
    check_all_arrived(heard, count)
    for seq in range(count):
        peer.send(build_frame(seq, 80 + seq * 11))
    check_all_arrived(exchange(drv, [], count), count)


def peer_socket(iface: str) -> socket.socket:
    s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETHERTYPE))
    s.bind((iface, ETHERTYPE))
    s.settimeout(0.05)
    return s
