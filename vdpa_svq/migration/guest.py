"""The migration test's guest: the kernel bench's kernel and a busybox initramfs with netcheck.

The kernel and modules are the ones `tools/kbench setup` caches (Debian's bookworm-backports 6.12);
virtio and virtio_pci are built into it, virtio_net (and the failover modules it needs) go into the
initramfs. Unlike the bench, the guest shares nothing with the host: a 9p export would block
migration, so everything it runs is in its initramfs. netcheck is compiled here with `gcc -static`.
Images are cached beside the bench's, keyed by everything they are made of.
"""

from __future__ import annotations

import hashlib
import importlib.machinery
import importlib.util
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from functools import cache
from pathlib import Path

from vdpa_svq.errors import VdpaSvqError

REPO = Path(__file__).resolve().parents[2]
GUEST_SRC = REPO / "tools" / "migration_guest"
KBENCH = REPO / "tools" / "kbench"
GUEST_MODULES = ("failover", "net_failover", "virtio_net")  # in load order
BUSYBOX = Path("/bin/busybox")


class GuestImageError(VdpaSvqError):
    """The guest image cannot be built; the message says what is missing and what to run."""


@dataclass(frozen=True)
class GuestImage:
    kernel: Path
    initrd: Path
    kver: str


@cache
def kbench():
    """tools/kbench as a module (it is a script without .py): its cache layout and kernel pin."""
    if not KBENCH.is_file():
        raise GuestImageError(f"{KBENCH} is missing: the guest's kernel comes from the kernel bench")
    loader = importlib.machinery.SourceFileLoader("vdpa_svq_kbench", str(KBENCH))
    spec = importlib.util.spec_from_loader(loader.name, loader)
    assert spec is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules[loader.name] = mod  # its dataclasses look their module up while it runs
    loader.exec_module(mod)
    return mod


def _digest(*parts: bytes) -> str:
    h = hashlib.sha256()
    for p in parts:
        h.update(hashlib.sha256(p).digest())
    return h.hexdigest()[:16]


def _run(argv: list[str], what: str, **kw) -> bytes:
    try:
        proc = subprocess.run(argv, capture_output=True, check=False, **kw)
    except FileNotFoundError:
        raise GuestImageError(f"{what}: {argv[0]} is not installed (make deps installs tools/debian-packages.txt)") \
            from None
    if proc.returncode:
        raise GuestImageError(f"{what}: `{' '.join(argv)}` exited {proc.returncode}: "
                              f"{proc.stderr.decode(errors='replace').strip()[-2000:]}")
    return proc.stdout


def build_netcheck(out: Path) -> None:
    """netcheck, static: the guest has no C library."""
    _run(["gcc", "-O2", "-Wall", "-Wextra", "-Werror", "-static", "-pthread", "-o", str(out),
          str(GUEST_SRC / "netcheck.c")], "building netcheck (gcc -static; libc6-dev has libc.a)")


def guest_image() -> GuestImage:
    """The kernel and the initramfs, built once per input (cached in the bench's cache)."""
    kb = kbench()
    lay = kb.Layout(kb.cache_dir())
    pin = lay.load_pin()
    if pin is None or not lay.vmlinuz(pin).is_file():
        raise GuestImageError(f"the kernel bench is not set up in {lay.root}: run `.venv/bin/python tools/kbench "
                              "setup` (make test does) — the guest boots the bench's kernel")
    mods = []
    for name in GUEST_MODULES:
        ko = next(lay.moddir(pin).glob(f"kernel/**/{name}.ko*"), None)
        if ko is None:
            raise GuestImageError(f"{name}: not a module of {pin.kver} (the guest needs it for virtio-net)")
        mods.append((name, ko))
    if not BUSYBOX.is_file():
        raise GuestImageError(f"{BUSYBOX} is missing: install busybox-static (tools/debian-packages.txt)")
    key = _digest(pin.kver.encode(), BUSYBOX.read_bytes(), (GUEST_SRC / "init").read_bytes(),
                  (GUEST_SRC / "netcheck.c").read_bytes(), *(str(ko).encode() for _, ko in mods))
    out_dir = lay.root / "migration" / pin.kver
    initrd = out_dir / f"initrd-{key}.gz"
    if not initrd.is_file():
        out_dir.mkdir(parents=True, exist_ok=True)
        _build_initrd(initrd, mods)
    return GuestImage(lay.vmlinuz(pin), initrd, pin.kver)


def _build_initrd(initrd: Path, mods: list[tuple[str, Path]]) -> None:
    work = Path(tempfile.mkdtemp(prefix="initramfs.", dir=initrd.parent))
    try:
        for sub in ("bin", "mods", "proc", "sys", "dev"):
            (work / sub).mkdir()
        shutil.copy2(BUSYBOX, work / "bin" / "busybox")
        build_netcheck(work / "bin" / "netcheck")
        for name, ko in mods:
            data = ko.read_bytes()
            if ko.suffix == ".xz":  # busybox insmod cannot read compressed modules
                data = _run(["xz", "-dc", str(ko)], f"decompressing {ko.name}")
            (work / "mods" / f"{name}.ko").write_bytes(data)
        shutil.copy2(GUEST_SRC / "init", work / "init")
        (work / "init").chmod(0o755)
        files = _run(["find", "."], "listing the initramfs", cwd=work)
        cpio = _run(["cpio", "-o", "-H", "newc", "--quiet"], "cpio", cwd=work, input=files)
        tmp = initrd.with_suffix(".tmp")
        tmp.write_bytes(_run(["gzip", "-1"], "gzip", input=cpio))
        tmp.rename(initrd)
    finally:
        shutil.rmtree(work, ignore_errors=True)
