"""kbench, guest side: runs as root in the chroot of the host's read-only / (started by kbench_guest/init).

Loads the modules, creates the bench's fixed set of vhost-vdpa devices, brings up the peer NIC, prints
which /dev/vhost-vdpa-N is which, runs the requested command with KBENCH_* in its environment, and leaves
its exit status in <rundir>/rc. Any failure before the command leaves the reason in <rundir>/failed, which
the host turns into a loud non-zero exit. Lines starting with "kbench-guest:" are always shown on the host.

Run with the project's interpreter (kbench passes its own sys.executable), so the project's netlink and
discovery code does the work; the iproute2 `vdpa` tool is only the fallback when pyroute2 is missing.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

# Device names are part of the bench's contract: tests may look them up by name.
SIM_NET, SIM_BLK, VP_NET = "vdpa-sim-net", "vdpa-sim-blk", "vp-vdpa-net"


class BenchError(Exception):
    pass


def say(msg: str) -> None:
    print(f"kbench-guest: {msg}", flush=True)


def uptime() -> str:
    return Path("/proc/uptime").read_text().split()[0]


def sh(*argv: str) -> str:
    proc = subprocess.run(argv, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise BenchError(f"`{' '.join(argv)}` exited {proc.returncode}: {(proc.stderr or proc.stdout).strip()}")
    return proc.stdout


def modprobe(req: dict, *modules: str) -> None:
    for m in modules:
        sh("modprobe", "-d", req["modules_root"], m)


def write_sysfs(path: Path, value: str) -> None:
    try:
        path.write_text(value)
    except OSError as e:
        raise BenchError(f"writing {value!r} to {path}: {e.strerror}") from None


def driver_of(dev: Path) -> str | None:
    link = dev / "driver"
    return os.path.basename(os.readlink(link)) if link.is_symlink() else None


def bind_vp_vdpa(bdf: str) -> None:
    """vp_vdpa has no id table: take the function away from virtio-pci and steer it with driver_override."""
    dev = Path("/sys/bus/pci/devices") / bdf
    if not dev.exists():
        raise BenchError(f"no PCI device {bdf} (the vp_vdpa virtio-net-pci)")
    if driver_of(dev) == "vp-vdpa":
        return
    if driver_of(dev) is not None:
        write_sysfs(dev / "driver" / "unbind", bdf)
    write_sysfs(dev / "driver_override", "vp-vdpa")
    write_sysfs(Path("/sys/bus/pci/drivers_probe"), bdf)
    if driver_of(dev) != "vp-vdpa":
        raise BenchError(f"{bdf} did not bind to vp-vdpa (bound to {driver_of(dev)})")


def wait_for(what: str, probe, timeout: float = 10.0):
    end = time.monotonic() + timeout
    while True:
        found = probe()
        if found:
            return found
        if time.monotonic() > end:
            raise BenchError(f"timed out waiting for {what}")
        time.sleep(0.05)


def bring_up_peer(req: dict) -> str:
    """The second NIC, on the same QEMU hub as vp_vdpa's, driven by the guest kernel's own virtio_net."""
    modprobe(req, "virtio_net")
    pci = Path("/sys/bus/pci/devices") / req["peer_bdf"]

    def iface():
        names = sorted(p.name for p in pci.glob("virtio*/net/*"))
        return names[0] if names else None

    name = wait_for(f"the virtio_net interface of {req['peer_bdf']}", iface)
    # No IPv6 autoconf chatter: the peer only carries what the tests send (and AF_PACKET sees only that).
    write_sysfs(Path(f"/proc/sys/net/ipv6/conf/{name}/disable_ipv6"), "1")
    sh("ip", "link", "set", "dev", name, "up")
    return name


def import_pyroute2_netlink_only() -> None:
    """Let `pyroute2.netlink...` imports skip pyroute2/__init__.py, which loads NDB, IPDB, conntrack and more.

    Under TCG that package import alone takes ~13 s; the genl socket needs a fraction of it. Only this
    throwaway setup process does this; the command under test imports pyroute2 the normal way.
    """
    import importlib.util
    import types

    spec = importlib.util.find_spec("pyroute2")
    if spec is None or "pyroute2" in sys.modules:
        return
    pkg = types.ModuleType("pyroute2")
    pkg.__path__ = list(spec.submodule_search_locations or [])
    pkg.__spec__ = spec
    sys.modules["pyroute2"] = pkg


def create_devices(req: dict) -> str:
    wanted = [
        ("vdpasim_net", SIM_NET, {"mac": req["sim_net_mac"]}),
        ("vdpasim_blk", SIM_BLK, {}),
        (f"pci/{req['vp_vdpa_bdf']}", VP_NET, {}),
    ]
    try:
        import_pyroute2_netlink_only()
        from kernel_iface.vdpa_netlink import VdpaNetlink, VdpaNetlinkError
    except ImportError as e:  # no pyroute2 in this interpreter: the iproute2 tool can still do it
        say(f"netlink code unavailable ({e}); using the iproute2 `vdpa` tool")
        for mgmt, name, cfg in wanted:
            extra = ["mac", cfg["mac"]] if "mac" in cfg else []
            sh("vdpa", "dev", "add", "mgmtdev", mgmt, "name", name, *extra)
        return "iproute2 vdpa"
    try:
        with VdpaNetlink() as nl:
            have = {m.handle for m in nl.list_mgmtdevs()}
            for mgmt, name, cfg in wanted:
                if mgmt not in have:
                    raise BenchError(f"management device {mgmt} missing (have: {', '.join(sorted(have))})")
                nl.add_device(mgmt, name, **cfg)
    except VdpaNetlinkError as e:
        raise BenchError(str(e)) from None
    return "kernel_iface.vdpa_netlink"


def describe(req: dict) -> dict[str, str]:
    from kernel_iface.discovery import by_name, discover

    def complete():
        devs = by_name(discover())
        if all(n in devs and Path(devs[n].dev_path).exists() for n in (SIM_NET, SIM_BLK, VP_NET)):
            return devs
        return None

    devs = wait_for("three /dev/vhost-vdpa-N nodes", complete)
    expect = {SIM_NET: ("vdpasim_net", 1), SIM_BLK: ("vdpasim_blk", 2), VP_NET: (f"pci/{req['vp_vdpa_bdf']}", 1)}
    for name, (mgmt, dev_id) in expect.items():
        d = devs[name]
        if (d.mgmtdev, d.device_id, d.driver) != (mgmt, dev_id, "vhost_vdpa"):
            raise BenchError(f"{name}: got mgmtdev={d.mgmtdev} id={d.device_id} driver={d.driver}, "
                             f"want {mgmt}, {dev_id}, vhost_vdpa")
        say(f"{d.dev_path:<18} {name:<13} mgmtdev {d.mgmtdev:<17} provider {d.provider:<13} "
            f"virtio id {d.device_id}  max_vqs {d.max_vqs}  max_vq_size {d.max_vq_size}")
    return {
        "KBENCH_VDPA_SIM_NET": devs[SIM_NET].dev_path,
        "KBENCH_VDPA_SIM_BLK": devs[SIM_BLK].dev_path,
        "KBENCH_VP_VDPA": devs[VP_NET].dev_path,
    }


def setup(req: dict) -> dict[str, str]:
    modprobe(req, "vhost_vdpa", "vdpa_sim_net", "vdpa_sim_blk", "vp_vdpa")
    bind_vp_vdpa(req["vp_vdpa_bdf"])  # before virtio_net loads, or it would claim this function too
    peer = bring_up_peer(req)
    how = create_devices(req)
    say(f"devices created through {how} at {uptime()} s")
    env = describe(req)
    say(f"peer interface {peer} ({req['peer_bdf']}, mac {req['peer_mac']}) is up")
    env |= {
        "KBENCH": "1",
        "KBENCH_PEER_IFACE": peer,
        "KBENCH_PEER_MAC": req["peer_mac"],
        "KBENCH_VP_VDPA_MAC": req["vp_vdpa_mac"],
        "KBENCH_VDPA_SIM_NET_MAC": req["sim_net_mac"],
        "KBENCH_KERNEL": req["kver"],
    }
    return env


def main(rundir: Path) -> int:
    req = json.loads((rundir / "request.json").read_text())
    sys.path.insert(0, req["repo"])
    say(f"setting up devices at {uptime()} s")
    t0 = time.monotonic()
    try:
        bench_env = setup(req)
    except BenchError as e:
        say(f"FAILED: {e}")
        (rundir / "failed").write_text(f"{e}\n")
        return 1
    say(f"bench ready in {time.monotonic() - t0:.1f} s")
    for k, v in sorted(bench_env.items()):
        say(f"export {k}={v}")
    if os.environ.get("KBENCH_OUT"):
        bench_env["KBENCH_OUT"] = os.environ["KBENCH_OUT"]  # kbench run --out: writable, shared with the host
    inherited = {k: v for k, v in os.environ.items() if not k.startswith("KBENCH_")}  # init's cmdline vars
    env = inherited | req["env"] | bench_env | {
        "PYTHONDONTWRITEBYTECODE": "1",  # the repo is read-only in here
        "HYPOTHESIS_STORAGE_DIRECTORY": "/tmp/hypothesis",
        "TMPDIR": "/tmp",
        "HOME": "/tmp/home",
    }
    print("KBENCH-BEGIN", flush=True)
    try:
        rc = subprocess.call(req["argv"], cwd=req["cwd"], env=env)
    except OSError as e:
        print(f"kbench-guest: cannot run {req['argv'][0]}: {e}", flush=True)
        rc = 127
    print("KBENCH-END", flush=True)
    (rundir / "rc").write_text(f"{rc}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(Path(sys.argv[1])))
