"""Load vdpa-svq's C extensions from another build (a sanitizer build), for `make asan` and the fuzzers.

VDPA_SVQ_EXT_DIR names a directory laid out as the package, holding `_relay*.so`, `_busguard*.so`,
`softdev/_netloop*.so` and `guest/_burst*.so` built from the same sources with other flags (tools/build-sanitized).
A finder put first on sys.meta_path serves exactly these modules from there (whatever imports
them first, even from inside a package's __init__); use() then imports them and checks that they
came from there, since a run that silently tested the normal build would prove nothing.
"""

from __future__ import annotations

import importlib
import importlib.machinery
import os
import sys
from types import ModuleType

ENV = "VDPA_SVQ_EXT_DIR"
EXTENSIONS = ("vdpa_svq._relay", "vdpa_svq._busguard", "vdpa_svq.softdev._netloop", "vdpa_svq.guest._burst")


def _directory(where: str, name: str) -> str:
    """Where the other build keeps extension `name`: its package path below vdpa_svq."""
    return os.path.join(where, *name.split(".")[1:-1])


class _OtherBuild:
    """A meta path finder for EXTENSIONS only, from the other build's directory."""

    def __init__(self, where: str) -> None:
        self.where = where

    def find_spec(
        self, name: str, path: object = None, target: ModuleType | None = None
    ) -> importlib.machinery.ModuleSpec | None:
        if name not in EXTENSIONS:
            return None
        loader = (importlib.machinery.ExtensionFileLoader, importlib.machinery.EXTENSION_SUFFIXES)
        return importlib.machinery.FileFinder(_directory(self.where, name), loader).find_spec(name)


def use() -> str | None:
    """Put the other build first, import it, and return its directory (None: no override asked)."""
    where = os.environ.get(ENV)
    if not where:
        return None
    where = os.path.abspath(where)
    sys.meta_path.insert(0, _OtherBuild(where))
    for name in EXTENSIONS:
        mod = importlib.import_module(name)
        if os.path.dirname(os.path.abspath(mod.__file__ or "")) != _directory(where, name):
            raise SystemExit(f"{ENV}={where}: {name} was loaded from {mod.__file__}, not from there")
    return where
