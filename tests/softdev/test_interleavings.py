"""Random interleavings of driver operations against a live SoftNetDevice thread.

Whatever the order of sends, RX posts, partial reaps, notification suppression and
suspend/resume, every frame comes back once, in order, byte-identical, and no queue breaks.
"""

from __future__ import annotations

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.softdev.driver import NET_HDR, RX, SLOT, TX, NetDriver, net_hdr, rx_hdr
from vdpa_svq.softdev import SoftNetDevice

op = st.one_of(
    st.tuples(st.just("send"), st.integers(1, SLOT - NET_HDR), st.booleans()),  # size, kick now
    st.tuples(st.just("post"), st.integers(1, 6)),
    st.tuples(st.just("reap_rx"), st.integers(1, 6)),
    st.tuples(st.just("reap_tx"), st.integers(1, 6)),
    st.tuples(st.just("kick_tx")),
    st.tuples(st.just("disable_cb"), st.sampled_from([RX, TX])),
    st.tuples(st.just("suspend_resume")),
)


def _reap(drv: NetDriver, qi: int, k: int) -> list[tuple[object, int]]:
    out = []
    for _ in range(k):
        r = drv.queues[qi].ring.get_used()
        if r is None:
            break
        out.append(r)
    return out


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    packed=st.booleans(),
    event_idx=st.booleans(),
    indirect=st.booleans(),
    num=st.sampled_from([4, 8]),
    ops=st.lists(op, max_size=60),
    seed=st.integers(0, 2**16),
)
def test_every_frame_comes_back_once_in_order(packed, event_idx, indirect, num, ops, seed):
    drv = NetDriver(SoftNetDevice(), packed=packed, event_idx=event_idx, indirect=indirect, num=num, slots=64)
    try:
        sent: list[bytes] = []
        got: list[bytes] = []
        tx_done = 0
        for o in ops:
            kind = o[0]
            if kind == "send":
                size, kick = o[1], o[2]
                tx_ring = drv.queues[TX].ring
                if drv.pool.available < 2 or tx_ring.num_free < (1 if indirect else 2):
                    continue
                seq = len(sent)
                frame = ((seed + seq).to_bytes(4, "little") + bytes([seq & 0xFF])) * (size // 5 + 1)
                frame = frame[:size]
                hdr = net_hdr(seq)
                drv.send(frame, hdr, kick=kick)
                sent.append(rx_hdr(hdr) + frame)
            elif kind == "post":
                drv.post_rx(o[1])
            elif kind == "reap_rx":
                got += [drv._rx_bytes(t, n) for t, n in _reap(drv, RX, o[1])]
            elif kind == "reap_tx":
                tx_done += drv._free_tx(_reap(drv, TX, o[1]))
            elif kind == "kick_tx":
                drv.kick(TX)
            elif kind == "disable_cb":
                drv.queues[o[1]].ring.disable_cb()
            elif kind == "suspend_resume":
                drv.dev.suspend()
                bases = [drv.dev.get_vring_base(i) for i in (RX, TX)]
                assert bases == [drv.dev.get_vring_base(i) for i in (RX, TX)], "state moved while suspended"
                drv.dev.resume()
        # Drain: give RX room until every frame is back; waiting re-enables callbacks.
        drv.kick(TX)
        while len(got) < len(sent):
            drv.post_rx(num)
            got += drv.recv(1)
            got += drv.recv_ready()
            tx_done += drv.complete_tx_ready()
        tx_done += drv.complete_tx(len(sent) - tx_done)
        assert got == sent
        assert tx_done == len(sent)
        assert drv.dev.queue_errors() == {}
        stats = drv.dev.stats()
        assert stats["tx"].chains == len(sent) and stats["tx"].dropped == 0
    finally:
        drv.close()
