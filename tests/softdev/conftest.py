"""Every soft device test runs against both datapaths of the net device: the loopback in C
(vdpa_svq/softdev/_netloop.c, which leaves irregular chains to Python) and the Python reference."""

from __future__ import annotations

import pytest

from vdpa_svq.softdev.net import NetLoop, SoftNetDevice


@pytest.fixture(autouse=True, params=["c", "py"])
def net_datapath(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    if request.param == "c" and NetLoop is None:
        pytest.fail("the C extension is not built: the C datapath cannot be tested (make venv builds it)")
    monkeypatch.setattr(SoftNetDevice, "DEFAULT_DATAPATH", request.param)
    return request.param
