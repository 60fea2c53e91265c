"""Persistent device management and inspection: what `mqtun create/delete/show` do."""

from __future__ import annotations

import os
from dataclasses import dataclass

from mqtun.device import Device
from mqtun.link import LinkInfo, delete_link, find_link, list_tun_links

__all__ = ["QueueHolder", "create_persistent", "delete_device", "describe", "queue_holders"]


@dataclass(frozen=True)
class QueueHolder:
    """A process holding an attached queue of a device (from /proc/PID/fdinfo's `iff:`)."""

    pid: int
    command: str
    fd: int


def create_persistent(
    name: str,
    *,
    tap: bool = False,
    multi_queue: bool = False,
    vnet_hdr: bool = False,
    packet_info: bool = False,
    owner: int | str | None = None,
    group: int | str | None = None,
) -> str:
    """Create a device that outlives this process (as `ip tuntap add` does); return its name."""
    dev = Device.create(
        name, 1, tap=tap, multi_queue=multi_queue, vnet_hdr=vnet_hdr,
        packet_info=packet_info, persist=True, owner=owner, group=group, offloads=None,
    )
    real = dev.name
    dev.close()
    return real


def delete_device(name: str) -> None:
    """Delete a tun/tap device (persistent or not) in this network namespace."""
    delete_link(name)


def queue_holders() -> dict[str, list[QueueHolder]]:
    """Which processes hold attached queues of which device, by device name.

    An attached queue nobody reads silently swallows every flow the kernel steers to it, so
    `mqtun show` names the holders.
    """
    out: dict[str, list[QueueHolder]] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        pid = int(entry.name)
        try:
            fds = os.listdir(f"/proc/{pid}/fdinfo")
        except OSError:
            continue
        command = ""
        for fd in fds:
            try:
                with open(f"/proc/{pid}/fdinfo/{fd}") as f:
                    text = f.read()
            except OSError:
                continue
            for line in text.splitlines():
                if line.startswith("iff:"):
                    dev = line[4:].strip()
                    if not dev:
                        break
                    if not command:
                        command = _command(pid)
                    out.setdefault(dev, []).append(QueueHolder(pid, command, int(fd)))
                    break
    return out


def _command(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            args = f.read().split(b"\0")
        return " ".join(a.decode(errors="replace") for a in args if a)[:200]
    except OSError:
        return "?"


def describe(name: str | None = None) -> list[tuple[LinkInfo, list[QueueHolder]]]:
    """Link info and queue holders for one device (by name) or every tun/tap device."""
    if name is not None:
        info = find_link(name)
        if info is None:
            from mqtun.errors import MqtunError

            raise MqtunError(19, f"no tun/tap device named {name} in this network namespace",
                             device=name, op="show")
        infos = [info]
    else:
        infos = list_tun_links()
    holders = queue_holders()
    return [(i, holders.get(i.name, [])) for i in infos]
