"""Every device class implements vdpa_svq.device.Device, signatures included.

The Protocol is structural (kernel_iface does not import vdpa_svq), so nothing but this test notices a
device class drifting from it: a renamed parameter, a dropped default, a changed type, a method gone.
The rule is the usual one for a subtype: an implementation takes every parameter the Protocol names,
by the same name and kind, with the same type, keeps the Protocol's defaults (it may add one), adds
only parameters with defaults, and returns the Protocol's type or one member of its union.
"""

from __future__ import annotations

import inspect
import socket
import typing

import pytest

from kernel_iface import NotSupported, VhostVdpa
from vdpa_svq.device import Device
from vdpa_svq.errors import GuestRingError
from vdpa_svq.session import device_fault
from vdpa_svq.softdev import SoftBlkDevice, SoftNetDevice
from vdpa_svq.softdev.base import SoftDevice
from vdpa_svq.vhost_user.device import VhostUserDevice

DEVICE_CLASSES = [VhostVdpa, SoftDevice, SoftNetDevice, SoftBlkDevice, VhostUserDevice]


def protocol_methods() -> list[str]:
    return sorted(name for name, v in vars(Device).items() if callable(v) and not name.startswith("_"))


def hints(fn: object) -> dict[str, object]:
    return typing.get_type_hints(inspect.unwrap(fn))  # type: ignore[arg-type]


def incompatibilities(proto_fn: object, impl_fn: object) -> list[str]:
    """Why `impl_fn` cannot stand where `proto_fn` is declared (empty: it can)."""
    want, have = inspect.signature(proto_fn), inspect.signature(impl_fn)  # type: ignore[arg-type]
    want_types, have_types = hints(proto_fn), hints(impl_fn)
    out = []
    have_params = list(have.parameters.values())
    for i, p in enumerate(want.parameters.values()):
        q = have.parameters.get(p.name)
        if q is None:
            out.append(f"no parameter {p.name!r}")
            continue
        if q.kind != p.kind:
            out.append(f"{p.name!r} is {q.kind.description}, not {p.kind.description}")
        if p.kind is not p.KEYWORD_ONLY and (i >= len(have_params) or have_params[i].name != p.name):
            out.append(f"{p.name!r} is not positional parameter {i}")
        if p.default is not p.empty and q.default != p.default:
            out.append(f"{p.name!r} defaults to {q.default!r}, not {p.default!r}")
        if p.name in want_types and have_types.get(p.name) != want_types[p.name]:
            out.append(f"{p.name!r} is {have_types.get(p.name)}, not {want_types[p.name]}")
    for q in have_params:
        if q.name not in want.parameters and q.default is q.empty and q.kind not in (q.VAR_POSITIONAL, q.VAR_KEYWORD):
            out.append(f"extra parameter {q.name!r} without a default")
    ret, got = want_types.get("return"), have_types.get("return")
    if got != ret and got not in typing.get_args(ret):
        out.append(f"returns {got}, not {ret}")
    return out


@pytest.mark.parametrize("cls", DEVICE_CLASSES, ids=lambda c: c.__name__)
def test_device_class_implements_the_device_protocol(cls):
    missing = [name for name in protocol_methods() if not callable(getattr(cls, name, None))]
    assert not missing, f"{cls.__name__} lacks {missing}"
    wrong = {
        name: why
        for name in protocol_methods()
        if (why := incompatibilities(getattr(Device, name), getattr(cls, name)))
    }
    assert not wrong, f"{cls.__name__}: {wrong}"


def test_every_device_has_a_path():
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    devices = [VhostVdpa(-1, "/dev/vhost-vdpa-7"), SoftNetDevice(), SoftBlkDevice(), VhostUserDevice(a, "/x.sock")]
    try:
        assert [d.path for d in devices] == ["/dev/vhost-vdpa-7", "soft:net", "soft:blk", "vhost-user:/x.sock"]
        assert all(typing.get_type_hints(Device)["path"] is type(d.path) for d in devices)
    finally:
        for d in devices[1:]:
            d.close()
        b.close()


@pytest.mark.parametrize(
    "proto, impl, why",
    [
        ("def f(self, index: int) -> int: ...", "def f(self, i: int) -> int: ...", "no parameter 'index'"),
        ("def f(self, a: int, b: int) -> int: ...", "def f(self, b: int, a: int) -> int: ...", "not positional"),
        ("def f(self, a: int = 0) -> int: ...", "def f(self, a: int) -> int: ...", "defaults to"),
        ("def f(self, a: int) -> int: ...", "def f(self, a: str) -> int: ...", "'a' is"),
        ("def f(self) -> int: ...", "def f(self, extra: int) -> int: ...", "extra parameter"),
        ("def f(self) -> int | None: ...", "def f(self) -> str: ...", "returns"),
        ("def f(self, *, a: int) -> None: ...", "def f(self, a: int) -> None: ...", "keyword-only"),
    ],
)
def test_the_check_catches_drift(proto, impl, why):
    """The check itself can fail: each kind of drift it is there for is reported."""
    ns: dict[str, object] = {}
    exec(proto.replace("def f", "def proto_f"), ns)  # noqa: S102 - fixed test snippets
    exec(impl.replace("def f", "def impl_f"), ns)  # noqa: S102
    found = incompatibilities(ns["proto_f"], ns["impl_f"])
    assert any(why in f for f in found), found


def test_the_check_accepts_what_a_subtype_may_do():
    ns: dict[str, object] = {}
    exec("def proto_f(self, a: int, b: int) -> int | None: ...", ns)  # noqa: S102
    exec("def impl_f(self, a: int, b: int = 1, *, flags: int = 0) -> int: ...", ns)  # noqa: S102
    assert incompatibilities(ns["proto_f"], ns["impl_f"]) == []


def test_a_devices_own_account_is_declared_not_probed():
    """faults() / activity(): a software device gives its account (each queue it stopped using, by
    index, with its reason: VIRTIO 1.2 2.1.2; what each queue moved), from which session.device_fault
    takes the one queue's reason when its error eventfd fires; the kernel's devices and a vhost-user
    backend keep none a user can read, and say so (NotSupported) instead of answering with nothing."""
    net = SoftNetDevice()
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    others = [VhostVdpa(-1, "/dev/vhost-vdpa-7"), VhostUserDevice(a, "/x.sock")]
    try:
        assert net.faults() == {}
        assert "rx: 0 chains, 0 kicks, 0 calls, 0 dropped" in net.activity()
        with net.lock:
            net.break_queue(net.queues[1], GuestRingError("tx", "injected"))
        assert net.faults() == {1: "tx: guest broke the ring: injected"}
        assert device_fault(net, 1) == "tx: guest broke the ring: injected"
        assert device_fault(net, 0) == "it signalled the queue's error eventfd"  # its own reason, not tx's
        for dev in others:
            for op in (dev.faults, dev.activity):
                with pytest.raises(NotSupported):
                    op()
            assert device_fault(dev, 0) == "it signalled the queue's error eventfd"
    finally:
        net.close()
        others[1].close()
        b.close()
