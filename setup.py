"""Build of the C extensions; the rest is in pyproject.toml.

    vdpa_svq._relay             the relay (_relay.c) and its loop, the Pump (_pump.c)
    vdpa_svq.softdev._netloop   the soft net device's loopback (softdev/_netloop.c)
    vdpa_svq._busguard          SIGBUS-safe access to memory a peer can shrink (memory/guest.py)
    vdpa_svq.guest._burst       bench.latency's frontend loop: a net driver's datapath (guest/burst.py)

The first two share the device side of a ring, _ring.h: a header of static definitions that each
includes once (see there why). The extensions are optional (PEP 399): without a compiler the install
still succeeds and the Python twins run (vdpa_svq.native picks). tests/differential and tests/softdev
fail loudly if they did not build, so CI cannot pass on the fallback by accident.
"""

from setuptools import Extension, setup

CFLAGS = ["-O2", "-std=gnu11", "-Wall", "-Wextra", "-Wno-unused-parameter", "-Wno-missing-field-initializers"]
RING = ["vdpa_svq/_ring.h", "vdpa_svq/_ring_access.h"]



def extension(name: str, sources: list[str], depends: list[str] = (), extra_flags: list[str] = ()) -> Extension:
    """An optional extension (PEP 399: without a compiler the install still succeeds)."""
    return Extension(name, sources, depends=list(depends), extra_compile_args=CFLAGS + list(extra_flags),
                     optional=True)


setup(
    ext_modules=[
        extension("vdpa_svq._relay", ["vdpa_svq/_relay.c", "vdpa_svq/_pump.c"], RING + ["vdpa_svq/_relay.h"],
                  ["-Wno-cast-function-type"]),
        extension("vdpa_svq.softdev._netloop", ["vdpa_svq/softdev/_netloop.c"], RING, ["-Wno-cast-function-type"]),
        extension("vdpa_svq._busguard", ["vdpa_svq/_busguard.c"]),
        extension("vdpa_svq.guest._burst", ["vdpa_svq/guest/_burst.c"], ["vdpa_svq/_ring_access.h"],
                  ["-Wno-cast-function-type"]),
    ]
)
