"""Opening the device a command names and taking ownership of it (vdpa_svq.devices does the
checks that give pointing at the wrong thing the right message)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from vdpa_svq.device import Device
from vdpa_svq.devices import open_device


@contextmanager
def opened(spec: str, *, owner: bool = True) -> Iterator[Device]:
    """The device `spec` names, open (and owned when `owner`), closed on exit. Closing a vhost-vdpa
    fd resets the device."""
    dev = open_device(spec)
    try:
        if owner:
            dev.set_owner()
        yield dev
    finally:
        dev.close()
