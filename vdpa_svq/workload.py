"""What `vdpa-svq attach` runs: the in-process guest's traffic on a device, shadowed, with rounds of
dirty-log harvesting (as migration pre-copy does), an optional live switch, and a summary.

Net devices get frames with sequence numbers and checksums (verified when they come back, as they
do from a loopback device like vdpa_sim); block devices get writes that are read back and compared.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

from kernel_iface import uapi
from vdpa_svq.attach import PASSTHROUGH, SHADOW, InProcessGuest, blk_guest, net_guest
from vdpa_svq.device import Device
from vdpa_svq.dump import DumpHeader, DumpWriter
from vdpa_svq.guest.blk import SECTOR
from vdpa_svq.guest.frames import FrameError, build_frame, parse_frame
from vdpa_svq.loop import Polling
from vdpa_svq.ring import Layout
from vdpa_svq.session import SessionError


@dataclass
class AttachOptions:
    guest_layout: Layout = Layout.SPLIT
    shadow_layout: str = "auto"  # auto | split | packed
    duration: float = 5.0
    switch_after: float | None = None  # start in passthrough and switch to shadowed after this long
    rounds: int = 1
    dirty_log: str | None = None
    num: int = 256
    impl: str = "auto"
    poll_us: Polling = 0  # busy-poll the rings this long after each burst (C relay's loop), or "auto"

    def device_packed(self) -> bool | None:
        if self.shadow_layout == "auto" and self.switch_after is not None:
            # Passthrough first: the device must run the guest's own layout.
            return self.guest_layout is Layout.PACKED
        return {"auto": None, "split": False, "packed": True}[self.shadow_layout]


@dataclass
class RoundInfo:
    round: int
    at: float  # seconds since start
    dirty_pages: int


@dataclass
class Summary:
    device: str
    device_type: str
    guest_layout: str
    shadow_layout: str
    features: str
    relay_impl: str
    duration: float = 0.0
    mode: str = ""
    switches: list[str] = field(default_factory=list)
    # net
    frames_sent: int = 0
    frames_tx_done: int = 0
    frames_received: int = 0
    frames_verified: int = 0
    frames_failed: int = 0
    frames_duplicated: int = 0
    bytes_sent: int = 0
    # blk
    blk_writes: int = 0
    blk_reads_verified: int = 0
    blk_failed: int = 0
    blk_bytes: int = 0
    # relay, per queue
    queues: dict[int, dict[str, Any]] = field(default_factory=dict)
    rounds: list[RoundInfo] = field(default_factory=list)
    dirty_pages_total: int = 0
    errors: dict[int, str] = field(default_factory=dict)
    dump: str | None = None
    relay_loop: dict[str, int] = field(default_factory=dict)  # wake-ups, polling phases and rounds

    @property
    def ok(self) -> bool:
        return not (self.frames_failed or self.frames_duplicated or self.blk_failed or self.errors)

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["ok"] = self.ok
        d["queues"] = {str(k): v for k, v in self.queues.items()}
        d["errors"] = {str(k): v for k, v in self.errors.items()}
        return d


class AttachRun:
    """One attach: bring the guest up on `device`, run traffic for the duration, tear down."""

    def __init__(self, device: Device, opts: AttachOptions, on_tick: Callable[[AttachRun], None] | None = None) -> None:
        self.device = device
        self.opts = opts
        self.on_tick = on_tick
        self.guest: InProcessGuest | None = None
        self.summary: Summary | None = None
        self.started = 0.0
        self._seen: set[int] = set()
        self._stop = False

    def stop(self) -> None:
        """Ask the run to end early (SIGINT/SIGTERM); it still tears down and summarises."""
        self._stop = True

    def elapsed(self) -> float:
        return time.monotonic() - self.started

    def run(self) -> Summary:
        opts = self.opts
        kind = self.device.device_id()
        shadowed_from_start = opts.switch_after is None
        common = dict(
            shadow=shadowed_from_start,
            guest_layout=opts.guest_layout,
            packed=opts.device_packed(),
            impl=opts.impl,
            poll_us=opts.poll_us,
        )
        if kind == uapi.VIRTIO_ID_NET:
            self.guest, self._net = net_guest(self.device, num=opts.num, **common)
            self._blk = None
        elif kind == uapi.VIRTIO_ID_BLOCK:
            self.guest, self._blk = blk_guest(self.device, num=min(opts.num, 64), **common)
            self._net = None
            self._capacity = int.from_bytes(self.device.get_config(0, 8), "little")  # in sectors
        else:
            raise SessionError(f"{self.device.path}: virtio device id {kind} is neither net (1) nor block (2)")
        g = self.guest
        if self._net is not None:
            self._net.rx_spans = None
        s = self.summary = Summary(
            device=self.device.path,
            device_type="net" if self._net else "blk",
            guest_layout=g.guest_layout.value,
            shadow_layout=g.session.layout.value,
            features=f"{g.session.features:#x}",
            relay_impl=opts.impl,
        )
        writer = None
        try:
            if opts.dirty_log:
                header = DumpHeader(
                    regions=tuple((r.gpa, r.size) for r in g.mem),
                    device_path=self.device.path,
                    device_id=kind,
                    features=g.session.features,
                    backend_features=g.session.backend_features,
                )
                writer = DumpWriter(opts.dirty_log, header)
            self._loop(writer)
            if writer is not None:
                writer.close()
                s.dump = opts.dirty_log
        except BaseException:
            if writer is not None:
                writer.abort()
            raise
        finally:
            self._finish()
        return s

    def _loop(self, writer: DumpWriter | None) -> None:
        opts, g, s = self.opts, self.guest, self.summary
        assert g is not None and s is not None
        self.started = time.monotonic()
        # Rounds divide the shadowed time (dirty logging starts with shadowing).
        shadow_from = opts.switch_after or 0.0
        round_len = max(opts.duration - shadow_from, 0.0) / max(opts.rounds, 1)
        next_round, rounds_done, last_tick = shadow_from + round_len, 0, 0.0
        while not self._stop:
            now = self.elapsed()
            if opts.switch_after is not None and g.mode == PASSTHROUGH and now >= opts.switch_after:
                g.switch_to_shadow(impl=opts.impl, poll_us=opts.poll_us)
                s.switches.append(f"{PASSTHROUGH}->{SHADOW} at {now:.2f}s")
                next_round = self.elapsed() + round_len
            if now >= opts.duration:
                break
            self._step()
            if g.mode == SHADOW and now >= next_round and rounds_done < opts.rounds - 1:
                self._harvest(writer, rounds_done, now)
                rounds_done += 1
                next_round += round_len
            if self.on_tick and now - last_tick >= 0.25:
                last_tick = now
                self._collect()
                self.on_tick(self)
        self._drain()
        if g.mode == SHADOW:
            self._harvest(writer, rounds_done, self.elapsed())
        s.duration = self.elapsed()
        self._collect()

    def _harvest(self, writer: DumpWriter | None, index: int, at: float) -> None:
        g, s = self.guest, self.summary
        assert g is not None and g.shadow is not None and s is not None
        bitmap = g.shadow.dirty.harvest()
        pages = sum(bin(b).count("1") for b in bitmap)
        s.rounds.append(RoundInfo(index, round(at, 3), pages))
        s.dirty_pages_total += pages
        if writer is not None:
            writer.add_round(bitmap, time.time())

    # -- traffic -----------------------------------------------------------------------------
    def _step(self) -> None:
        if self._net is not None:
            self._net_step()
        else:
            self._blk_step()

    def _net_step(self) -> None:
        drv, s = self._net, self.summary
        # A loopback device (vdpa_sim) drops a frame when no RX buffer is posted at that moment: keep at
        # most half the RX ring's worth of frames in flight once frames are seen coming back, so that
        # reposted RX buffers still on their way through the relay never leave the device without one.
        # Other devices: no window.
        window = drv.rx.num // 2
        if drv.stats.received:
            room = window - (s.frames_sent - drv.stats.received)
        elif drv.stats.tx_done < window or self.elapsed() < 1.0 + (self.opts.switch_after or 0):
            # Not a loopback only once the device took a window's worth and a second went by with
            # nothing back: a device slow to start (a busy host) must not get frames it will drop.
            room = window - s.frames_sent
        else:
            room = 1 << 30
        while room > 0 and drv.send(build_frame(s.frames_sent, 60 + (s.frames_sent * 37) % 1400)):
            s.frames_sent += 1
            room -= 1
        drv.flush()
        self._receive(drv.reap())
        drv.wait(0.005)

    def _receive(self, frames: list[bytes]) -> None:
        s = self.summary
        for f in frames:
            try:
                seq = parse_frame(f)
            except FrameError:
                s.frames_failed += 1
                continue
            if seq is None:
                continue  # someone else's frame
            if seq in self._seen:
                s.frames_duplicated += 1
            else:
                self._seen.add(seq)
                s.frames_verified += 1

    def _drain(self) -> None:
        """Let what is in flight come back (a loopback device answers within a moment)."""
        if self._net is None:
            return
        drv, s = self._net, self.summary
        if not drv.stats.received:
            return  # not a loopback device: nothing will come back
        quiet_since = time.monotonic()
        while s.frames_verified < s.frames_sent and time.monotonic() - quiet_since < 3.0:
            drv.flush()
            before = s.frames_verified
            self._receive(drv.reap())
            if s.frames_verified != before:
                quiet_since = time.monotonic()
            drv.wait(0.02)

    def _blk_step(self) -> None:
        blk, s = self._blk, self.summary
        sector = (s.blk_writes * 8) % max(self._capacity - 8, 1)
        data = os.urandom(8 * SECTOR)
        try:
            blk.write(sector, data)
            s.blk_writes += 1
            if blk.read(sector, len(data)) == data:
                s.blk_reads_verified += 1
            else:
                s.blk_failed += 1
            s.blk_bytes += 2 * len(data)
        except OSError:
            s.blk_failed += 1

    def _collect(self) -> None:
        g, s = self.guest, self.summary
        s.mode = g.mode
        if self._net is not None:
            st = self._net.stats
            s.frames_tx_done, s.frames_received, s.bytes_sent = st.tx_done, st.received, st.sent_bytes
        if g.shadow is not None:
            for i, q in g.shadow.queues.items():
                s.queues[i] = asdict(q.svq.stats)
                s.relay_impl = q.svq.impl
            s.relay_loop = g.shadow.loop.stats
            s.errors = g.errors()

    def _finish(self) -> None:
        if self.guest is not None:
            if self.summary is not None:
                self._collect()
            self.guest.close()
