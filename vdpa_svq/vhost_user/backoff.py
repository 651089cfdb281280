"""How long serve waits before accepting the next frontend, after one that gave up at once.

A frontend that gives up straight away and reconnects at once goes round in a loop: QEMU 10
asking for more queues than serve offers hung up and reconnected about 1,400 times a second,
each time with a connection summary in serve's output. Waiting before the next accept, doubling
from BACKOFF_START_S up to BACKOFF_MAX_S while such connections go on, turns that into about one
a second; a good frontend waits at most BACKOFF_MAX_S once, and a connection that worked (it
started relaying, or lasted QUICK_FAILURE_S) resets the wait.
"""

from __future__ import annotations

QUICK_FAILURE_S = 1.0  # a connection that never relayed and was shorter than this did not work
BACKOFF_START_S = 0.01
BACKOFF_MAX_S = 1.0


class AcceptBackoff:
    """The wait before the next accept, fed with how each connection ended."""

    def __init__(self) -> None:
        self.delay_s = 0.0
        self.failures_in_a_row = 0

    def after(self, *, relayed: bool, duration_s: float) -> float:
        """Record one finished connection; the seconds to wait before accepting the next."""
        if relayed or duration_s >= QUICK_FAILURE_S:
            self.delay_s = 0.0
            self.failures_in_a_row = 0
            return 0.0
        self.failures_in_a_row += 1
        self.delay_s = BACKOFF_START_S if self.delay_s == 0 else min(self.delay_s * 2, BACKOFF_MAX_S)
        return self.delay_s
