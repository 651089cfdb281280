"""Which shadow-virtqueue implementation runs: the C hot loop or the Python reference (PEP 399).

`make_shadow_virtqueue(..., impl="auto")` returns the C relay (vdpa_svq._relay) when it was
built, else the Python ShadowVirtqueue; `impl="c"` insists on C, `impl="py"` on the reference.
Both present the same interface: on_guest_kick(), on_device_call(), forward_avail(),
forward_used(), stats, error, broken. `describe()` says which one runs and why (vdpa_svq.native
makes that choice, for this and the other C twins).

The C relay is built from a Python ShadowVirtqueue whose rings nothing has used yet (from the
rings' export_state() records, their memory regions and the IOVA map's table(), in the forms
vdpa_svq.cinputs builds, and the dirty bitmap), and from then on owns the datapath state: the
Python rings' indexes go stale. So its `guest` and `shadow` are read-only views: their
configuration (num, addrs, layout, name, ...) comes from the Python ring, their indexes
(last_used_idx, avail_idx_shadow, state(), ...) from the C relay, and anything else raises
AttributeError rather than answer with a stale value.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from vdpa_svq.cinputs import device_ring_spec, iova_table, memory_regions, shadow_ring_spec
from vdpa_svq.dirty import DirtyBitmap
from vdpa_svq.errors import RingError
from vdpa_svq.loop import EventfdNotifier
from vdpa_svq.memory.iova import IovaMap
from vdpa_svq.native import AVAILABLE_IMPLS as AVAILABLE_IMPLS  # the choice is native.py's; re-exported
from vdpa_svq.native import C_IMPORT_ERROR, DEFAULT_IMPL
from vdpa_svq.native import describe as describe
from vdpa_svq.native import relay_extension as _relay
from vdpa_svq.relay import RelayStats, ShadowVirtqueue
from vdpa_svq.ring import DeviceRing, DriverRing, Layout, RingState


def _notifier(fn: Callable[[], None]) -> int | Callable[[], None]:
    """What the C relay is given: an eventfd number to write itself, or the callable."""
    return fn.fd if isinstance(fn, EventfdNotifier) else fn


class _RingView:
    """A relay-owned ring as its users may look at it: configuration from the Python ring, indexes live
    from the C relay."""

    _CONFIG = frozenset({"num", "addrs", "layout", "name", "event_idx", "indirect_area", "mem", "close"})

    def __init__(self, ring: DeviceRing | DriverRing, c: Any, side: str) -> None:
        self._ring, self._c, self._side = ring, c, side

    def __getattr__(self, attr: str) -> Any:
        if attr in self._CONFIG:
            return getattr(self._ring, attr)
        state = self._c.ring_state()[self._side]
        if attr in state:
            return state[attr] if attr != "broken" else bool(state[attr])
        raise AttributeError(f"{self._ring.name}: {attr!r} is datapath state the C relay does not expose")

    @property
    def in_flight(self) -> int:
        return self._c.ring_state()[self._side]["in_flight"]

    def state(self) -> RingState:
        """Where the device side stands (guest ring only), as the Python rings' state() says it."""
        if self._side != "guest":
            raise AttributeError("state() is the device side's (the guest ring's)")
        st = self._c.ring_state()["guest"]
        if self._ring.layout is Layout.PACKED:
            return RingState(st["next_avail_idx"], st["next_used_idx"], st["avail_wrap_counter"],
                             st["used_wrap_counter"])
        return RingState(st["last_avail_idx"], st["used_idx"])


class CShadowVirtqueue:
    """ShadowVirtqueue's interface over vdpa_svq._relay.CShadowVirtqueue.

    The C code marks the dirty log with atomic ORs; DirtyBitmap.harvest() exchanges each word with
    zero (vdpa_svq._relay.harvest), so no mark is lost between a snapshot and its clear and no lock
    is needed here. Notifiers that are EventfdNotifiers are written by the C code directly.
    """

    impl = "c"

    def __init__(self, svq: ShadowVirtqueue) -> None:
        if _relay is None:
            raise ImportError(f"the C relay is not available: {C_IMPORT_ERROR}")
        if svq.held or svq.error is not None:
            raise ValueError(f"{svq.name}: the C relay starts from a fresh ShadowVirtqueue")
        self.name = svq.name
        self.iova: IovaMap = svq.iova
        self.dirty: DirtyBitmap | None = svq.dirty
        self.indirect = svq.indirect
        self.device_kick: Callable[[], None] = svq.device_kick
        self.guest_call: Callable[[], None] = svq.guest_call
        self._c = _relay.CShadowVirtqueue(
            name=svq.name,
            indirect=bool(svq.indirect),
            device_kick=_notifier(svq.device_kick),
            guest_call=_notifier(svq.guest_call),
            guest=device_ring_spec(svq.guest, memory_regions(svq.guest.mem)),
            shadow=shadow_ring_spec(svq.shadow),
            iova=iova_table(svq.iova),  # a snapshot: build a new relay if the IOVA map changes
            dirty_bits=None if svq.dirty is None else svq.dirty.bits,
            dirty_pages=0 if svq.dirty is None else svq.dirty.pages,
        )
        self.guest = _RingView(svq.guest, self._c, "guest")
        self.shadow = _RingView(svq.shadow, self._c, "shadow")

    @property
    def c_relay(self) -> Any:
        """The vdpa_svq._relay object, for the loop's C pump to dispatch without Python."""
        return self._c

    @property
    def stats(self) -> RelayStats:
        return RelayStats(*self._c.stats)

    @property
    def error(self) -> RingError | None:
        return self._c.error

    @error.setter
    def error(self, value: RingError | None) -> None:
        self._c.error = value

    @property
    def broken(self) -> bool:
        return self._c.broken

    @property
    def held(self) -> bool:
        """A guest chain is waiting for room in the shadow ring."""
        return self._c.held

    def forward_avail(self) -> int:
        return self._c.forward_avail()

    def forward_used(self) -> int:
        return self._c.forward_used()

    def on_guest_kick(self) -> None:
        self._c.on_guest_kick()

    def on_device_call(self) -> None:
        self._c.on_device_call()

    def ring_state(self) -> dict[str, dict[str, int]]:
        """{"guest": {...}, "shadow": {...}}: the indexes the C relay owns, under the rings' names."""
        return self._c.ring_state()

    def close(self) -> None:
        """Release the relay's hold on guest/shadow memory and the dirty log (before closing them)."""
        self._c.close()


Relay = ShadowVirtqueue | CShadowVirtqueue


def make_shadow_virtqueue(
    guest: DeviceRing,
    shadow: DriverRing,
    iova: IovaMap,
    dirty: DirtyBitmap | None,
    *,
    device_kick: Callable[[], None],
    guest_call: Callable[[], None],
    indirect: bool = False,
    name: str = "svq",
    impl: str = "auto",
) -> Relay:
    """A shadow virtqueue over fresh rings: "c", "py", or "auto" (C when it was built)."""
    if impl == "auto":
        impl = DEFAULT_IMPL
    if impl not in ("c", "py"):
        raise ValueError(f"impl must be 'auto', 'c' or 'py', not {impl!r}")
    svq = ShadowVirtqueue(guest, shadow, iova, dirty, device_kick=device_kick, guest_call=guest_call,
                          indirect=indirect, name=name)
    return svq if impl == "py" else CShadowVirtqueue(svq)
