"""Build of the C relay (vdpa_svq._relay) and the SIGBUS guard (vdpa_svq._busguard); the rest
is in pyproject.toml.

The extension is optional (PEP 399): without a compiler the install still succeeds and
vdpa_svq.relay_impl falls back to the Python reference. tests/differential fails loudly if it
did not build, so CI cannot pass on the fallback by accident.
"""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "vdpa_svq._relay",
            ["vdpa_svq/_relay.c"],
            depends=["vdpa_svq/_netloop.c"],  # included by _relay.c: one module
            extra_compile_args=["-O2", "-std=gnu11", "-Wall", "-Wextra", "-Wno-unused-parameter",
                                "-Wno-missing-field-initializers", "-Wno-cast-function-type"],
            optional=True,
        ),
        Extension(
            "vdpa_svq._busguard",  # SIGBUS-safe access to memory a peer can shrink (memory/guest.py)
            ["vdpa_svq/_busguard.c"],
            extra_compile_args=["-O2", "-std=gnu11", "-Wall", "-Wextra", "-Wno-unused-parameter",
                                "-Wno-missing-field-initializers"],
            optional=True,
        ),
    ]
)
