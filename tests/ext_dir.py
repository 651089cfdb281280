"""Load vdpa-svq's C extensions from another build (a sanitizer build), for `make asan` and the fuzzers.

VDPA_SVQ_EXT_DIR names a directory holding `_relay*.so` and `_busguard*.so` built from the same
sources with other flags. It goes first on the vdpa_svq package's search path, so `import
vdpa_svq._relay` finds that build; use() then checks that it did, since a run that silently
tested the normal build would prove nothing.
"""

from __future__ import annotations

import importlib
import os

ENV = "VDPA_SVQ_EXT_DIR"
EXTENSIONS = ("vdpa_svq._relay", "vdpa_svq._busguard")


def use() -> str | None:
    """Put the other build first, import it, and return its directory (None: no override asked)."""
    where = os.environ.get(ENV)
    if not where:
        return None
    where = os.path.abspath(where)
    import vdpa_svq

    vdpa_svq.__path__.insert(0, where)
    for name in EXTENSIONS:
        mod = importlib.import_module(name)
        if os.path.dirname(os.path.abspath(mod.__file__ or "")) != where:
            raise SystemExit(f"{ENV}={where}: {name} was loaded from {mod.__file__}, not from there")
    return where
