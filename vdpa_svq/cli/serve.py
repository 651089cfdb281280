"""`vdpa-svq serve DEV --socket PATH`: a vhost-user backend whose datapath is shadow virtqueues on DEV."""

from __future__ import annotations

import json
import logging
import signal

import click

from vdpa_svq.cli._cpus import CpuList, pin
from vdpa_svq.cli._polling import POLL_HELP, PollSetting
from vdpa_svq.devices import open_device
from vdpa_svq.loop import ADAPTIVE, Polling
from vdpa_svq.vhost_user.backend import ConnectionSummary, Server


def _print_summary(s: ConnectionSummary, as_json: bool) -> None:
    if as_json:
        click.echo(json.dumps(s.to_json()), nl=True)
        return
    verdict = "closed" if s.error is None else f"closed on error: {s.error}"
    click.echo(f"{s.peer}: {s.messages} messages, features {s.features:#x}, protocol features "
               f"{s.protocol_features:#x}, relayed {s.duration:.1f}s in {s.started} run(s) "
               f"(guest {s.guest_layout or '-'} rings -> shadow {s.shadow_layout or '-'} rings), {verdict}")
    for i, q in sorted(s.queues.items()):
        click.echo(f"  queue {i}: {q['forwarded']} forwarded, {q['returned']} returned, "
                   f"{q['bytes_written']} bytes written by the device, {q['device_kicks']} device kicks, "
                   f"{q['guest_calls']} guest calls")
    if s.relay_loop:
        loop = s.relay_loop
        learnt = (f", polling window learnt: {loop['poll_window_ns'] / 1000:.0f} µs"
                  if loop.get("window_grows") or loop.get("window_shrinks") else "")
        if loop.get("contended_phases"):
            learnt += f", {loop['contended_phases']} phases stopped for a CPU other threads wanted"
        click.echo(f"  relay loop: {loop.get('wakeups', 0)} wake-ups, {loop.get('poll_rounds', 0)} polling rounds "
                   f"in {loop.get('poll_phases', 0)} polling phases{learnt}")
    if s.log_syncs:
        click.echo(f"  dirty log: {s.log_syncs} syncs into the frontend's log")


@click.command()
@click.argument("device", metavar="DEV")
@click.option("--socket", "socket_path", required=True, type=click.Path(dir_okay=False), metavar="PATH",
              help="Unix socket to listen on (the frontend connects as client; a stale socket is replaced).")
@click.option("--impl", type=click.Choice(["auto", "c", "py"]), default="auto", show_default=True,
              help="Relay implementation: the C hot loop, or the Python reference.")
@click.option("--poll-us", type=PollSetting(), default=ADAPTIVE, show_default=True, help=POLL_HELP)
@click.option("--cpus", type=CpuList(), default=None,
              help="Run vdpa-svq on these CPUs only (as taskset -c: 1, 0,2, 2-3), with one relay thread per CPU, "
                   "pinned in ascending order; queue pair p is relayed by thread p % CPUs. With --poll-us US, give "
                   "each a CPU no other busy-polling thread uses. Default: every CPU, and relay threads for half of "
                   "them (the others are the peers': vCPUs, a polling frontend, the device), unpinned.")
@click.option("--json-stats", "as_json", is_flag=True, help="Print each connection's summary as one JSON line.")
@click.option("-v", "--verbose", is_flag=True, help="Log every connection's progress on stderr.")
def serve(device: str, socket_path: str, impl: str, poll_us: Polling, cpus: set[int] | None, as_json: bool,
          verbose: bool) -> None:
    """Serve vhost-user frontends (QEMU, DPDK virtio-user) through shadow virtqueues on DEV.

    DEV is /dev/vhost-vdpa-N, or soft:net / soft:blk. One frontend at a time; when it disconnects
    the device is reset and the next one is accepted. Runs until SIGINT or SIGTERM; prints a
    summary per connection.

    \b
    Example:
      vdpa-svq serve /dev/vhost-vdpa-0 --socket /tmp/vu.sock
      dpdk-testpmd --no-huge -m 512 --no-pci --vdev net_virtio_user0,path=/tmp/vu.sock,packed_vq=1 -- ...
    """
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format="vdpa-svq: %(message)s")
    pin(cpus)  # before any thread starts: every thread inherits it; the relay threads then take one CPU each
    dev = open_device(device)
    try:
        server = Server(dev, socket_path, impl=impl, poll_us=poll_us, relay_cpus=sorted(cpus or ()))
        previous = {sig: signal.signal(sig, lambda *_: server.stop()) for sig in (signal.SIGINT, signal.SIGTERM)}
        if not as_json:
            click.echo(f"{device}: serving vhost-user on {socket_path}", err=True)
        try:
            server.serve_forever(on_connection=lambda s: _print_summary(s, as_json))
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
    finally:
        dev.close()
