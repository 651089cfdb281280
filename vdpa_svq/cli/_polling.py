"""`--poll-us auto|US`: how the relay loop busy-polls the rings (vdpa_svq/loop.py)."""

from __future__ import annotations

import contextlib

import click

from vdpa_svq.loop import ADAPTIVE, ADAPTIVE_MAX_US, Polling, check_polling

POLL_HELP = (
    "Busy-poll the rings after each burst, with notifications off. 'auto' learns when polling pays: "
    "it polls without a break under load, goes back to notifications when the traffic is too sparse "
    f"for the spin to pay for itself (gaps longer than {ADAPTIVE_MAX_US} µs, or longer than a few "
    "times the relaying work between them), and pauses polling while a busy thread shares its CPU; "
    "idle, it sleeps. US polls for US microseconds after every burst, whatever it costs (give the relay "
    "a CPU of its own: --cpus); 0 never polls (notifications only)."
)


class PollSetting(click.ParamType):
    name = "auto|US"

    def convert(self, value: object, param: click.Parameter | None, ctx: click.Context | None) -> Polling:
        """The setting as the loop takes it; loop.check_polling alone says what is valid."""
        setting: Polling = value if isinstance(value, int) else str(value)
        if setting != ADAPTIVE:
            with contextlib.suppress(ValueError):  # not a number: check_polling refuses the text
                setting = int(setting)
        try:
            return check_polling(setting)
        except ValueError:
            self.fail(f"{value!r} is not 'auto' or a number of microseconds >= 0", param, ctx)
