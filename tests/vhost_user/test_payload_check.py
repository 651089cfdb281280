"""A handler reads its payload through Message.payload_as: a real check, not an assert (python -O
strips asserts), so a payload of the wrong shape is a ProtocolError, which closes the connection."""

from __future__ import annotations

import pytest

from vdpa_svq.vhost_user import messages as m
from vdpa_svq.vhost_user.messages import Message, ProtocolError, Request


def test_payload_of_the_shape_asked_for_is_returned():
    st = m.VringState(1, 256)
    assert Message(Request.SET_VRING_NUM, 1, st, []).payload_as(m.VringState) is st
    assert Message(Request.SET_FEATURES, 1, 7, []).payload_as(int) == 7


@pytest.mark.parametrize("payload, kind", [(None, int), (5, m.VringState), (m.VringState(0, 1), m.MemTable)])
def test_payload_of_another_shape_is_a_protocol_error(payload, kind):
    with pytest.raises(ProtocolError, match=f"SET_VRING_NUM: payload is .*, not {kind.__name__}"):
        Message(Request.SET_VRING_NUM, 1, payload, []).payload_as(kind)
