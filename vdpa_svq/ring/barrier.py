"""Memory barriers for rings shared with another thread, process or a DMA device.

The Python reference runs on x86-64 only (see the check below). x86-64 is TSO: stores are seen
in program order and loads are not reordered with older loads, so wmb() and rmb() only have to
stop reordering by the compiler, and the interpreter does not reorder memoryview stores. A store
followed by a load of another location CAN be reordered (store buffer), so mb() must execute a
locked instruction: acquiring an uncontended pthread mutex does (lock cmpxchg). The C relay uses
__atomic_thread_fence with the same names at the same points.
"""

from __future__ import annotations

import platform
import threading

if platform.machine() not in ("x86_64", "AMD64"):  # pragma: no cover - guarded on purpose
    raise ImportError("vdpa_svq.ring.barrier: the Python ring reference assumes x86-64 (TSO) ordering")

_fence = threading.Lock()


def wmb() -> None:
    """Order earlier stores before later stores (free on x86-64 TSO)."""


def rmb() -> None:
    """Order earlier loads before later loads (free on x86-64 TSO)."""


def mb() -> None:
    """Full barrier: order earlier stores before later loads (a locked instruction)."""
    _fence.acquire()
    _fence.release()
