"""Soak `vdpa-svq serve`: frontends connect, run traffic, misbehave and disconnect in a loop, and
the server's fds, threads and RSS must stay flat (issue 12).

    python -m tests.vhost_user.soak --seconds 300 --write RELIABILITY.md

One lap is: good traffic (split, then packed), every misbehaving frontend of hostile.py, a
frontend that vanishes mid-traffic and one that hangs up in the middle of a message. The server's
resources are sampled after every lap; the first lap is the warm-up (what serve allocates once,
for good: the soft device's buffers, the C relay's tables, Python's caches).
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import re
import socket
import statistics
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from tests.vhost_user.client import VhostUserFrontend
from tests.vhost_user.hostile import HOSTILE, Resources, ServeProcess, close_kept
from tests.vhost_user.test_backend import loop_frames
from vdpa_svq.ring import Layout

FRAMES_PER_CONNECTION = 200
RSS_GROWTH_LIMIT_KIB = 32 << 10  # after warm-up; a leak of one ring or buffer per lap passes it in minutes


def good(sock: socket.socket, layout: Layout) -> int:
    fe = VhostUserFrontend(sock, layout)
    try:
        drv = fe.setup()
        got = loop_frames(drv, FRAMES_PER_CONNECTION)
        assert sorted(got) == list(range(FRAMES_PER_CONNECTION)), "frames lost or repeated"
        return len(got)
    finally:
        fe.close()


def vanish_mid_traffic(sock: socket.socket, layout: Layout) -> int:
    """Queue frames, kick, and close the socket without stopping the rings or reaping anything."""
    fe = VhostUserFrontend(sock, layout)
    drv = fe.setup()
    for seq in range(32):
        drv.send(bytes([seq]) * 256)
    drv.flush()
    fe.close()
    return 0


def hang_up_mid_message(sock: socket.socket, layout: Layout) -> int:
    sock.sendall(b"\x01\x00\x00\x00\x01")  # half a header (GET_FEATURES, flags cut short)
    sock.close()
    return 0


@dataclass
class Soak:
    seconds: float
    laps: int = 0
    connections: Counter = field(default_factory=Counter)
    frames: int = 0
    samples: list[tuple[float, Resources]] = field(default_factory=list)
    errors_logged: int = 0

    def run(self, tmp: Path) -> None:
        serve = ServeProcess(tmp)
        try:
            done = 0
            start = time.monotonic()
            while time.monotonic() - start < self.seconds or self.laps < 2:
                for name, step in self.lap():
                    layout = Layout.PACKED if (self.laps + len(name)) % 2 else Layout.SPLIT
                    result = step(serve.connect(), layout)
                    if isinstance(result, int):
                        self.frames += result
                    else:
                        result.close()
                    done += 1
                    self.connections[name] += 1
                    serve.wait_connections(done)
                close_kept()  # the read ends of this lap's full pipes (ours, not the server's)
                self.laps += 1
                self.samples.append((time.monotonic() - start, serve.resources()))
            log = serve.stderr()
            assert "Traceback" not in log and "internal error" not in log, log[-3000:]
            self.errors_logged = len(re.findall(r"closing the connection: ", log))
        finally:
            serve.stop()

    @staticmethod
    def lap():
        yield "good traffic", good
        yield from HOSTILE.items()
        yield "vanishes mid-traffic", vanish_mid_traffic
        yield "hangs up mid-message", hang_up_mid_message

    # -- verdict ------------------------------------------------------------------------------

    def after_warmup(self) -> list[Resources]:
        return [r for _, r in self.samples[1:]]

    def problems(self) -> list[str]:
        rest = self.after_warmup()
        out = []
        if len({r.fds for r in rest}) != 1:
            out.append(f"fds not flat: {sorted({r.fds for r in rest})}")
        if len({r.threads for r in rest}) != 1:
            out.append(f"threads not flat: {sorted({r.threads for r in rest})}")
        growth = max(r.rss_kib for r in rest) - rest[0].rss_kib
        if growth > RSS_GROWTH_LIMIT_KIB:
            out.append(f"RSS grew {growth >> 10} MiB after warm-up (limit {RSS_GROWTH_LIMIT_KIB >> 10} MiB)")
        return out

    def report(self) -> str:
        rest = self.after_warmup()
        rss = [r.rss_kib for r in rest]
        third = max(1, len(rss) // 3)
        first, last = statistics.mean(rss[:third]), statistics.mean(rss[-third:])
        lines = [
            f"- {self.seconds:.0f} s, {self.laps} laps, {sum(self.connections.values())} connections "
            f"({self.frames} frames looped through soft:net, {self.errors_logged} connections closed with a reason)",
            "- connections per kind: " + ", ".join(f"{k} {v}" for k, v in self.connections.items()),
            f"- after the warm-up lap: fds {_span(r.fds for r in rest)}, threads {_span(r.threads for r in rest)}, "
            f"RSS {min(rss) / 1024:.1f}-{max(rss) / 1024:.1f} MiB "
            f"(mean of the first third {first / 1024:.1f} MiB, of the last third {last / 1024:.1f} MiB)",
            f"- warm-up lap: fds {self.samples[0][1].fds}, threads {self.samples[0][1].threads}, "
            f"RSS {self.samples[0][1].rss_kib / 1024:.1f} MiB",
            "- verdict: " + ("flat" if not self.problems() else "; ".join(self.problems())),
        ]
        return "\n".join(lines)


def _span(values) -> str:
    values = sorted(set(values))
    return f"{values[0]}" if len(values) == 1 else f"{values[0]}-{values[-1]}"


SECTION = "## Soak: serve under connecting, misbehaving and vanishing frontends"


def write_section(path: Path, body: str) -> None:
    text = path.read_text() if path.exists() else "# Reliability\n"
    stamp = datetime.date.today().isoformat()
    machine = f"{platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}"
    block = (f"{SECTION}\n\n`python -m tests.vhost_user.soak` (`make soak`), {stamp}, {machine}:\n\n{body}\n")
    if SECTION in text:
        head, _, tail = text.partition(SECTION)
        nxt = tail.find("\n## ")
        text = head + block + (tail[nxt + 1 :] if nxt >= 0 else "")
    else:
        text = text.rstrip("\n") + "\n\n" + block
    path.write_text(text)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=300, help="how long to soak (default 300)")
    parser.add_argument("--write", metavar="FILE", type=Path, help="put the figures in this Markdown file")
    args = parser.parse_args()
    soak = Soak(args.seconds)
    with tempfile.TemporaryDirectory() as tmp:
        soak.run(Path(tmp))
    body = soak.report()
    print(body)
    if args.write:
        write_section(args.write, body)
    return 1 if soak.problems() else 0


if __name__ == "__main__":
    raise SystemExit(main())
