"""C or Python: the one place that imports vdpa-svq's C extensions and says which twin runs (PEP 399).

Three parts have a C implementation beside their Python reference:

    part      C (when built)                          else Python                   used by
    relay     vdpa_svq._relay.CShadowVirtqueue        relay.py's ShadowVirtqueue    relay_impl.py
    loop      vdpa_svq._relay.Pump (_pump.c)          pump.py's Pump                loop.py
    softnet   vdpa_svq.softdev._netloop.NetLoop       softdev/net.py's datapath     softdev/net.py

(and the dirty log's lock-free harvest, vdpa_svq._relay.harvest, in dirty.py). An extension that
did not build (no compiler at install time) is None here, with why in IMPORT_ERRORS, and its part
runs in Python. tests/differential and tests/softdev fail loudly when one did not build, so CI
cannot pass on the fallback by accident.

NetLoop is imported on first use (PEP 562 __getattr__), not with this module: its extension sits in
the softdev package, whose __init__ imports net.py, which imports NetLoop from here.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from types import ModuleType
from typing import Any

RELAY_EXTENSION = "vdpa_svq._relay"
NETLOOP_EXTENSION = "vdpa_svq.softdev._netloop"
PARTS = {"relay": RELAY_EXTENSION, "loop": RELAY_EXTENSION, "softnet": NETLOOP_EXTENSION}
IMPORT_ERRORS: dict[str, str] = {}  # extension -> why it did not import
_loaded: dict[str, ModuleType | None] = {}


def _load(name: str) -> ModuleType | None:
    """The extension, imported once; None (and why, in IMPORT_ERRORS) when it is not built."""
    if name not in _loaded:
        try:
            _loaded[name] = importlib.import_module(name)
        except ImportError as e:
            _loaded[name] = None
            IMPORT_ERRORS[name] = str(e)
    return _loaded[name]


relay_extension: ModuleType | None = _load(RELAY_EXTENSION)
C_IMPORT_ERROR: str | None = IMPORT_ERRORS.get(RELAY_EXTENSION)  # why the C relay did not import
Pump: Any = relay_extension.Pump if relay_extension is not None else None
harvest: Callable[[Any], bytes] | None = relay_extension.harvest if relay_extension is not None else None

# The relay's implementations, best first ("auto" means the first).
AVAILABLE_IMPLS: tuple[str, ...] = ("c", "py") if relay_extension is not None else ("py",)
DEFAULT_IMPL = AVAILABLE_IMPLS[0]


def __getattr__(name: str) -> Any:
    if name == "NetLoop":
        netloop = _load(NETLOOP_EXTENSION)
        return netloop.NetLoop if netloop is not None else None
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def impl(part: str) -> str:
    """Which implementation of `part` ("relay", "loop", "softnet") runs by default: "c" or "py"."""
    return "c" if _load(PARTS[part]) is not None else "py"


def describe(part: str = "relay") -> str:
    """One line for logs and `--version`-like output: which implementation of `part` runs by
    default, and why."""
    extension = PARTS[part]
    if _load(extension) is not None:
        return f"c ({extension})"
    return f"py (the C {'loopback' if part == 'softnet' else 'relay'} did not import: {IMPORT_ERRORS[extension]})"
