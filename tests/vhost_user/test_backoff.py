"""serve's accept back-off: frontends that give up at once and reconnect at once (QEMU asking for
more queues than offered did so ~1,400 times a second) are slowed to about one a second; a
connection that relays resets the wait."""

from __future__ import annotations

import itertools
import logging

import pytest

from tests.vhost_user.client import VhostUserFrontend
from tests.vhost_user.conftest import RunningServer
from vdpa_svq.ring import Layout
from vdpa_svq.vhost_user.backoff import BACKOFF_MAX_S, BACKOFF_START_S, QUICK_FAILURE_S, AcceptBackoff


def test_the_wait_doubles_while_frontends_give_up_and_is_capped():
    b = AcceptBackoff()
    delays = [b.after(relayed=False, duration_s=0.001) for _ in range(12)]
    assert delays[0] == BACKOFF_START_S
    assert all(later == min(2 * earlier, BACKOFF_MAX_S) for earlier, later in itertools.pairwise(delays))
    assert delays[-1] == BACKOFF_MAX_S
    assert b.failures_in_a_row == 12


@pytest.mark.parametrize("relayed, duration_s", [(True, 0.001), (False, QUICK_FAILURE_S)])
def test_a_connection_that_worked_resets_the_wait(relayed, duration_s):
    b = AcceptBackoff()
    for _ in range(5):
        b.after(relayed=False, duration_s=0.0)
    assert b.after(relayed=relayed, duration_s=duration_s) == 0.0
    assert b.failures_in_a_row == 0
    assert b.after(relayed=False, duration_s=0.0) == BACKOFF_START_S


def test_serve_backs_off_from_a_reconnect_loop_and_a_relaying_frontend_resets_it(tmp_path, caplog):
    srv = RunningServer(str(tmp_path / "vu.sock"), accept_backoff=True)
    try:
        with caplog.at_level(logging.WARNING, logger="vdpa_svq.vhost_user"):
            for n in range(1, 7):  # connect and hang up at once, as a frontend in a reconnect loop does
                srv.connect().close()
                srv.wait_connections(n)
        backoff = srv.server.backoff
        assert backoff is not None and backoff.failures_in_a_row == 6
        assert backoff.delay_s == BACKOFF_START_S * 2**5
        assert "6 frontends" not in caplog.text and "5 frontends in a row gave up at once" in caplog.text

        fe = VhostUserFrontend(srv.connect(), Layout.SPLIT)  # accepted once the wait is over
        try:
            drv = fe.setup()
            drv.send(b"\x00" * 60)
            drv.flush()
        finally:
            fe.close()
        srv.wait_connections(7)
        assert srv.server.summaries[-1].started == 1
        assert backoff.failures_in_a_row == 0 and backoff.delay_s == 0.0
    finally:
        srv.stop()
