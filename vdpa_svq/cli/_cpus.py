"""`--cpus LIST`: the CPUs vdpa-svq's threads may run on ("1", "0,2", "2-3"), as taskset -c takes them."""

from __future__ import annotations

import os

import click


class CpuList(click.ParamType):
    name = "LIST"

    def convert(self, value: object, param: click.Parameter | None, ctx: click.Context | None) -> set[int]:
        if isinstance(value, set):
            return value
        cpus: set[int] = set()
        try:
            for part in str(value).split(","):
                first, dash, last = part.strip().partition("-")
                lo, hi = int(first), int(last if dash else first)
                if lo < 0 or hi < lo:
                    raise ValueError
                cpus.update(range(lo, hi + 1))
        except ValueError:
            self.fail(f"{value!r} is not a CPU list such as 1, 0,2 or 2-3", param, ctx)
        allowed = os.sched_getaffinity(0)
        if not cpus <= allowed:
            self.fail(f"CPU(s) {sorted(cpus - allowed)} not available here (allowed: {sorted(allowed)})", param, ctx)
        return cpus


def pin(cpus: set[int] | None) -> None:
    """Run this thread, and every thread it starts from now on, on `cpus` only."""
    if cpus:
        os.sched_setaffinity(0, cpus)
