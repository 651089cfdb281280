"""Fixtures for the real-device tests: the kernel bench (tools/kbench run) says which device is which.

Outside the bench these fixtures FAIL rather than skip: a kernel test that silently skips on a host
without vdpa would look like a pass. Run them with `make kernel`.
"""

from __future__ import annotations

import os

import pytest

NOT_IN_BENCH = "not inside the kernel bench: run `make kernel`"


def bench_env(name: str) -> str:
    value = os.environ.get(name)
    if not value:
        pytest.fail(f"{NOT_IN_BENCH} ({name} is not set)", pytrace=False)
    return value


@pytest.fixture(scope="session")
def vdpa_sim_net() -> str:
    """/dev/vhost-vdpa-N of the vdpa_sim net device (loopback, mac KBENCH_VDPA_SIM_NET_MAC)."""
    return bench_env("KBENCH_VDPA_SIM_NET")


@pytest.fixture(scope="session")
def vdpa_sim_blk() -> str:
    """/dev/vhost-vdpa-N of the vdpa_sim block device."""
    return bench_env("KBENCH_VDPA_SIM_BLK")


@pytest.fixture(scope="session")
def vp_vdpa() -> str:
    """/dev/vhost-vdpa-N of vp_vdpa over QEMU's packed, event_idx virtio-net-pci behind the vIOMMU."""
    return bench_env("KBENCH_VP_VDPA")


@pytest.fixture(scope="session")
def peer_iface() -> str:
    """The guest-kernel virtio_net interface on the same QEMU hub as vp_vdpa's NIC (watch it with AF_PACKET)."""
    return bench_env("KBENCH_PEER_IFACE")


@pytest.fixture(scope="session")
def kernel_bench() -> None:
    """For tests that need the bench but none of its device nodes (netlink, discovery)."""
    bench_env("KBENCH")
