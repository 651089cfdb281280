"""kernel_iface.uapi against the machine's own kernel headers.

A C program, generated from the names in kernel_iface.uapi and compiled with gcc at test time, prints
every constant and every struct size / member offset / member size as the headers define them. Names the
headers lack must be exactly the ones newer than the headers (NEWER_THAN_6_1 below): a name missing for
any other reason fails, and so does a listed name that the headers do have.
"""

from __future__ import annotations

import ctypes
import shutil
import subprocess

import pytest
from hypothesis import given
from hypothesis import strategies as st

from kernel_iface import _ioc, uapi

HEADERS = (
    "linux/version.h",
    "linux/vhost.h",
    "linux/vhost_types.h",
    "linux/virtio_config.h",
    "linux/virtio_ring.h",
    "linux/virtio_ids.h",
    "linux/virtio_net.h",
    "linux/virtio_blk.h",
)
PREFIXES = ("VHOST_", "VIRTIO_", "VRING_")

# Names in kernel_iface.uapi that appeared after Linux 6.1 (the host's linux-libc-dev), with the kernel
# release that first shipped them. Against headers older than that version the name must be missing;
# against newer ones it must be present and equal.
NEWER_THAN_6_1: dict[str, tuple[int, int]] = {
    "VIRTIO_NET_F_GUEST_USO4": (6, 2),
    "VIRTIO_NET_F_GUEST_USO6": (6, 2),
    "VIRTIO_NET_F_HOST_USO": (6, 2),
    "VIRTIO_BLK_F_LIFETIME": (6, 2),
    "VHOST_VDPA_RESUME": (6, 3),
    "VHOST_BACKEND_F_RESUME": (6, 3),
    "VIRTIO_BLK_F_ZONED": (6, 3),
    "VIRTIO_F_NOTIFICATION_DATA": (6, 4),
    "VHOST_NEW_WORKER": (6, 5),
    "VHOST_FREE_WORKER": (6, 5),
    "VHOST_ATTACH_VRING_WORKER": (6, 5),
    "VHOST_GET_VRING_WORKER": (6, 5),
    "VHOST_BACKEND_F_ENABLE_AFTER_DRIVER_OK": (6, 6),
    "VHOST_BACKEND_F_DESC_ASID": (6, 7),
    "VHOST_BACKEND_F_IOTLB_PERSIST": (6, 7),
    "VHOST_VDPA_GET_VRING_DESC_GROUP": (6, 7),
    "VIRTIO_F_NOTIF_CONFIG_DATA": (6, 7),
    "VIRTIO_F_ADMIN_VQ": (6, 8),
    "VHOST_VDPA_GET_VRING_SIZE": (6, 9),
    "VHOST_GET_FEATURES_ARRAY": (6, 17),
    "VHOST_SET_FEATURES_ARRAY": (6, 17),
    "VHOST_SET_FORK_FROM_OWNER": (6, 17),
    "VHOST_GET_FORK_FROM_OWNER": (6, 17),
    "VHOST_FORK_OWNER_KTHREAD": (6, 17),
    "VHOST_FORK_OWNER_TASK": (6, 17),
}

# Structs that only exist with newer headers, and the macro whose presence says they do.
STRUCT_GUARDS = {
    "vhost_worker_state": "VHOST_NEW_WORKER",
    "vhost_vring_worker": "VHOST_ATTACH_VRING_WORKER",
    "vhost_features_array": "VHOST_GET_FEATURES_ARRAY",
}

# Request numbers the 6.1 headers cannot confirm, as upstream's vhost.h defines them (decoded by hand
# from _IO/_IOR/_IOW/_IOWR, type 0xAF): an independent check of the encoding for the newer names.
UPSTREAM_REQUESTS = {
    "VHOST_NEW_WORKER": 0x8004AF08,
    "VHOST_FREE_WORKER": 0x4004AF09,
    "VHOST_ATTACH_VRING_WORKER": 0x4008AF15,
    "VHOST_GET_VRING_WORKER": 0xC008AF16,
    "VHOST_VDPA_RESUME": 0xAF7E,
    "VHOST_VDPA_GET_VRING_DESC_GROUP": 0xC008AF7F,
    "VHOST_VDPA_GET_VRING_SIZE": 0xC008AF82,
    "VHOST_GET_FEATURES_ARRAY": 0x8008AF83,
    "VHOST_SET_FEATURES_ARRAY": 0x4008AF83,
    "VHOST_SET_FORK_FROM_OWNER": 0x4001AF84,
    "VHOST_GET_FORK_FROM_OWNER": 0x8001AF85,
}


def uapi_constants() -> dict[str, int]:
    return {
        name: value
        for name, value in vars(uapi).items()
        if name.startswith(PREFIXES) and isinstance(value, int)
    }


def uapi_structs() -> dict[str, type[ctypes.Structure]]:
    return {
        name: obj
        for name, obj in vars(uapi).items()
        if isinstance(obj, type) and issubclass(obj, ctypes.Structure) and name.startswith("vhost_")
    }


def struct_members(cls: type[ctypes.Structure]) -> list[tuple[str, type]]:
    """C-visible members: anonymous unions are flattened into their members, as C sees them."""
    members = []
    anonymous = set(getattr(cls, "_anonymous_", ()))
    for name, ctype in cls._fields_:
        if name in anonymous:
            members.extend(ctype._fields_)
        else:
            members.append((name, ctype))
    return members


def is_flexible_array(ctype: type) -> bool:
    return issubclass(ctype, ctypes.Array) and ctype._length_ == 0


def c_program() -> str:
    lines = [f"#include <{h}>" for h in HEADERS]
    lines += ["#include <stddef.h>", "#include <stdio.h>", "", "int main(void)", "{"]
    lines.append('\tprintf("version %d\\n", LINUX_VERSION_CODE);')
    for name in sorted(uapi_constants()):
        lines += [
            f"#ifdef {name}",
            f'\tprintf("const {name} %lld\\n", (long long)({name}));',
            "#else",
            f'\tprintf("missing {name}\\n");',
            "#endif",
        ]
    for name, cls in sorted(uapi_structs().items()):
        guard = STRUCT_GUARDS.get(name)
        if guard:
            lines.append(f"#ifdef {guard}")
        lines.append(f'\tprintf("sizeof {name} %zu\\n", sizeof(struct {name}));')
        for member, ctype in struct_members(cls):
            lines.append(
                f'\tprintf("offsetof {name}.{member} %zu\\n", offsetof(struct {name}, {member}));'
            )
            if not is_flexible_array(ctype):  # sizeof a flexible array member does not compile
                lines.append(
                    f'\tprintf("membersize {name}.{member} %zu\\n", sizeof(((struct {name} *)0)->{member}));'
                )
        if guard:
            lines.append("#endif")
    lines += ["\treturn 0;", "}", ""]
    return "\n".join(lines)


class HeaderFacts:
    def __init__(self, output: str) -> None:
        self.version = (0, 0)
        self.constants: dict[str, int] = {}
        self.missing: set[str] = set()
        self.layout: dict[str, int] = {}
        for line in output.splitlines():
            kind, key, *rest = line.split()
            if kind == "version":
                code = int(key)
                self.version = (code >> 16, (code >> 8) & 0xFF)
            elif kind == "const":
                self.constants[key] = int(rest[0])
            elif kind == "missing":
                self.missing.add(key)
            else:
                self.layout[f"{kind} {key}"] = int(rest[0])


@pytest.fixture(scope="module")
def headers(tmp_path_factory: pytest.TempPathFactory) -> HeaderFacts:
    gcc = shutil.which("gcc")
    if gcc is None:
        pytest.fail("gcc not found: it is needed to read the kernel headers (make deps installs it)")
    work = tmp_path_factory.mktemp("uapi")
    src, exe = work / "uapi_dump.c", work / "uapi_dump"
    src.write_text(c_program())
    build = subprocess.run([gcc, "-std=gnu11", "-Wall", "-o", str(exe), str(src)], capture_output=True, text=True)
    assert build.returncode == 0, f"compiling {src} against the kernel headers failed:\n{build.stderr}"
    run = subprocess.run([str(exe)], capture_output=True, text=True, check=True)
    return HeaderFacts(run.stdout)


def test_every_constant_present_in_the_headers_has_the_headers_value(headers: HeaderFacts) -> None:
    ours = uapi_constants()
    wrong = {
        name: f"ours {ours[name]:#x}, header {value:#x}"
        for name, value in headers.constants.items()
        if ours[name] != value
    }
    assert not wrong, wrong
    assert len(headers.constants) + len(headers.missing) == len(ours)


def test_names_missing_from_the_headers_are_exactly_the_newer_ones(headers: HeaderFacts) -> None:
    expected_missing = {name for name, since in NEWER_THAN_6_1.items() if since > headers.version}
    unexpected = headers.missing - expected_missing
    assert not unexpected, (
        f"missing from the {headers.version} headers but not listed in NEWER_THAN_6_1 (typo, or a name "
        f"that is not the kernel's?): {sorted(unexpected)}"
    )
    present = expected_missing - headers.missing
    assert not present, f"listed as newer than {headers.version} but the headers have them: {sorted(present)}"


def test_newer_than_list_names_only_real_uapi_names() -> None:
    assert set(NEWER_THAN_6_1) <= set(uapi_constants())
    assert set(UPSTREAM_REQUESTS) <= set(uapi_constants())


@pytest.mark.parametrize("name", sorted(UPSTREAM_REQUESTS))
def test_request_numbers_the_host_headers_cannot_confirm_match_upstream(name: str) -> None:
    assert getattr(uapi, name) == UPSTREAM_REQUESTS[name]


def test_struct_sizes_offsets_and_member_sizes_match_the_headers(headers: HeaderFacts) -> None:
    ours: dict[str, int] = {}
    for name, cls in uapi_structs().items():
        guard = STRUCT_GUARDS.get(name)
        if guard and guard in headers.missing:
            continue  # the struct is as new as its guard macro, which the previous test vouches for
        ours[f"sizeof {name}"] = ctypes.sizeof(cls)
        for member, ctype in struct_members(cls):
            ours[f"offsetof {name}.{member}"] = getattr(cls, member).offset
            if not is_flexible_array(ctype):
                ours[f"membersize {name}.{member}"] = ctypes.sizeof(ctype)
    assert ours == headers.layout


def test_iotlb_message_layout_is_the_72_bytes_the_kernel_reads() -> None:
    """vhost_chr_write_iter reads u32 type, u32 asid, then struct vhost_iotlb_msg at offset 8."""
    assert ctypes.sizeof(uapi.vhost_msg_v2) == 72
    assert uapi.vhost_msg_v2.iotlb.offset == 8
    assert (uapi.vhost_iotlb_msg.perm.offset, uapi.vhost_iotlb_msg.type.offset) == (24, 25)


# -- _ioc encoding ---------------------------------------------------------------------------------


@given(
    direction=st.integers(0, 3),
    type_=st.integers(0, 0xFF),
    nr=st.integers(0, 0xFF),
    size=st.integers(0, (1 << 14) - 1),
)
def test_ioc_fields_round_trip(direction: int, type_: int, nr: int, size: int) -> None:
    request = _ioc._IOC(direction, type_, nr, size)
    assert request == direction << 30 | size << 16 | type_ << 8 | nr
    assert tuple(_ioc.ioc_decode(request)) == (direction, type_, nr, size)


@pytest.mark.parametrize(
    "args", [(4, 0xAF, 0, 8), (1, 0x100, 0, 8), (1, 0xAF, 0x100, 8), (1, 0xAF, 0, 1 << 14), (1, 0xAF, -1, 8)]
)
def test_ioc_refuses_fields_that_do_not_fit(args: tuple[int, int, int, int]) -> None:
    with pytest.raises(ValueError):
        _ioc._IOC(*args)


def test_ioc_takes_the_size_from_a_ctypes_type() -> None:
    assert _ioc._IOWR(0xAF, 0x12, uapi.vhost_vring_state) == _ioc._IOWR(0xAF, 0x12, 8)
    assert _ioc._IO(0xAF, 0x7D) == 0xAF7D


# -- decoding --------------------------------------------------------------------------------------


def test_decode_features_names_vdpa_sim_net_bits() -> None:
    names = uapi.decode_features(0x308830028, device_id=uapi.VIRTIO_ID_NET)
    assert {"VIRTIO_F_VERSION_1", "VIRTIO_F_ACCESS_PLATFORM", "VIRTIO_NET_F_CTRL_VQ", "VIRTIO_NET_F_MAC"} <= set(
        names
    )
    assert "VIRTIO_F_RING_PACKED" not in names


def test_decode_features_without_device_id_leaves_device_bits_unnamed() -> None:
    assert uapi.decode_features(1 << 5 | 1 << 34) == ["bit 5", "VIRTIO_F_RING_PACKED"]
    assert uapi.decode_features(1 << 5, device_id=uapi.VIRTIO_ID_BLOCK) == ["VIRTIO_BLK_F_RO"]


def test_decode_features_rejects_values_wider_than_64_bits() -> None:
    with pytest.raises(ValueError):
        uapi.decode_features(1 << 64)


def test_decode_backend_features_of_vp_vdpa() -> None:
    # 0x10e from the bench: MSG_V2, BATCH, ASID, IOTLB_PERSIST; no SUSPEND/RESUME.
    assert uapi.decode_backend_features(0x10E) == [
        "VHOST_BACKEND_F_IOTLB_MSG_V2",
        "VHOST_BACKEND_F_IOTLB_BATCH",
        "VHOST_BACKEND_F_IOTLB_ASID",
        "VHOST_BACKEND_F_IOTLB_PERSIST",
    ]


def test_decode_status() -> None:
    ok = uapi.VIRTIO_CONFIG_S_ACKNOWLEDGE | uapi.VIRTIO_CONFIG_S_DRIVER | uapi.VIRTIO_CONFIG_S_FEATURES_OK
    assert uapi.decode_status(ok | uapi.VIRTIO_CONFIG_S_DRIVER_OK) == [
        "VIRTIO_CONFIG_S_ACKNOWLEDGE",
        "VIRTIO_CONFIG_S_DRIVER",
        "VIRTIO_CONFIG_S_DRIVER_OK",
        "VIRTIO_CONFIG_S_FEATURES_OK",
    ]
    assert uapi.decode_status(0x10) == ["bit 4"]
