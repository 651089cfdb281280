"""The benches' own bookkeeping (no VIRTIO clause: these are the rules by which bench/latency.py and
bench/vhost_user.py label their figures): a latency cell that did not hold its rate must say so, the
burst the latency frontend uses at each rate, and the kernel bench's --smp note and checks."""

from __future__ import annotations

import pytest

from bench import latency as lat
from bench import vhost_user as vu


def cell(sent: int, returned: int, seconds: float = 1.0, late: int = 0, full: int = 0) -> lat.Cell:
    return lat.Cell(seconds=seconds, sent=sent, returned=returned, late=late, full=full)


def test_a_cell_holds_its_rate_only_when_it_offered_and_got_back_nearly_all_of_it():
    assert lat.held(cell(10_000, 10_000), 10_000)
    assert lat.held(cell(9_500, 9_500), 10_000)  # HELD: 95%
    assert not lat.held(cell(9_499, 9_499), 10_000)  # offered too little
    assert not lat.held(cell(10_000, 9_000), 10_000)  # got back too little of it
    assert lat.held(cell(30_000, 30_000, seconds=3.0), 10_000)  # per second, over the pooled slices


def test_an_rtt_that_did_not_hold_its_rate_does_not_read_as_a_latency():
    assert lat.rtt_cell(cell(10_000, 10_000), 10_000, 2.54) == "2.5"
    assert lat.rtt_cell(cell(20_000, 20_000), 100_000, 2.54) == "not held (2.5)"


def test_why_not_held_names_each_cause():
    asked = 100_000
    why = lat.why_not_held(cell(20_000, 10_000, late=70_000, full=10_000), asked)
    assert "70% of the frames due were in ticks the frontend missed" in why
    assert "10% found the TX ring full" in why
    assert "50% of those offered did not come back" in why


def test_auto_burst_is_one_frame_at_a_time_up_to_one_by_one_then_grows_to_32():
    assert lat.burst_for(10_000, "auto") == 1
    assert lat.burst_for(lat.ONE_BY_ONE, "auto") == 1
    assert lat.burst_for(lat.ONE_BY_ONE + 1, "auto") == 2
    assert lat.burst_for(100_000, "auto") == 10
    assert lat.burst_for(1_000_000, "auto") == lat.MAX_BURST == 32
    assert lat.burst_for(1_000_000, "4") == 4


@pytest.mark.parametrize("bad", ["0", "33", "x", "-1"])
def test_burst_outside_1_to_32_is_a_clear_error(bad, capsys):
    with pytest.raises(SystemExit):
        lat.main(["--burst", bad])
    assert "--burst" in capsys.readouterr().err


def test_smp_note_only_when_vcpus_outnumber_the_hosts_cpus_under_tcg(monkeypatch):
    monkeypatch.setattr(vu.os, "cpu_count", lambda: 2)
    assert vu.smp_note(2, "TCG") == ""
    assert vu.smp_note(3, "KVM") == ""
    assert "3 vCPUs on 2 host CPUs" in vu.smp_note(3, "TCG")


@pytest.mark.parametrize("argv", [["--smp", "3"], ["--kernel", "--smp", "0"]])
def test_smp_is_checked_before_any_guest_boots(argv, capsys):
    with pytest.raises(SystemExit):
        vu.main(argv)
    assert "--smp" in capsys.readouterr().err
