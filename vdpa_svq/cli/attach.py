"""`vdpa-svq attach DEV`: put the in-process guest on a device through shadow virtqueues."""

from __future__ import annotations

import json
import os
import signal
import sys
from typing import Any

import click

from vdpa_svq.cli._cpus import CpuList, pin
from vdpa_svq.cli._polling import POLL_HELP, PollSetting
from vdpa_svq.cli.errors import RunFailed
from vdpa_svq.devices import open_device
from vdpa_svq.loop import ADAPTIVE, Polling
from vdpa_svq.ring import Layout
from vdpa_svq.workload import AttachOptions, AttachRun, Summary


def _stats_table(run: AttachRun) -> Any:
    from rich.table import Table

    s = run.summary
    t = Table(title=f"{s.device} ({s.device_type}) — {s.mode} — {run.elapsed():.1f}s", title_justify="left")
    for col in ("queue", "forwarded", "returned", "bytes written", "device kicks", "guest calls", "ring full"):
        t.add_column(col, justify="right")
    for i, q in sorted(s.queues.items()):
        t.add_row(str(i), *(str(q[k]) for k in ("forwarded", "returned", "bytes_written", "device_kicks",
                                                 "guest_calls", "ring_full")))
    if s.device_type == "net":
        t.caption = f"frames sent {s.frames_sent}, verified {s.frames_verified}, failed {s.frames_failed}"
    else:
        t.caption = f"blk writes {s.blk_writes}, verified reads {s.blk_reads_verified}, failed {s.blk_failed}"
    if s.rounds:
        t.caption += f"; dirty pages per round {[r.dirty_pages for r in s.rounds]}"
    return t


def failures(s: Summary) -> str:
    """What made the verdict FAILED, in one line."""
    counts = [(s.frames_failed, "frames damaged"), (s.frames_duplicated, "frames duplicated"),
              (s.blk_failed, "block reads failed"), (len(s.errors), "queues stopped")]
    return "the run failed: " + ", ".join(f"{n} {what}" for n, what in counts if n)


def print_summary(s: Summary) -> None:
    echo = click.echo
    verdict = "OK" if s.ok else "FAILED"
    echo(f"{s.device}: {s.device_type}, guest {s.guest_layout} rings -> shadow {s.shadow_layout} rings "
         f"({s.relay_impl} relay), {s.duration:.1f}s, {verdict}")
    for sw in s.switches:
        echo(f"  switch: {sw}")
    if s.device_type == "net":
        echo(f"  frames: {s.frames_sent} sent, {s.frames_tx_done} completed, {s.frames_received} received, "
             f"{s.frames_verified} verified, {s.frames_failed} damaged, {s.frames_duplicated} duplicated")
        if s.frames_sent and not s.frames_received:
            echo("  (nothing came back: expected unless the device loops frames back, as vdpa_sim net does)")
    else:
        echo(f"  blk: {s.blk_writes} writes, {s.blk_reads_verified} read back equal, {s.blk_failed} failed, "
             f"{s.blk_bytes} bytes")
    for i, q in sorted(s.queues.items()):
        echo(f"  queue {i}: {q['forwarded']} forwarded, {q['returned']} returned, {q['bytes_written']} bytes written "
             f"by the device, {q['device_kicks']} kicks, {q['guest_calls']} calls")
    if s.rounds:
        per = ", ".join(f"#{r.round}@{r.at:.2f}s: {r.dirty_pages}" for r in s.rounds)
        echo(f"  dirty pages per round: {per} (total {s.dirty_pages_total})")
    if s.duration > 0 and s.queues:
        rate = sum(q["forwarded"] for q in s.queues.values()) / s.duration
        echo(f"  relay rate: {rate:,.0f} buffers/s")
    if s.dump:
        echo(f"  dirty log written to {s.dump}")
    for i, e in sorted(s.errors.items()):
        echo(f"  queue {i} stopped: {e}")


@click.command()
@click.argument("device", metavar="DEV")
@click.option("--guest-layout", type=click.Choice(["split", "packed"]), default="split", show_default=True,
              help="Layout of the guest-visible rings (the in-process guest's).")
@click.option("--shadow-layout", type=click.Choice(["auto", "split", "packed"]), default="auto", show_default=True,
              help="Layout of the rings the device sees; auto takes packed when the device offers it.")
@click.option("--duration", type=click.FloatRange(min=0.1), default=5.0, show_default=True, metavar="S",
              help="Seconds of traffic.")
@click.option("--switch-after", type=click.FloatRange(min=0), default=None, metavar="S",
              help="Start in passthrough (device on the guest's rings) and switch to shadowing after S seconds, "
                   "as at the start of a migration. Needs a device that can suspend (vdpa_sim can, vp_vdpa can't).")
@click.option("--dirty-log", type=click.Path(dir_okay=False, writable=True), default=None, metavar="FILE",
              help="Write the dirty-page log rounds to FILE (see `vdpa-svq dirty-log show`).")
@click.option("--rounds", type=click.IntRange(min=1), default=1, show_default=True,
              help="Dirty-log sync rounds over the shadowed time, like migration pre-copy rounds.")
@click.option("--impl", type=click.Choice(["auto", "c", "py"]), default="auto", show_default=True,
              help="Relay implementation: the C hot loop, or the Python reference; auto takes C when it was built.")
@click.option("--poll-us", type=PollSetting(), default=ADAPTIVE, show_default=True, help=POLL_HELP)
@click.option("--cpus", type=CpuList(), default=None,
              help="Run vdpa-svq (relay and in-process guest) on these CPUs only (as taskset -c: 1, 0,2, 2-3).")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
def attach(device: str, guest_layout: str, shadow_layout: str, duration: float, switch_after: float | None,
           dirty_log: str | None, rounds: int, impl: str, poll_us: Polling, cpus: set[int] | None,
           as_json: bool) -> None:
    """Relay a device through shadow virtqueues and log the pages it dirties.

    DEV is /dev/vhost-vdpa-N, or soft:net / soft:blk (built-in software devices, for hosts without
    vDPA). An in-process guest drives traffic through the relay: frames with sequence numbers and
    checksums on a net device (verified when a loopback device such as vdpa_sim sends them back),
    writes read back and compared on a block device. At the end: per-queue counts, dirty pages per
    round, the relay rate.

    \b
    Examples:
      vdpa-svq attach /dev/vhost-vdpa-0 --duration 10 --rounds 5 --dirty-log net.vdl
      vdpa-svq attach /dev/vhost-vdpa-0 --switch-after 2 --guest-layout split
      vdpa-svq attach soft:net --guest-layout packed --shadow-layout split --json
    """
    pin(cpus)  # before any thread starts: the relay loop's and the soft devices' threads inherit it
    opts = AttachOptions(
        guest_layout=Layout(guest_layout), shadow_layout=shadow_layout, duration=duration,
        switch_after=switch_after, rounds=rounds, dirty_log=dirty_log, impl=impl, poll_us=poll_us,
    )
    live = None
    on_tick = None
    # A live table only on a real terminal (not through a serial console or a pipe).
    terminal = sys.stdout.isatty() and os.environ.get("TERM", "dumb") != "dumb" and "NO_COLOR" not in os.environ
    if not as_json and terminal:
        from rich.live import Live

        live = Live(refresh_per_second=4, transient=True)

        def on_tick(r: AttachRun) -> None:
            live.update(_stats_table(r))

    dev = open_device(device)
    try:
        run = AttachRun(dev, opts, on_tick=on_tick)
        previous = {sig: signal.signal(sig, lambda *_: run.stop()) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            if live is not None:
                with live:
                    summary = run.run()
            else:
                summary = run.run()
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
    finally:
        dev.close()
    if as_json:
        click.echo(json.dumps(summary.to_json(), indent=1))
    else:
        print_summary(summary)
    if not summary.ok:
        raise RunFailed(f"{summary.device}: {failures(summary)}")
