"""vdpa_svq.native: the one place that picks C or Python for the relay, its loop and soft:net's datapath.

Built, every part runs in C and its users hold native's objects; with the extensions gone, every part
runs in Python and says why; and no other module imports an extension, so nothing can choose twice.
"""

from __future__ import annotations

import re
import subprocess
import sys
import textwrap
from pathlib import Path

from vdpa_svq import dirty, loop, native, relay_impl
from vdpa_svq.softdev import net

ROOT = Path(__file__).resolve().parents[2]
# An import of a C extension with a Python twin: only native.py may have one.
EXTENSION_IMPORT = re.compile(r"^\s*(from\s+vdpa_svq(\.softdev)?\s+import\s+[^#\n]*\b_(relay|netloop)\b"
                              r"|(from|import)\s+vdpa_svq(\.softdev)?\._(relay|netloop)\b)", re.MULTILINE)


def run_python(code: str) -> None:
    """Run `code` in a fresh interpreter (a fresh import order), from the repository's root."""
    subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=ROOT, check=True, timeout=60)


def test_every_part_runs_in_c_and_its_users_hold_natives_objects():
    assert {part: native.impl(part) for part in native.PARTS} == {"relay": "c", "loop": "c", "softnet": "c"}
    assert native.describe("softnet") == "c (vdpa_svq.softdev._netloop)"
    assert relay_impl.describe() == native.describe("relay") == "c (vdpa_svq._relay)"
    assert relay_impl._relay is native.relay_extension and relay_impl.DEFAULT_IMPL == "c"
    assert loop.Pump is native.Pump is not None
    assert net.NetLoop is native.NetLoop is not None
    assert dirty._atomic_harvest is native.harvest is not None
    assert native.IMPORT_ERRORS == {}


def test_only_native_imports_an_extension():
    importers = [str(p.relative_to(ROOT)) for p in (ROOT / "vdpa_svq").rglob("*.py")
                 if p.name != "native.py" and EXTENSION_IMPORT.search(p.read_text())]
    assert importers == []
    assert EXTENSION_IMPORT.search("from vdpa_svq._relay import Pump")  # the pattern does match one
    assert EXTENSION_IMPORT.search("    from vdpa_svq.softdev import _netloop")
    assert not EXTENSION_IMPORT.search("from vdpa_svq.native import relay_extension as _relay")


def test_native_imported_first_still_finds_netloop():
    # NetLoop's extension is in softdev, whose __init__ imports net.py, which imports NetLoop from
    # native: loaded with native, it would be a cycle and NetLoop would be None.
    run_python("""
        from vdpa_svq import native
        assert native.impl("softnet") == "c", native.IMPORT_ERRORS
        from vdpa_svq.softdev.net import NetLoop, SoftNetDevice
        assert NetLoop is native.NetLoop is not None
        assert SoftNetDevice().datapath == "c"
    """)


def test_without_the_extensions_every_part_runs_in_python_and_says_why():
    run_python("""
        import sys
        sys.modules["vdpa_svq._relay"] = sys.modules["vdpa_svq.softdev._netloop"] = None  # not built
        from vdpa_svq import dirty, loop, native, relay_impl
        from vdpa_svq.softdev.net import NetLoop, SoftNetDevice
        assert {part: native.impl(part) for part in native.PARTS} == {"relay": "py", "loop": "py", "softnet": "py"}
        assert native.describe().startswith("py (the C relay did not import: import of vdpa_svq._relay")
        assert native.describe("softnet").startswith("py (the C loopback did not import: ")
        assert relay_impl.AVAILABLE_IMPLS == ("py",) and relay_impl.DEFAULT_IMPL == "py"
        assert relay_impl.C_IMPORT_ERROR == native.IMPORT_ERRORS["vdpa_svq._relay"]
        assert loop.Pump is None and NetLoop is None and dirty._atomic_harvest is None
        assert SoftNetDevice().datapath == "py"
        assert loop.RelayLoop()._pump is None
    """)
