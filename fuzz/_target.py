"""What every fuzz target shares: the sanitizer build of the C extensions (VDPA_SVQ_EXT_DIR), coverage
for the project's Python, and libFuzzer's main."""

from __future__ import annotations

import sys
from collections.abc import Callable

import atheris

from tests import ext_dir

# The instrumented C build goes in first, before any target imports vdpa_svq's modules.
ext_dir.use()



def instrumented() -> atheris.import_hook.HookManager:
    """Imports under this get Python coverage: the code under test and the test helpers that drive
    it, not the stdlib."""
    return atheris.instrument_imports(include=["vdpa_svq", "kernel_iface", "tests"])


def fuzz(test_one_input: Callable[[bytes], None]) -> None:
    """libFuzzer's main: argv are its flags and corpus directories (see fuzz/run.py)."""
    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()
