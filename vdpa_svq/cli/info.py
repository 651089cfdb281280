"""`vdpa-svq info DEV`: what one device offers, decoded."""

from __future__ import annotations

import struct
from collections.abc import Callable
from typing import Any

import click

from kernel_iface import NotSupported, VhostVdpa, uapi
from vdpa_svq import native
from vdpa_svq.cli._device import opened
from vdpa_svq.cli._output import echo_json, human_bytes, json_option, print_fields
from vdpa_svq.device import Device
from vdpa_svq.softdev import SoftNetDevice

DEVICE_TYPES = {uapi.VIRTIO_ID_NET: "net", uapi.VIRTIO_ID_BLOCK: "blk"}
SECTOR_SIZE = 512  # virtio-blk capacity is in 512-byte sectors whatever blk_size says (5.2.4)
VIRTIO_NET_S_LINK_UP = 1
VIRTIO_NET_S_ANNOUNCE = 2


def relay_impls() -> tuple[str, list[str]]:
    """(the relay implementation in use, all that are available): vdpa_svq.native's choice."""
    return native.DEFAULT_IMPL, list(native.AVAILABLE_IMPLS)


def _optional(query: Callable[..., int], *args: int) -> int | None:
    """An ioctl this kernel or device may lack (a newer one, or one a software device does not model)."""
    try:
        return query(*args)
    except NotSupported:
        return None


def _has(features: int, bit: int) -> bool:
    return bool(features >> bit & 1)


def _field(cfg: bytes, fmt: str, offset: int) -> int | None:
    """A little-endian config field, or None when the config space is too short to hold it.

    Little-endian: VERSION_1 devices' config is, and a legacy one is native-endian, the same on x86."""
    s = struct.Struct("<" + fmt)
    return s.unpack_from(cfg, offset)[0] if len(cfg) >= offset + s.size else None


def decode_net_config(cfg: bytes, features: int) -> dict[str, Any]:
    """struct virtio_net_config (VIRTIO 1.2, 5.1.4): each field only when its feature bit says it is valid."""
    out: dict[str, Any] = {
        "mac": cfg[:6].hex(":") if _has(features, uapi.VIRTIO_NET_F_MAC) and len(cfg) >= 6 else None
    }
    status = _field(cfg, "H", 6) if _has(features, uapi.VIRTIO_NET_F_STATUS) else None
    out["status"] = None if status is None else {
        "value": status,
        "link_up": bool(status & VIRTIO_NET_S_LINK_UP),
        "announce": bool(status & VIRTIO_NET_S_ANNOUNCE),
    }
    mq = _has(features, uapi.VIRTIO_NET_F_MQ) or _has(features, uapi.VIRTIO_NET_F_RSS)
    out["max_virtqueue_pairs"] = _field(cfg, "H", 8) if mq else 1
    out["mtu"] = _field(cfg, "H", 10) if _has(features, uapi.VIRTIO_NET_F_MTU) else None
    if _has(features, uapi.VIRTIO_NET_F_SPEED_DUPLEX):
        out["speed_mbps"], out["duplex"] = _field(cfg, "I", 12), _field(cfg, "B", 16)
    return out


def decode_blk_config(cfg: bytes, features: int) -> dict[str, Any]:
    """struct virtio_blk_config (VIRTIO 1.2, 5.2.4): capacity always, the rest per feature bit."""
    sectors = _field(cfg, "Q", 0)
    out: dict[str, Any] = {
        "capacity_sectors": sectors,
        "capacity_bytes": None if sectors is None else sectors * SECTOR_SIZE,
        "block_size": _field(cfg, "I", 20) if _has(features, uapi.VIRTIO_BLK_F_BLK_SIZE) else None,
        "read_only": _has(features, uapi.VIRTIO_BLK_F_RO),
        "num_queues": _field(cfg, "H", 34) if _has(features, uapi.VIRTIO_BLK_F_MQ) else 1,
    }
    if _has(features, uapi.VIRTIO_BLK_F_SIZE_MAX):
        out["size_max"] = _field(cfg, "I", 8)
    if _has(features, uapi.VIRTIO_BLK_F_SEG_MAX):
        out["seg_max"] = _field(cfg, "I", 12)
    return out


CONFIG_DECODERS = {uapi.VIRTIO_ID_NET: decode_net_config, uapi.VIRTIO_ID_BLOCK: decode_blk_config}


def gather(dev: Device) -> dict[str, Any]:
    """Everything `info` reports, as JSON-ready data. `dev` is open and owned."""
    device_id = dev.device_id()
    features = dev.get_features()
    backend = dev.get_backend_features()
    status = dev.get_status()
    nvqs = dev.vqs_count()
    iova = dev.iova_range()
    config = dev.get_config() if dev.config_size() else b""
    decoder = CONFIG_DECODERS.get(device_id)
    as_num, group_num = _optional(dev.as_num), _optional(dev.group_num)
    groups = [_optional(dev.vring_group, i) for i in range(nvqs)] if group_num else []
    impl, impls = relay_impls()
    return {
        "device": dev.path,
        "kind": "vhost-vdpa" if isinstance(dev, VhostVdpa) else f"software ({type(dev).__name__})",
        "device_id": device_id,
        "device_type": DEVICE_TYPES.get(device_id, "unknown"),
        "features": {"bits": f"{features:#018x}", "names": uapi.decode_features(features, device_id)},
        "backend_features": {"bits": f"{backend:#018x}", "names": uapi.decode_backend_features(backend)},
        "status": {"value": status, "names": uapi.decode_status(status)},
        "vqs": {
            "count": nvqs,
            "max_size": dev.vring_num(),
            "sizes": [_optional(dev.vring_size, i) for i in range(nvqs)],
        },
        "iova_range": {"first": f"{iova.first:#x}", "last": f"{iova.last:#x}"},
        "address_spaces": {"as_num": as_num, "group_num": group_num, "vq_groups": groups},
        "config": {"size": len(config), "raw": config.hex(), **(decoder(config, features) if decoder else {})},
        "relay": {"impl": impl, "available": impls},
        # A software device's own datapath (soft:net's loopback runs in C when the extension is built).
        **({"datapath": dev.datapath} if isinstance(dev, SoftNetDevice) else {}),
    }


def _names(word: dict[str, Any]) -> str:
    return f"{word['bits']}\n{' '.join(word['names']) or '(none)'}"


def _config_lines(info: dict[str, Any]) -> list[tuple[str, str]]:
    cfg = info["config"]
    if not cfg["size"]:  # e.g. a vhost-user backend: nothing to decode, whatever the feature bits say
        return [("config", "none (the device has no config space)")]
    if info["device_id"] == uapi.VIRTIO_ID_NET:
        status = cfg["status"]
        link = "not reported (no VIRTIO_NET_F_STATUS)" if status is None else (
            f"{status['value']:#06x} link {'up' if status['link_up'] else 'down'}"
            + (", announce" if status["announce"] else "")
        )
        lines = [
            ("mac", cfg["mac"] or "not reported (no VIRTIO_NET_F_MAC)"),
            ("link status", link),
            ("max vq pairs", str(cfg["max_virtqueue_pairs"])),
            ("mtu", "not reported (no VIRTIO_NET_F_MTU)" if cfg["mtu"] is None else str(cfg["mtu"])),
        ]
        if "speed_mbps" in cfg:
            lines.append(("speed", f"{cfg['speed_mbps']} Mb/s, duplex {cfg['duplex']}"))
        return lines
    if info["device_id"] == uapi.VIRTIO_ID_BLOCK:
        sectors = cfg["capacity_sectors"]
        lines = [
            ("capacity", "?" if sectors is None else
             f"{sectors} sectors ({cfg['capacity_bytes']} bytes, {human_bytes(cfg['capacity_bytes'])})"),
            ("block size", "512 (no VIRTIO_BLK_F_BLK_SIZE)" if cfg["block_size"] is None else str(cfg["block_size"])),
            ("read-only", "yes" if cfg["read_only"] else "no"),
            ("queues", str(cfg["num_queues"])),
        ]
        lines += [(k.replace("_", " "), str(cfg[k])) for k in ("size_max", "seg_max") if k in cfg]
        return lines
    return [("config", f"{cfg['size']} bytes: {cfg['raw'] or '-'}")]


def render(info: dict[str, Any]) -> None:
    vqs, spaces = info["vqs"], info["address_spaces"]
    sizes = vqs["sizes"]
    per_vq = "" if all(s is None for s in sizes) else " (" + ", ".join(f"vq{i} {s}" for i, s in enumerate(sizes)) + ")"
    if spaces["as_num"] is None and spaces["group_num"] is None:
        groups = "not reported"
    else:
        groups = f"{spaces['as_num']} address spaces, {spaces['group_num']} groups"
        if any(g is not None for g in spaces["vq_groups"]):
            groups += " (" + ", ".join(f"vq{i} group {g}" for i, g in enumerate(spaces["vq_groups"])) + ")"
    status = info["status"]
    relay = info["relay"]
    fields = [
        ("device", f"{info['device_type']} (virtio id {info['device_id']}), {info['kind']}"),
        ("features", _names(info["features"])),
        ("backend features", _names(info["backend_features"])),
        ("status", f"{status['value']:#04x} {' '.join(status['names']) or '(reset)'}"),
        ("virtqueues", f"{vqs['count']}, max size {vqs['max_size']}{per_vq}"),
        ("IOVA range", f"{info['iova_range']['first']} - {info['iova_range']['last']}"),
        ("groups", groups),
        *_config_lines(info),
        ("relay", f"{relay['impl']} (available: {', '.join(relay['available'])})"),
        *([("device datapath", info["datapath"])] if "datapath" in info else []),
    ]
    print_fields(info["device"], fields)


@click.command(short_help="Show a device's features, queues and config, decoded.")
@click.argument("device", metavar="DEV")
@json_option
def info(device: str, as_json: bool) -> None:
    """Show what DEV offers: features, backend features, status, virtqueues, IOVA range, address
    spaces and groups, the decoded config space (net: MAC, link, queue pairs, MTU; blk: capacity,
    block size), and the relay implementation vdpa-svq would use.

    DEV is a /dev/vhost-vdpa-N node (see `vdpa-svq list`), or soft:net / soft:blk for a built-in
    software device. vhost-vdpa allows one opener: DEV must not be in use (by QEMU, for one), and
    closing it again resets the device.

    \b
    Examples:
      vdpa-svq info /dev/vhost-vdpa-0
      vdpa-svq info soft:blk --json
    """
    with opened(device) as dev:
        data = gather(dev)
    if as_json:
        echo_json(data)
    else:
        render(data)
