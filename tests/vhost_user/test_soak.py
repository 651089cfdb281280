"""A short soak (soak.py; `make soak` runs the long one): serve's fds, threads and RSS stay flat
while frontends connect, run traffic, misbehave and vanish, lap after lap."""

from __future__ import annotations

from .soak import Soak


def test_a_short_soak_leaves_serve_flat(tmp_path):
    soak = Soak(seconds=15)
    soak.run(tmp_path)
    assert soak.laps >= 3 and soak.frames > 0
    assert soak.problems() == [], soak.report()
