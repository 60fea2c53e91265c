"""One exception family for everything mqtun refuses or the kernel refuses.

`MqtunError` is an `OSError`, so `errno` is kept and code that already catches `OSError` keeps
working. Kernel errors are turned into messages that name the device, the operation and the
likely cause (the tun driver reuses a handful of errnos for many different mistakes), so a user
reads what to do instead of "[Errno 22] Invalid argument".
"""

from __future__ import annotations

import errno as _errno
import os

from mqtun._uapi import EBADFD

__all__ = [
    "DeviceGoneError",
    "FlagMismatchError",
    "InvalidArgumentError",
    "MqtunError",
    "PermissionDeniedError",
    "kernel_error",
]


class MqtunError(OSError):
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
    """The device was deleted (or its queue closed) while the caller still used it."""


_FD_BOUND = "this file descriptor is already bound to a device"
_QUEUES_FULL = ("device {dev} already has 256 queues (active and disabled count together): "
                "close one before opening another")

# Messages by (operation, errno). "{dev}" is the device name. An operation missing here
# falls back to the errno-only row, then to the kernel's own text.
_MESSAGES: dict[tuple[str, int], str] = {
    ("open", _errno.ENOENT): (
        "/dev/net/tun does not exist: load the tun module (modprobe tun) or create the node "
        "(mknod /dev/net/tun c 10 200)"
    ),
    ("open", _errno.ENODEV): "the tun driver is not available in this kernel (CONFIG_TUN)",
    ("open", _errno.EACCES): (
        "cannot open /dev/net/tun: permission denied on the device node; make it usable by "
        "all (as root: chmod 0666 /dev/net/tun, the usual mode: the kernel still checks "
        "CAP_NET_ADMIN and each device's owner/group) or run as root"
    ),
    ("create", _errno.EPERM): (
        "creating {dev} needs CAP_NET_ADMIN in this network namespace; run as root, or "
        "create it once with `mqtun create {dev} --owner USER` and open it as that user"
    ),
    ("attach", _errno.EPERM): (
        "not allowed to open a queue on {dev}: its owner/group is set to another user; run as "
        "that user or with CAP_NET_ADMIN"
    ),
    ("create", _errno.EBUSY): (
        "device {dev} already exists; open its queues with Device.attach({dev!r}) or delete "
        "it first (`mqtun delete {dev}`)"
    ),
    ("attach", _errno.EBUSY): (
        "device {dev} is exclusive (IFF_TUN_EXCL) or exists without multiqueue and already has "
        "its one queue; delete it or open it single-queue"
    ),
    ("create", _errno.EINVAL): (
        "the kernel refused the flags for {dev}: a device of that name exists with another "
        "type (tun/tap) or multiqueue setting, or the flag set is impossible (NAPI_FRAGS needs "
        "TAP and NAPI)"
    ),
    ("attach", _errno.EINVAL): (
        "device {dev} exists with another type (tun/tap) or multiqueue setting than asked; "
        "open it with the flags it has (`mqtun show {dev}` lists them)"
    ),
    ("create", _errno.EEXIST): _FD_BOUND,
    ("attach", _errno.EEXIST): _FD_BOUND,
    ("create", _errno.E2BIG): _QUEUES_FULL,
    ("attach", _errno.E2BIG): _QUEUES_FULL,
    ("create", _errno.ENFILE): "too many open files in the system",
    ("create", _errno.EMFILE): "too many open files in this process: raise `ulimit -n`",
    ("create", _errno.ENOMEM): "out of memory creating {dev}",
    ("detach", _errno.EINVAL): (
        "queue of {dev} cannot be detached: it is detached already, or the device was deleted"
    ),
    ("reattach", _errno.EINVAL): "queue of {dev} is already attached",
    ("reattach", _errno.EPERM): "not allowed to re-attach a queue of {dev} (owner/group)",
    ("reattach", _errno.E2BIG): "{dev} already has 256 queues",
    ("set_link_type", _errno.EBUSY): "cannot change the link type of {dev} while it is up",
    ("set_offload", _errno.EINVAL): (
        "the kernel refused this offload set for {dev}: every segmentation offload needs "
        "TUN_F_CSUM, USO4 and USO6 go together, tunnel GSO needs a plain segmentation "
        "offload, and the running kernel may not know some bits"
    ),
    ("set_vnet_hdr_size", _errno.EINVAL): "a virtio-net header is at least 10 bytes",
    ("set_sndbuf", _errno.EINVAL): "the send buffer size must be positive",
    ("write", _errno.EINVAL): (
        "{dev} refused the packet: shorter than its headers (14 bytes on TAP), not IPv4/IPv6 on "
        "TUN, or a virtio-net header that does not match the packet"
    ),
    ("write", _errno.EIO): "{dev} is down: bring the link up before writing packets",
    ("write", _errno.EBUSY): "the queue of {dev} is detached and the device uses NAPI",
    ("write", _errno.EFAULT): "the packet buffer is not readable",
    ("read", _errno.EFAULT): "{dev} was deleted while this queue was reading",
    ("read", _errno.EINVAL): "the read buffer is too small for the headers of {dev}",
    ("set_steering", _errno.EINVAL): (
        "{dev} refused the steering program: it must be a loaded BPF_PROG_TYPE_SOCKET_FILTER "
        "program fd"
    ),
    ("set_filter", _errno.EINVAL): (
        "{dev} refused the filter program: it must be a loaded BPF_PROG_TYPE_SOCKET_FILTER "
        "program fd"
    ),
    ("set_txfilter", _errno.EINVAL): "a MAC (TX) filter only applies to TAP devices",
    ("attach_classic_filter", _errno.EINVAL): "a classic BPF filter only applies to TAP devices",
    ("set_netns", _errno.EINVAL): "cannot move {dev}: the target namespace is not valid",
}
_BY_ERRNO: dict[int, str] = {
    EBADFD: (
        "{dev} is gone (deleted, or moved away) or this queue was never attached: reopen it"
    ),
    _errno.EBADF: "the queue of {dev} is closed",
    _errno.EPERM: "operation on {dev} needs CAP_NET_ADMIN (run as root)",
    _errno.EACCES: "operation on {dev} needs CAP_NET_ADMIN (run as root)",
    _errno.ENODEV: "no such device: {dev}",
    _errno.EAGAIN: "nothing to read on the queue of {dev} right now",
}


def kernel_error(exc: OSError, op: str, device: str | None = None) -> MqtunError:
    """Turn an OSError from a tun/netlink/bpf call into the mqtun error that explains it."""
    if isinstance(exc, MqtunError):
        return exc
    err = exc.errno or _errno.EIO
    template = _MESSAGES.get((op, err)) or _BY_ERRNO.get(err)
    dev = device or "the device"
    if template is None:
        message = f"{op} on {dev} failed: {os.strerror(err)}"
    else:
        message = template.replace("{dev!r}", repr(dev)).format(dev=dev)
        message = f"{message} [{_errno.errorcode.get(err, err)}]"
    cls: type[MqtunError]
    if err in (_errno.EPERM, _errno.EACCES):
        cls = PermissionDeniedError
    elif err == EBADFD or (op == "read" and err == _errno.EFAULT):
        cls = DeviceGoneError
    else:
        cls = MqtunError
    return cls(err, message, device=device, op=op)
