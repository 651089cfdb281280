"""`--poll-us auto|US`: how the relay loop busy-polls the rings (vdpa_svq/loop.py)."""

from __future__ import annotations

import click

from vdpa_svq.loop import ADAPTIVE, ADAPTIVE_MAX_US, Polling

POLL_HELP = (
    "Busy-poll the rings after each burst, with notifications off: 'auto' learns the window from the "
    f"traffic (up to {ADAPTIVE_MAX_US} µs: polls without a break under load, sleeps when idle), US polls "
    "for US microseconds every time, 0 never polls (notifications only). C relay only; the Python relay "
    "is notification-driven, and 'auto' means that for it."
)


class PollSetting(click.ParamType):
    name = "auto|US"

    def convert(self, value: object, param: click.Parameter | None, ctx: click.Context | None) -> Polling:
        if value == ADAPTIVE or isinstance(value, int):
            return value
        try:
            us = int(str(value))
        except ValueError:
            us = -1
        if us < 0:
            self.fail(f"{value!r} is not 'auto' or a number of microseconds >= 0", param, ctx)
        return us
