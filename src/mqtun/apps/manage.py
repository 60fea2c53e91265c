"""Persistent device management and inspection: what `mqtun create/delete/show` do.

`show` adds the live per-queue counters that running mqtun processes publish in shared
memory (`mqtun.runtime.shm`): the kernel keeps none per queue for tun/tap.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import fcntl
import os
from collections.abc import Sequence
from dataclasses import dataclass

from mqtun import _uapi
from mqtun.device import ClassicFilter, Device, read_classic_filter
from mqtun.errors import MqtunError
from mqtun.link import LinkInfo, delete_link, find_link, list_tun_links
from mqtun.runtime.shm import SHM_DIR, EntryInfo, Region, list_regions

__all__ = ["LiveQueue", "QueueHolder", "create_persistent", "delete_device", "describe",
           "live_queues", "queue_holders"]


@dataclass(frozen=True)
class QueueHolder:
    """A process holding an attached queue of a device (from /proc/PID/fdinfo's `iff:`)."""

    pid: int
    command: str
    fd: int
    classic_filter: ClassicFilter | None = None  # TAP, as this holder's fd tells


@dataclass(frozen=True)
class LiveQueue:
    """A queue's live counters, as the mqtun process serving it publishes them."""

    pid: int  # the process that owns the counters region
    region: str  # the region's (pool's) name
    info: EntryInfo

    def as_dict(self) -> dict[str, object]:
        e = self.info
        return {"pid": self.pid, "region": self.region, "queue": e.queue,
                "worker_pid": e.worker_pid, "state": e.state.label, "restarts": e.restarts,
                "cpu": e.cpu, **e.stats.as_dict()}


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
    """Link info and queue holders for one device (by name) or every tun/tap device.

    Each holder is checked through a copy of its queue fd (see `_probe`): holders of a
    same-named device in another namespace are left out, and a TAP holder tells the device's
    classic filter. A single-queue device's queue counts (which the kernel reports for
    multiqueue devices only) are filled in from its holders.
    """
    if name is not None:
        info = find_link(name)
        if info is None:
            raise MqtunError(19, f"no tun/tap device named {name} in this network namespace",
                             device=name, op="show")
        infos = [info]
    else:
        infos = list_tun_links()
    holders = queue_holders()
    here = _netns_id(os.stat("/proc/thread-self/ns/net"))
    rows: list[tuple[LinkInfo, list[QueueHolder]]] = []
    for i in infos:
        mine: list[QueueHolder] = []
        for h in holders.get(i.name, []):
            netns, classic = _probe(h, i)
            if netns in (here, None):
                mine.append(dataclasses.replace(h, classic_filter=classic))
        if not i.multi_queue and i.num_queues is None:
            # the kernel reports queue counts for multiqueue devices only; a single-queue
            # device has its one queue attached exactly when someone holds it
            i = dataclasses.replace(i, num_queues=min(1, len(mine)), num_disabled_queues=0)
        rows.append((i, mine))
    return rows


def _netns_id(st: os.stat_result) -> tuple[int, int]:
    return st.st_dev, st.st_ino


def _probe(h: QueueHolder, info: LinkInfo) -> tuple[tuple[int, int] | None, ClassicFilter | None]:
    """(the device's namespace, its classic filter on a TAP) as the holder's fd tells;
    None where it cannot be told.

    fdinfo gives only the device's name, and names are per network namespace (every
    container may have its tun0). The fd itself knows (TUNGETDEVNETNS, TUNGETFILTER), so take
    a copy of it with pidfd_getfd and close it at once. Needs the right to ptrace the holder
    and CAP_NET_ADMIN; without them the name alone decides, as before.
    """
    try:
        pidfd = os.pidfd_open(h.pid)
    except OSError:
        return None, None
    try:
        fd = _libc.syscall(_uapi.NR_pidfd_getfd, pidfd, h.fd, 0)
    finally:
        os.close(pidfd)
    if fd < 0:
        return None, None
    try:
        netns: tuple[int, int] | None = None
        with contextlib.suppress(OSError):
            nsfd = fcntl.ioctl(fd, _uapi.TUNGETDEVNETNS)
            try:
                netns = _netns_id(os.fstat(nsfd))
            finally:
                os.close(nsfd)
        classic: ClassicFilter | None = None
        if info.kind == "tap":
            with contextlib.suppress(OSError):
                classic = read_classic_filter(fd, packet_info=bool(info.packet_info))
        return netns, classic
    finally:
        os.close(fd)


_libc = ctypes.CDLL(None, use_errno=True)


def live_queues(rows: Sequence[tuple[LinkInfo, list[QueueHolder]]],
                directory: str = SHM_DIR) -> dict[str, list[LiveQueue]]:
    """The live counters of the devices in `rows` (from `describe()`), by device name.

    Regions live in /dev/shm, which every network namespace shares, while device names are
    per namespace: an entry counts only if its process holds a queue of the device shown here.
    """
    holders = {info.name: {h.pid for h in hs} for info, hs in rows}
    out: dict[str, list[LiveQueue]] = {}
    for found in list_regions(directory):
        if not found.alive:
            continue
        try:
            region = Region.open(found.path)
        except MqtunError:
            continue  # gone meanwhile, or not ours to read
        try:
            for e in region.entries():
                pids = holders.get(e.device, set())
                if region.pid in pids or e.worker_pid in pids:
                    out.setdefault(e.device, []).append(LiveQueue(region.pid, region.name, e))
        finally:
            region.close()
    for queues in out.values():
        queues.sort(key=lambda q: (q.pid, q.region, q.info.queue, q.info.entry))
    return out
