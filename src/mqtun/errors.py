"""One exception family for everything mqtun refuses or the kernel refuses.

`MqtunException` is the root. `MqtunError` is an `OSError`, so `errno` is kept and code that
already catches `OSError` keeps working; what is not about I/O (a packet that is not what it
claims, `mqtun.packet.MalformedPacket`) is a `ValueError` beside it, never an `OSError`.
Kernel errors are turned into messages that name the device, the operation and the
likely cause (the tun driver reuses a handful of errnos for many different mistakes), so a user
reads what to do instead of "[Errno 22] Invalid argument".
"""

from __future__ import annotations

import errno as _errno
import os
import re

__all__ = [
    "DeviceGoneError",
    "FlagMismatchError",
    "InvalidArgumentError",
    "MqtunError",
    "MqtunException",
    "PermissionDeniedError",
    "QueueFullError",
    "kernel_error",
]


class MqtunException(Exception):
    """Root of everything mqtun raises: `except MqtunException` catches the whole family."""


class MqtunError(MqtunException, OSError):
    """Base of every error mqtun raises."""

    def __init__(self, err: int, message: str, *, device: str | None = None, op: str = "") -> None:
        super().__init__(err, message)
        self.device = device
        self.op = op
        self.message = message

    def __str__(self) -> str:
        return self.message

    def __reduce__(self):  # type: ignore[no-untyped-def]
        # keep the message when an error crosses a process boundary (runtime workers)
        return (_rebuild, (type(self), self.errno, self.message, self.device, self.op))


def _rebuild(cls: type[MqtunError], err: int, message: str, device: str | None, op: str):  # type: ignore[no-untyped-def]
    return cls(err, message, device=device, op=op)


class InvalidArgumentError(MqtunError, ValueError):
    """A bad argument caught before the kernel saw it (or a kernel EINVAL with a known cause)."""

    def __init__(self, message: str, *, device: str | None = None, op: str = "") -> None:
        super().__init__(_errno.EINVAL, message, device=device, op=op)


class FlagMismatchError(MqtunError):
    """The existing device was created with other flags than the caller asked for."""


class PermissionDeniedError(MqtunError, PermissionError):
    """The kernel said EPERM/EACCES: missing CAP_NET_ADMIN or an owner/group mismatch."""


class DeviceGoneError(MqtunError):
    """The device was deleted (or moved away) while the caller still used it."""


class QueueFullError(MqtunError, BlockingIOError):
    """The queue's send buffer stayed full (EAGAIN) for longer than the queue's timeout.

    Not a drop: the packet that raised and those after it are still the caller's to send.
    `written` says how many packets of the call had been written before.
    """

    def __init__(self, message: str, *, device: str | None = None, op: str = "write",
                 written: int = 0) -> None:
        super().__init__(_errno.EAGAIN, message, device=device, op=op)
        self.written = written

    def __reduce__(self):  # type: ignore[no-untyped-def]
        return (_rebuild_full, (self.message, self.device, self.op, self.written))


def _rebuild_full(message: str, device: str | None, op: str, written: int) -> QueueFullError:
    return QueueFullError(message, device=device, op=op, written=written)


# ---- errno + operation -> message ----------------------------------------------------------------
# The tun driver reuses a handful of errnos for many mistakes, so what an errno means depends
# on the operation. One table, keyed by (operation, errno): each row is the text for that
# operation (and, where the errno alone would mislead, the exception class). "{dev}" is the
# device name, "{what}" the operation's description from _WHAT. A pair missing from the table
# falls back to the errno's row, which is phrased through "{what}", then to the kernel's text.

_WHAT: dict[str, str] = {
    "open": "open /dev/net/tun",
    "create": "create {dev}",
    "attach": "open a queue on {dev}",
    "attach_single": "open the queue of single-queue device {dev}",
    "add_queue": "add a queue to {dev}",
    "detach": "disable a queue of {dev}",
    "reattach": "enable a queue of {dev}",
    "read": "read from {dev}",
    "write": "write to {dev}",
    "wait_readable": "wait for a packet on {dev}",
    "get_flags": "read the flags of a queue of {dev}",
    "get_name": "read the name of {dev}",
    "set_persist": "change whether {dev} persists",
    "set_owner": "set the owner of {dev}",
    "set_group": "set the group of {dev}",
    "set_carrier": "change the carrier of {dev}",
    "set_link_type": "change the link type of {dev}",
    "set_offload": "set the offloads of {dev}",
    "get_vnet_hdr_size": "read the virtio-net header size of {dev}",
    "set_vnet_hdr_size": "set the virtio-net header size of {dev}",
    "get_vnet_le": "read the virtio-net byte order of {dev}",
    "set_vnet_le": "set the virtio-net byte order of {dev}",
    "get_sndbuf": "read the send buffer size of {dev}",
    "set_sndbuf": "set the send buffer size of {dev}",
    "set_steering": "attach a steering program to {dev}",
    "set_filter": "attach a filter program to {dev}",
    "attach_classic_filter": "attach a classic BPF filter to {dev}",
    "detach_classic_filter": "detach the classic BPF filter of {dev}",
    "get_classic_filter": "read the classic BPF filter of {dev}",
    "set_txfilter": "set the MAC filter of {dev}",
    "get_netns": "find the network namespace of {dev}",
    "get_offloads": "read the offload features of {dev}",
    "get_channels": "read the channel counts of {dev}",
    # netlink, on the link (mqtun.link)
    "info": "read the link state of {dev}",
    "stats": "read the counters of {dev}",
    "ifindex": "find the ifindex of {dev}",
    "up": "bring {dev} up",
    "down": "bring {dev} down",
    "set_mtu": "set the MTU of {dev}",
    "set_txqueuelen": "set the txqueuelen of {dev}",
    "set_hwaddr": "set the MAC address of {dev}",
    "add_address": "add an address to {dev}",
    "remove_address": "remove an address from {dev}",
    "set_netns": "move {dev} to another network namespace",
    "delete": "delete {dev}",
}

_GONE = ("{dev} is gone (deleted, or this queue was never attached): cannot {what}; "
         "create or attach it again")
_CLOSED = "this queue of {dev} is closed: cannot {what}"
_FD_BOUND = "this file descriptor is already bound to a device"
_QUEUES_FULL = ("{dev} already has 256 queues (active and disabled count together, whoever "
                "holds them): close one before opening another")
_PROG_FD_BAD = ("the program fd given for {dev} is not an open file descriptor: pass a loaded "
                "program (an object with fileno(), e.g. from mqtun.steer) or its fd")
_NOT_TAP = "{what}: only TAP devices have one ({dev} is TUN)"


def _row(text: str, cls: type[MqtunError] | None = None) -> tuple[str, type[MqtunError] | None]:
    return text, cls


_MESSAGES: dict[tuple[str, int], tuple[str, type[MqtunError] | None]] = {
    # -- opening /dev/net/tun
    ("open", _errno.ENOENT): _row(
        "/dev/net/tun does not exist: load the tun module (modprobe tun) or create the node "
        "(mknod /dev/net/tun c 10 200)"),
    ("open", _errno.ENODEV): _row("the tun driver is not available in this kernel (CONFIG_TUN)"),
    ("open", _errno.ENXIO): _row("the tun driver is not available in this kernel (CONFIG_TUN)"),
    ("open", _errno.EACCES): _row(
        "cannot open /dev/net/tun: permission denied on the device node; make it usable by "
        "all (as root: chmod 0666 /dev/net/tun, the usual mode: the kernel still checks "
        "CAP_NET_ADMIN and each device's owner/group) or run as root"),
    ("open", _errno.EMFILE): _row("too many open files in this process: raise `ulimit -n`"),
    ("open", _errno.ENFILE): _row("too many open files in the system"),
    # -- TUNSETIFF as create()
    ("create", _errno.EPERM): _row(
        "creating {dev} needs CAP_NET_ADMIN in this network namespace; run as root, or "
        "create it once with `mqtun create {dev} --owner USER` and open it as that user"),
    ("create", _errno.EBUSY): _row(
        "device {dev} already exists; open its queues with Device.attach({dev!r}) or delete "
        "it first (`mqtun delete {dev}`)"),
    ("create", _errno.EINVAL): _row(
        "the kernel refused the flags for {dev}: a device of that name exists with another "
        "type (tun/tap) or multiqueue setting, or the flag set is impossible (NAPI_FRAGS needs "
        "TAP and NAPI)"),
    ("create", _errno.EEXIST): _row(_FD_BOUND),
    ("create", _errno.E2BIG): _row(_QUEUES_FULL),
    ("create", _errno.ENOMEM): _row("out of memory creating {dev}"),
    ("create", _errno.ENFILE): _row("too many network devices or open files in the system"),
    # -- TUNSETIFF on an existing device, as a multiqueue attacher
    ("attach", _errno.EPERM): _row(
        "not allowed to open a queue on {dev}: its owner/group is set to another user; run as "
        "that user or with CAP_NET_ADMIN"),
    ("attach", _errno.EBUSY): _row(
        "device {dev} was created exclusive (IFF_TUN_EXCL) or without multiqueue and its one "
        "queue is taken; open it with queues=1 after that queue closes, or recreate it with "
        "multi_queue=True"),
    ("attach", _errno.EINVAL): _row(
        "device {dev} exists with another type (tun/tap) or multiqueue setting than asked; "
        "open it with the flags it has (`mqtun show {dev}` lists them)"),
    ("attach", _errno.EEXIST): _row(_FD_BOUND),
    ("attach", _errno.E2BIG): _row(_QUEUES_FULL),
    ("attach", _errno.ENOMEM): _row("out of memory opening a queue on {dev}"),
    # -- TUNSETIFF on an existing single-queue device
    ("attach_single", _errno.EPERM): _row(
        "not allowed to open the queue of {dev}: its owner/group is set to another user; run "
        "as that user or with CAP_NET_ADMIN"),
    ("attach_single", _errno.EBUSY): _row(
        "{dev} is a single-queue device and its one queue is already open (in this or another "
        "process): close that queue first, or recreate {dev} with multi_queue=True so that "
        "several can share it"),
    ("attach_single", _errno.EINVAL): _row(
        "device {dev} exists with another type (tun/tap) or multiqueue setting than asked; "
        "open it with the flags it has (`mqtun show {dev}` lists them)"),
    ("attach_single", _errno.EEXIST): _row(_FD_BOUND),
    ("attach_single", _errno.ENOMEM): _row("out of memory opening the queue of {dev}"),
    # -- TUNSETIFF with raw flags (compat): create or attach, whichever the kernel does
    ("open_flags", _errno.EPERM): _row(
        "not allowed to create or open {dev}: creating needs CAP_NET_ADMIN, opening a device "
        "whose owner/group is set needs that user or group"),
    ("open_flags", _errno.EBUSY): _row(
        "{dev} exists and was asked exclusive (IFF_TUN_EXCL), or it is single-queue and its "
        "one queue is already open"),
    ("open_flags", _errno.EINVAL): _row(
        "the kernel refused these flags for {dev}: it exists with another type or multiqueue "
        "setting, or the flag set is impossible"),
    ("open_flags", _errno.EEXIST): _row(_FD_BOUND),
    ("open_flags", _errno.E2BIG): _row(_QUEUES_FULL),
    # -- add_queue on our own multiqueue device
    ("add_queue", _errno.E2BIG): _row(_QUEUES_FULL),
    ("add_queue", _errno.EPERM): _row(
        "not allowed to add a queue to {dev}: its owner/group is set to another user"),
    ("add_queue", _errno.EINVAL): _row(
        "{dev} was replaced by a device of another type or multiqueue setting under the same "
        "name"),
    ("add_queue", _errno.ENOMEM): _row("out of memory adding a queue to {dev}"),
    # -- TUNSETQUEUE
    ("detach", _errno.EINVAL): _row("this queue of {dev} is disabled already"),
    ("reattach", _errno.EINVAL): _row("this queue of {dev} is enabled already"),
    ("reattach", _errno.EPERM): _row(
        "not allowed to enable a queue of {dev}: its owner/group was set to another user "
        "since the queue was opened"),
    ("reattach", _errno.E2BIG): _row(_QUEUES_FULL),
    ("reattach", _errno.ENOMEM): _row("out of memory enabling a queue of {dev}"),
    # -- data
    ("read", _errno.EFAULT): _row("{dev} was deleted while this queue was reading",
                                  DeviceGoneError),
    ("read", _errno.EINVAL): _row("the read buffer is too small for the headers of {dev}"),
    ("read", _errno.EAGAIN): _row("nothing to read on this queue of {dev} right now"),
    ("read", _errno.EIO): _row("the device {dev} failed the read (EIO)"),
    ("write", _errno.EINVAL): _row(
        "{dev} refused the packet: shorter than its headers (14 bytes on TAP), not IPv4/IPv6 "
        "on TUN, or a virtio-net header that does not match the packet"),
    ("write", _errno.EIO): _row("{dev} is down: bring the link up before writing packets"),
    ("write", _errno.EBUSY): _row("this queue of {dev} is disabled and the device uses NAPI: "
                                  "enable it before writing"),
    ("write", _errno.EFAULT): _row("the packet buffer is not readable"),
    ("write", _errno.EAGAIN): _row(
        "the send buffer of {dev} is full: wait for the queue to be writable, or raise it "
        "with Device.set_sndbuf"),
    ("write", _errno.ENOMEM): _row("out of memory writing a packet to {dev}"),
    ("write", _errno.EMSGSIZE): _row("the packet is larger than {dev} accepts"),
    # -- device-wide settings
    ("set_carrier", _errno.EPERM): _row(
        "the carrier of {dev} cannot be turned on while no queue is attached (every queue is "
        "disabled or closed): enable or open a queue first", MqtunError),
    ("set_link_type", _errno.EBUSY): _row("cannot change the link type of {dev} while it is up: "
                                          "bring it down first"),
    ("set_link_type", _errno.EINVAL): _row("{dev} refused that ARPHRD link type"),
    ("set_offload", _errno.EINVAL): _row(
        "the kernel refused this offload set for {dev}: every segmentation offload needs "
        "TUN_F_CSUM, USO4 and USO6 go together, tunnel GSO needs a plain segmentation "
        "offload, and the running kernel may not know some bits"),
    ("set_owner", _errno.EINVAL): _row("that owner is not a valid user id in {dev}'s namespace"),
    ("set_group", _errno.EINVAL): _row("that group is not a valid group id in {dev}'s namespace"),
    ("set_vnet_hdr_size", _errno.EINVAL): _row("a virtio-net header is at least 10 bytes"),
    ("set_vnet_le", _errno.EINVAL): _row("{dev} cannot change the virtio-net byte order"),
    ("get_vnet_le", _errno.EINVAL): _row("{dev} cannot tell the virtio-net byte order"),
    ("set_sndbuf", _errno.EINVAL): _row("the send buffer size must be positive"),
    ("set_steering", _errno.EINVAL): _row(
        "{dev} refused the steering program: it must be a loaded BPF_PROG_TYPE_SOCKET_FILTER "
        "program fd"),
    ("set_steering", _errno.EBADF): _row(_PROG_FD_BAD),
    ("set_steering", _errno.ENOMEM): _row("out of memory attaching a steering program to {dev}"),
    ("set_filter", _errno.EINVAL): _row(
        "{dev} refused the filter program: it must be a loaded BPF_PROG_TYPE_SOCKET_FILTER "
        "program fd"),
    ("set_filter", _errno.EBADF): _row(_PROG_FD_BAD),
    ("set_filter", _errno.ENOMEM): _row("out of memory attaching a filter program to {dev}"),
    ("set_txfilter", _errno.EINVAL): _row(_NOT_TAP),
    ("set_txfilter", _errno.ENOMEM): _row("out of memory setting the MAC filter of {dev}"),
    ("attach_classic_filter", _errno.EINVAL): _row(
        "{dev} refused the classic BPF program: only TAP devices take one, and the kernel's "
        "checker refused it otherwise (bad opcode, jump or scratch index)"),
    ("attach_classic_filter", _errno.ENOMEM): _row("out of memory attaching a classic filter"),
    ("detach_classic_filter", _errno.EINVAL): _row(_NOT_TAP),
    ("detach_classic_filter", _errno.ENOENT): _row("{dev} has no classic BPF filter attached"),
    ("get_classic_filter", _errno.EINVAL): _row(_NOT_TAP),
    ("get_netns", _errno.EPERM): _row(
        "finding the namespace of {dev} needs CAP_NET_ADMIN", PermissionDeniedError),
    ("set_netns", _errno.EINVAL): _row("cannot move {dev}: the target namespace is not valid"),
    ("set_netns", _errno.EEXIST): _row(
        "cannot move {dev}: the target namespace has a link of that name already"),
    ("add_address", _errno.EEXIST): _row("{dev} has that address already"),
    ("add_address", _errno.EINVAL): _row(
        "{dev} refused the address (IPv6 needs an MTU of at least 1280)"),
    ("remove_address", _errno.EADDRNOTAVAIL): _row("{dev} has no such address"),
    ("set_mtu", _errno.EINVAL): _row("{dev} refused that MTU (68..65535 on tun/tap)"),
    ("set_hwaddr", _errno.EINVAL): _row(
        "{dev} refused the MAC address: only TAP devices have one, and it must be unicast"),
    ("set_hwaddr", _errno.EADDRNOTAVAIL): _row(
        "{dev} refused the MAC address: it must be a unicast address"),
    ("set_hwaddr", _errno.EOPNOTSUPP): _row("{dev} is a TUN device: it has no MAC address"),
}

# By errno alone: phrased through the operation ({what}), for what an errno means everywhere.
_BY_ERRNO: dict[int, tuple[str, type[MqtunError] | None]] = {
    _errno.EBADFD: _row(_GONE, DeviceGoneError),
    _errno.EBADF: _row(_CLOSED),
    _errno.EPERM: _row("not allowed to {what}: that needs CAP_NET_ADMIN (run as root)"),
    _errno.EACCES: _row("not allowed to {what}: that needs CAP_NET_ADMIN (run as root)"),
    _errno.ENODEV: _row("cannot {what}: no such device"),
    _errno.ENOMEM: _row("out of memory: cannot {what}"),
}

_PLACEHOLDER = re.compile(r"\{(dev!r|dev|what)\}")


def _fill(template: str, dev: str, what: str) -> str:
    """Fill the placeholders in one pass: a device name holding '{' or '}' stays text."""
    values = {"dev": dev, "dev!r": repr(dev), "what": what}
    return _PLACEHOLDER.sub(lambda m: values[m.group(1)], template)


def kernel_error(exc: OSError, op: str, device: str | None = None) -> MqtunError:
    """Turn an OSError from a tun/netlink/bpf call into the mqtun error that explains it."""
    if isinstance(exc, MqtunError):
        return exc
    err = exc.errno or _errno.EIO
    dev = device or "the device"
    what = _fill(_WHAT.get(op, op.replace("_", " ") + " on {dev}"), dev, "")
    row = _MESSAGES.get((op, err)) or _BY_ERRNO.get(err)
    cls: type[MqtunError] | None = None
    if row is None:
        message = f"cannot {what}: {os.strerror(err)}"
    else:
        template, cls = row
        message = f"{_fill(template, dev, what)} [{_errno.errorcode.get(err, err)}]"
    if cls is None:
        cls = PermissionDeniedError if err in (_errno.EPERM, _errno.EACCES) else MqtunError
    return cls(err, message, device=device, op=op)


def explained(op: str, err: int) -> bool:
    """Whether (op, err) has a text of its own (for tests that hold the table to its word)."""
    return (op, err) in _MESSAGES or err in _BY_ERRNO
