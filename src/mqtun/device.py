"""Device: a tun/tap device and the queues this process holds on it.

The kernel knows a device only through its queue fds: TUNSETIFF on /dev/net/tun creates or
attaches, every other setting is an ioctl on an attached fd. This module does those ioctls,
checks arguments before the kernel sees them (the kernel truncates long names silently and
keeps the first attacher's flags silently), and tracks each queue's kernel index, which the
kernel renumbers on every detach and close without telling anyone.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import grp
import os
import pwd
import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from mqtun import _uapi
from mqtun.errors import (
    DeviceGoneError,
    FlagMismatchError,
    InvalidArgumentError,
    MqtunError,
    kernel_error,
)
from mqtun.link import Link, LinkInfo, find_link
from mqtun.queue import Queue
from mqtun.stats import QueueStats, total

if TYPE_CHECKING:
    from mqtun.queue import BytesLike

__all__ = ["ClassicFilter", "Device", "read_classic_filter", "tun_features", "validate_name"]


class _HasFileno(Protocol):
    def fileno(self) -> int: ...


def validate_name(name: str) -> bytes:
    """Check a device name (or a "%d" pattern) the way the kernel would, before it sees it.

    The kernel silently truncates names of 16+ bytes, so a long name must be refused here.
    """
    if not isinstance(name, str):
        raise InvalidArgumentError(f"device name must be a str, not {type(name).__name__}")
    raw = name.encode()
    if len(raw) >= _uapi.IFNAMSIZ:
        raise InvalidArgumentError(
            f"device name {name!r} is {len(raw)} bytes; Linux allows at most 15", device=name
        )
    if name in (".", ".."):
        raise InvalidArgumentError(f"device name {name!r} is not allowed", device=name)
    bad = [c for c in name if c in "/:" or c.isspace() or not c.isprintable()]
    if bad:
        raise InvalidArgumentError(
            f"device name {name!r} contains {bad[0]!r}; names cannot hold '/', ':' or spaces",
            device=name,
        )
    if name.count("%") > 1 or ("%" in name and "%d" not in name):
        raise InvalidArgumentError(
            f"device name {name!r}: the only pattern allowed is one '%d'", device=name
        )
    return raw


def _validate_queue_count(queues: object) -> int:
    if not isinstance(queues, int) or isinstance(queues, bool):
        raise InvalidArgumentError(f"queue count must be an integer, not {queues!r}")
    if not 1 <= queues <= _uapi.MAX_QUEUES:
        raise InvalidArgumentError(
            f"queue count must be 1..{_uapi.MAX_QUEUES} (the kernel's limit), not {queues}"
        )
    return queues


def _resolve_id(value: int | str | None, kind: str) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool):
        raise InvalidArgumentError(f"{kind} must be a name or a number, not {value!r}")
    if isinstance(value, int):
        if value < 0:
            raise InvalidArgumentError(f"{kind} id must be >= 0, not {value}")
        return value
    if value.isdigit():
        return int(value)
    try:
        return pwd.getpwnam(value).pw_uid if kind == "owner" else grp.getgrnam(value).gr_gid
    except KeyError:
        what = "user" if kind == "owner" else "group"
        raise InvalidArgumentError(f"no such {what}: {value!r}") from None


def _open_tun_fd(path: str = _uapi.TUN_DEVICE_PATH) -> int:
    try:
        return os.open(path, os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as exc:
        raise kernel_error(exc, "open", path) from None


@dataclass(frozen=True)
class ClassicFilter:
    """What the kernel tells about a TAP device's classic BPF filter.

    TUNGETFILTER returns the last program attached, even after TUNDETACHFILTER; whether one
    is attached now shows only in TUNGETIFF's IFF_NOFILTER bit, which is the IFF_NO_PI bit
    too, so on a device without packet info (the usual case) it cannot be told.
    """

    instructions: int  # of the last program attached (0: never one)
    attached: bool | None  # None: the kernel cannot tell (IFF_NO_PI device)


def read_classic_filter(fd: int, *, packet_info: bool) -> ClassicFilter:
    """The classic filter of the TAP device behind queue `fd` (a TUN device gives EINVAL).

    eBPF steering and filter programs are reported nowhere; this is all the kernel tells.
    """
    out = fcntl.ioctl(fd, _uapi.TUNGETFILTER, bytes(struct.calcsize(_uapi.SOCK_FPROG_FORMAT)))
    n = int(struct.unpack(_uapi.SOCK_FPROG_FORMAT, out)[0])
    if n == 0:
        return ClassicFilter(0, False)
    if not packet_info:
        return ClassicFilter(n, None)
    flags = _uapi.unpack_ifreq(fcntl.ioctl(fd, _uapi.TUNGETIFF, bytes(_uapi.IFREQ_SIZE)))[1]
    return ClassicFilter(n, not flags & _uapi.IFF_NOFILTER)


def tun_features() -> int:
    """The IFF_* flags the running kernel supports (TUNGETFEATURES, needs no device)."""
    fd = _open_tun_fd()
    try:
        out = fcntl.ioctl(fd, _uapi.TUNGETFEATURES, b"\0" * 4)
        return int(struct.unpack("I", out)[0])
    finally:
        os.close(fd)


class Device:
    """A tun or tap device with the queues this process opened on it.

    Make one with `Device.create()` (new device) or `Device.attach()` (existing one, e.g. a
    persistent device made by `mqtun create`). Use it as a context manager to close its queues
    deterministically; a non-persistent device disappears with its last queue.
    """

    def __init__(
        self,
        name: str,
        flags: int,
        *,
        blocking: bool = True,
        created: bool = False,
        offloads: int | None = 0,
    ) -> None:
        self._name = name
        self.flags = flags  # the IFF_* bits every queue is opened with
        self.blocking = blocking
        self.created = created  # whether this object made the device
        self.queues: list[Queue] = []  # the open queues we hold, in opening order
        self._active: list[Queue | None] = []  # kernel order; None = a queue someone else holds
        self._retired = QueueStats()  # counters of our queues that were closed
        self._ever_opened = False
        self._offloads = offloads  # the mask to set when queues are opened (None: adopt)
        self.steering_program: object | None = None
        self.filter_program: object | None = None
        # device-wide in the kernel (tun->vnet_hdr_sz): read back after every open and set
        self._vnet_hdr_size = _uapi.VIRTIO_NET_HDR_SIZE if flags & _uapi.IFF_VNET_HDR else 0
        self.link = Link(self)

    # ---- construction -----------------------------------------------------------------------
    @classmethod
    def create(
        cls,
        name: str = "mq%d",
        queues: int = 1,
        *,
        tap: bool = False,
        multi_queue: bool | None = None,
        vnet_hdr: bool = False,
        packet_info: bool = False,
        persist: bool = False,
        owner: int | str | None = None,
        group: int | str | None = None,
        blocking: bool = True,
        napi: bool = False,
        offloads: int | None = 0,
        carrier: bool | None = None,
    ) -> Device:
        """Create a new device with `queues` queues and return it (the real name in `.name`).

        A fixed name that already exists is refused (use `attach` for that). `multi_queue`
        defaults to True when more than one queue is asked for; without it the device can
        never take a second queue.
        """
        raw = validate_name(name)
        queues = _validate_queue_count(queues)
        if multi_queue is None:
            multi_queue = queues > 1
        if queues > 1 and not multi_queue:
            raise InvalidArgumentError(f"{queues} queues need multi_queue=True", device=name)
        uid, gid = _resolve_id(owner, "owner"), _resolve_id(group, "group")
        flags = cls._flags(tap, multi_queue, vnet_hdr, packet_info, napi)
        dev = cls(name, flags, blocking=blocking, created=True, offloads=offloads)
        try:
            # EXCL on the first queue makes "must not exist yet" atomic for fixed names.
            excl = _uapi.IFF_TUN_EXCL if "%" not in name and name else 0
            first = dev._open_queue(raw, flags | excl, op="create")
            dev._name = _query_name(first)
            if persist:
                first.ioctl(_uapi.TUNSETPERSIST, 1, "set_persist")
            if uid is not None:
                first.ioctl(_uapi.TUNSETOWNER, uid, "set_owner")
            if gid is not None:
                first.ioctl(_uapi.TUNSETGROUP, gid, "set_group")
            dev._apply_offloads()
            if carrier is not None:
                dev.set_carrier(carrier)
            for _ in range(queues - 1):
                dev.add_queue()
        except MqtunError as exc:
            dev._abort()
            if exc.errno == errno.EBUSY and exc.op == "create" and "%" not in name:
                _refuse_other_kind(name)
            raise
        except BaseException:
            dev._abort()
            raise
        return dev

    @classmethod
    def attach(
        cls,
        name: str,
        queues: int = 1,
        *,
        tap: bool | None = None,
        multi_queue: bool | None = None,
        vnet_hdr: bool | None = None,
        packet_info: bool | None = None,
        blocking: bool = True,
        offloads: int | None = None,
    ) -> Device:
        """Open `queues` queues on an existing device (in this network namespace).

        Each flag left as None adopts the device's own; a flag given explicitly must match the
        device, else FlagMismatchError (the kernel would silently keep the device's choice).
        The offload mask is device-wide, shared with every other holder: by default it is
        adopted as it is (see `offloads`); a mask given here is set for everyone.
        """
        raw = validate_name(name)
        if "%" in name or not name:
            raise InvalidArgumentError("attach needs the exact device name, not a pattern")
        queues = _validate_queue_count(queues)
        info = find_link(name)
        if info is None:
            raise MqtunError(
                errno.ENODEV,
                f"no tun/tap device named {name} in this network namespace; "
                f"create it first (`mqtun create {name}` or Device.create)",
                device=name, op="attach",
            )
        wanted = {"tap": tap, "multi_queue": multi_queue, "vnet_hdr": vnet_hdr,
                  "packet_info": packet_info}
        actual = {"tap": info.kind == "tap", "multi_queue": info.multi_queue,
                  "vnet_hdr": info.vnet_hdr, "packet_info": info.packet_info}
        _check_flags(name, wanted, actual)
        if queues > 1 and not info.multi_queue:
            raise FlagMismatchError(
                errno.EBUSY,
                f"device {name} exists without multiqueue, so it takes one queue only; "
                f"open it with queues=1 or delete and recreate it with multi_queue=True",
                device=name, op="attach",
            )
        flags = cls._flags(actual["tap"], actual["multi_queue"], actual["vnet_hdr"],
                           actual["packet_info"], False)
        dev = cls(name, flags, blocking=blocking, offloads=offloads)
        dev._active = [None] * (info.num_queues or 0)  # queues held by others come first
        op = "attach" if info.multi_queue else "attach_single"
        try:
            for _ in range(queues):
                dev._open_queue(raw, flags, op=op)
            dev._apply_offloads()
        except BaseException:
            dev._abort()
            raise
        return dev

    @classmethod
    def open_flags(
        cls, name: str, flags: int, *, path: str = _uapi.TUN_DEVICE_PATH, blocking: bool = True
    ) -> Device:
        """One TUNSETIFF with exactly `flags`: create the device, or attach if it exists.

        For code that speaks raw IFF_* bits (python-pytun's users, through mqtun.compat):
        nothing is added or checked but the name's length (the kernel would truncate it), so
        the kernel's own rules decide: IFF_TUN_EXCL on an existing name gives EBUSY, another
        type EINVAL, and a later queue's NO_PI/VNET_HDR bits are ignored. The flags the
        device really has are read back, so `packet_info` and `header_size` are true.
        Prefer create() and attach(), which refuse those surprises up front.
        """
        if not isinstance(name, str):
            raise InvalidArgumentError(f"device name must be a str, not {type(name).__name__}")
        raw = name.encode()
        if len(raw) >= _uapi.IFNAMSIZ:
            raise InvalidArgumentError(
                f"device name {name!r} is {len(raw)} bytes; Linux allows at most 15", device=name
            )
        dev = cls(name, flags & 0xFFFF & ~_uapi.IFF_TUN_EXCL, blocking=blocking, offloads=None)
        q = dev._open_queue(raw, flags & 0xFFFF, op="open_flags", path=path)
        try:
            dev._name = _query_name(q)
            info = find_link(dev._name)
            if info is not None:
                keep = dev.flags & ~(_uapi.IFF_TYPE_MASK | _uapi.IFF_MULTI_QUEUE
                                     | _uapi.IFF_VNET_HDR | _uapi.IFF_NO_PI)
                dev.flags = keep | cls._flags(info.kind == "tap", info.multi_queue,
                                              info.vnet_hdr, info.packet_info, False)
                dev._read_vnet_hdr_size(q)
                dev._active = [None] * max(0, (info.num_queues or 1) - 1) + [q]
        except BaseException:
            dev.close()
            raise
        return dev

    @staticmethod
    def _flags(tap: bool, multi_queue: bool, vnet_hdr: bool, packet_info: bool, napi: bool) -> int:
        flags = _uapi.IFF_TAP if tap else _uapi.IFF_TUN
        if multi_queue:
            flags |= _uapi.IFF_MULTI_QUEUE
        if vnet_hdr:
            flags |= _uapi.IFF_VNET_HDR
        if not packet_info:
            flags |= _uapi.IFF_NO_PI
        if napi:
            flags |= _uapi.IFF_NAPI
        return flags

    # ---- identity ---------------------------------------------------------------------------
    @property
    def name(self) -> str:
        """The device's name as the kernel knows it now (it follows renames).

        Raises DeviceGoneError once the device was deleted. After close() (no queue left to
        ask) it is the name the device had when its last queue closed.
        """
        if self.queues:
            self._name = _query_name(self.queues[0])
        return self._name

    @property
    def known_name(self) -> str:
        """The name as last seen, without asking the kernel: for messages, never raises."""
        return self._name

    @property
    def tap(self) -> bool:
        return bool(self.flags & _uapi.IFF_TAP)

    @property
    def kind(self) -> str:
        return "tap" if self.tap else "tun"

    @property
    def multi_queue(self) -> bool:
        return bool(self.flags & _uapi.IFF_MULTI_QUEUE)

    @property
    def vnet_hdr(self) -> bool:
        return bool(self.flags & _uapi.IFF_VNET_HDR)

    @property
    def packet_info(self) -> bool:
        return not self.flags & _uapi.IFF_NO_PI

    @property
    def header_size(self) -> int:
        """Bytes before each packet on a queue: packet-info (4) and/or virtio-net header."""
        return (_uapi.TUN_PI_SIZE if self.packet_info else 0) + self._vnet_hdr_size

    @property
    def max_queues(self) -> int:
        """How many queues the kernel lets this device have (IFLA_NUM_TX_QUEUES: 256 for a
        multiqueue device, 1 otherwise), active and disabled together."""
        return self.link.info().max_tx_queues

    @property
    def ifindex(self) -> int:
        return self.link.ifindex

    def info(self) -> LinkInfo:
        """The kernel's view of the device (flags, queue counts, state, counters)."""
        return self.link.info()

    # ---- queues -----------------------------------------------------------------------------
    @property
    def active_queues(self) -> list[Queue | None]:
        """Queues in kernel index order (None marks a queue some other process holds)."""
        return list(self._active)

    def queue(self, index: int) -> Queue:
        """The queue at kernel index `index` now ("which fd is queue i")."""
        q = self._active[index]
        if q is None:
            raise InvalidArgumentError(
                f"queue {index} of {self._name} is held by another process", device=self._name
            )
        return q

    def index_of(self, queue: Queue) -> int | None:
        """The kernel index of `queue` now (None while disabled, closed or not ours)."""
        for i, q in enumerate(self._active):
            if q is queue:
                return i
        return None

    def add_queue(self) -> Queue:
        """Open one more queue; it takes the next kernel index.

        The kernel's limit (256 queues, active and disabled, whoever holds them) gives E2BIG.
        """
        self._require_open()
        if not self.multi_queue:
            raise InvalidArgumentError(
                f"device {self._name} has no multiqueue: it takes one queue only; create it "
                f"with multi_queue=True to add queues", device=self._name, op="add_queue",
            )
        return self._open_queue(self.name.encode(), self.flags, op="add_queue")

    def remove_queue(self, queue: Queue) -> None:
        """Close one queue. The kernel moves its last active queue into the freed index."""
        self._own(queue)
        queue.close()

    def _open_queue(
        self, raw_name: bytes, flags: int, *, op: str, path: str = _uapi.TUN_DEVICE_PATH
    ) -> Queue:
        fd = _open_tun_fd(path)
        try:
            fcntl.ioctl(fd, _uapi.TUNSETIFF, _uapi.pack_ifreq(raw_name, flags))
        except OSError as exc:
            os.close(fd)
            raise kernel_error(exc, op, raw_name.decode()) from None
        q = Queue(self, fd)
        self.queues.append(q)
        self._active.append(q)
        self._ever_opened = True
        # the header size is device-wide: the first queue reads what the device has
        # (another holder may have set 12 or 24), later ones just follow it
        self._read_vnet_hdr_size(q)
        return q

    def _read_vnet_hdr_size(self, queue: Queue) -> None:
        """Take the virtio-net header size from the kernel (TUNGETVNETHDRSZ)."""
        if self.vnet_hdr:
            self._vnet_hdr_size = queue.ioctl_int(_uapi.TUNGETVNETHDRSZ, 0, "get_vnet_hdr_size")
        else:
            self._vnet_hdr_size = 0
        for q in self.queues:
            q.header_size = self.header_size

    def disable_queue(self, queue: Queue) -> None:
        """Detach `queue` (IFF_DETACH_QUEUE): see Queue.disable."""
        self._set_queue_enabled(queue, False)

    def enable_queue(self, queue: Queue) -> None:
        """Re-attach `queue` (IFF_ATTACH_QUEUE): see Queue.enable."""
        self._set_queue_enabled(queue, True)

    def _set_queue_enabled(self, queue: Queue, enable: bool) -> None:
        self._own(queue)
        op = "reattach" if enable else "detach"
        # the kernel first: a deleted device is DeviceGoneError (EBADFD), never "already ..."
        detached = bool(queue.flags & _uapi.IFF_DETACH_QUEUE)
        if not self.multi_queue:
            raise InvalidArgumentError(
                f"device {self._name} has no multiqueue: its queue cannot be "
                f"{'enabled' if enable else 'disabled'}", device=self._name, op=op,
            )
        if enable != detached:
            state = "enabled" if enable else "disabled"
            raise InvalidArgumentError(f"this queue of {self._name} is {state} already",
                                       device=self._name, op=op)
        flag = _uapi.IFF_ATTACH_QUEUE if enable else _uapi.IFF_DETACH_QUEUE
        try:
            queue.ioctl(_uapi.TUNSETQUEUE, _uapi.pack_ifreq(b"", flag), op)
        except MqtunError as exc:
            if exc.errno == errno.EINVAL:
                queue.flags  # noqa: B018 -- raises DeviceGoneError if deleted meanwhile
            raise
        if enable:
            self._active.append(queue)
        else:
            self._vacate(queue)

    def _vacate(self, queue: Queue) -> None:
        """Mirror the kernel: the last active queue moves into the slot `queue` leaves."""
        i = self.index_of(queue)
        if i is None:
            return
        last = self._active.pop()
        if last is not queue:
            self._active[i] = last

    def queue_closed(self, queue: Queue) -> None:
        """Queue.close() calls this once its fd is closed: the queue leaves every list here
        (and the kernel has moved the last active queue into its slot, if it had one)."""
        if not queue.closed or queue not in self.queues:
            return
        self._vacate(queue)
        self.queues.remove(queue)
        self._retired = self._retired + queue.stats

    def _own(self, queue: Queue) -> None:
        if queue.device is not self:
            raise InvalidArgumentError("that queue belongs to another device")

    # ---- single-queue convenience (python-pytun style) --------------------------------------
    def _only_queue(self) -> Queue:
        live = self.queues
        if len(live) != 1:
            raise InvalidArgumentError(
                f"device {self._name} has {len(live)} open queues; use dev.queues[i] "
                f"(read/write on the device itself are for single-queue use)"
            )
        return live[0]

    def fileno(self) -> int:
        return self._only_queue().fileno()

    def read(self, timeout: float | None = None) -> bytes | None:
        """Read one packet from the only queue (see Queue.read)."""
        return self._only_queue().read(timeout)

    def write(self, packet: BytesLike) -> int:
        """Write one packet to the only queue (see Queue.write)."""
        return self._only_queue().write(packet)

    # ---- device-wide settings ---------------------------------------------------------------
    def _control(self) -> Queue:
        """Any open queue: device-wide ioctls work on any attached fd."""
        if self.queues:
            return self.queues[0]
        raise MqtunError(errno.EBADF, f"device {self._name} is closed: this object holds no "
                         "queue (attach it again)", device=self._name)

    def _ioctl_int(self, request: int, value: int, op: str) -> int:
        return self._control().ioctl_int(request, value, op)

    def set_persist(self, persist: bool = True) -> None:
        """Keep the device when its last queue closes (TUNSETPERSIST)."""
        self._control().ioctl(_uapi.TUNSETPERSIST, int(bool(persist)), "set_persist")

    def set_owner(self, owner: int | str) -> None:
        """Let this user open queues without CAP_NET_ADMIN.

        The kernel cannot unset an owner once set (it refuses -1): recreate the device.
        """
        uid = _resolve_id(owner, "owner")
        if uid is None:
            raise InvalidArgumentError("an owner cannot be unset; recreate the device")
        self._control().ioctl(_uapi.TUNSETOWNER, uid, "set_owner")

    def set_group(self, group: int | str) -> None:
        """Let this group open queues without CAP_NET_ADMIN (cannot be unset either)."""
        gid = _resolve_id(group, "group")
        if gid is None:
            raise InvalidArgumentError("a group cannot be unset; recreate the device")
        self._control().ioctl(_uapi.TUNSETGROUP, gid, "set_group")

    def set_carrier(self, on: bool) -> None:
        """Carrier on/off (TUNSETCARRIER): off makes the link look unplugged."""
        self._ioctl_int(_uapi.TUNSETCARRIER, int(bool(on)), "set_carrier")

    def set_link_type(self, arphrd: int) -> None:
        """ARPHRD type of a TUN device (EBUSY while up)."""
        self._control().ioctl(_uapi.TUNSETLINK, arphrd, "set_link_type")

    @property
    def offloads(self) -> int:
        """The TUN_F_* mask the device has now, whoever set it.

        The kernel has no getter for TUNSETOFFLOAD: the mask is read back from the device
        features it turns on (the ethtool features: checksum, TSO, USO, tunnel GSO). TUN_F_UFO
        has no feature (the kernel ignores it) and never shows.
        """
        return self.link.offloads()

    def set_offloads(self, mask: int) -> None:
        """Set the device-wide TUN_F_* offload mask (TUNSETOFFLOAD)."""
        if not isinstance(mask, int) or mask < 0:
            raise InvalidArgumentError(f"offload mask must be a non-negative int: {mask!r}")
        self._control().ioctl(_uapi.TUNSETOFFLOAD, mask, "set_offload")
        self._offloads = mask

    def _apply_offloads(self) -> None:
        if self._offloads is not None:
            self.set_offloads(self._offloads)

    @property
    def vnet_hdr_size(self) -> int:
        """Size of the virtio-net header before each packet (0 without IFF_VNET_HDR).

        Device-wide in the kernel: read with TUNGETVNETHDRSZ whenever this object opens a
        queue or sets the size (`refresh_vnet_hdr_size()` reads it again, e.g. after another
        holder changed it). Not read on every access: a forked worker holds only some of
        the fds, and the property must not reach one it closed.
        """
        return self._vnet_hdr_size

    def refresh_vnet_hdr_size(self) -> int:
        """Read the virtio-net header size from the kernel again and return it."""
        self._read_vnet_hdr_size(self._control())
        return self._vnet_hdr_size

    def set_vnet_hdr_size(self, size: int) -> None:
        """10, 12 (num_buffers) or 24 (v1 hash/tunnel) bytes; the kernel takes >= 10."""
        if not self.vnet_hdr:
            raise InvalidArgumentError(f"device {self._name} has no virtio-net header")
        if not isinstance(size, int) or size < _uapi.VNET_HDR_MIN_SIZE:
            raise InvalidArgumentError(f"virtio-net header size must be >= 10, not {size!r}")
        control = self._control()
        control.ioctl_int(_uapi.TUNSETVNETHDRSZ, size, "set_vnet_hdr_size")
        self._read_vnet_hdr_size(control)

    def set_vnet_le(self, little_endian: bool) -> None:
        """Force a little-endian virtio-net header (virtio 1.0) regardless of the host."""
        self._control().ioctl(_uapi.TUNSETVNETLE, struct.pack("i", int(little_endian)),
                               "set_vnet_le")

    @property
    def vnet_le(self) -> bool:
        return bool(self._ioctl_int(_uapi.TUNGETVNETLE, 0, "get_vnet_le"))

    @property
    def sndbuf(self) -> int:
        return self._ioctl_int(_uapi.TUNGETSNDBUF, 0, "get_sndbuf")

    def set_sndbuf(self, size: int) -> None:
        if not isinstance(size, int) or size <= 0:
            raise InvalidArgumentError(f"send buffer size must be positive: {size!r}")
        self._control().ioctl(_uapi.TUNSETSNDBUF, struct.pack("i", size), "set_sndbuf")

    def set_steering_program(self, program: _HasFileno | int | None) -> None:
        """Attach an eBPF steering program (its fd or an object with fileno()); None detaches.

        Attaching replaces the previous program in one step. queue = return value % queues.
        """
        fd = _prog_fd(program)
        self._control().ioctl(_uapi.TUNSETSTEERINGEBPF, struct.pack("i", fd), "set_steering")
        self.steering_program = program

    def set_filter_program(self, program: _HasFileno | int | None) -> None:
        """Attach an eBPF filter: it returns 0 to drop a packet or N < len to trim it."""
        fd = _prog_fd(program)
        self._control().ioctl(_uapi.TUNSETFILTEREBPF, struct.pack("i", fd), "set_filter")
        self.filter_program = program

    def attach_classic_filter(self, instructions: bytes) -> None:
        """Attach a classic BPF program (packed sock_filter array) to a TAP device."""
        if not self.tap:
            raise InvalidArgumentError("a classic BPF filter only applies to TAP devices")
        if not instructions or len(instructions) % 8:
            raise InvalidArgumentError("classic BPF program must be a non-empty multiple of 8")
        import ctypes

        buf = ctypes.create_string_buffer(instructions, len(instructions))
        fprog = struct.pack(_uapi.SOCK_FPROG_FORMAT, len(instructions) // 8,
                            ctypes.addressof(buf))
        self._control().ioctl(_uapi.TUNATTACHFILTER, fprog, "attach_classic_filter")

    @property
    def classic_filter(self) -> ClassicFilter:
        """The classic BPF filter as the kernel reports it (see `ClassicFilter`)."""
        if not self.tap:
            return ClassicFilter(0, False)
        try:
            return read_classic_filter(self._control().fileno(), packet_info=self.packet_info)
        except OSError as exc:
            raise kernel_error(exc, "get_classic_filter", self._name) from None

    def detach_classic_filter(self) -> None:
        self._control().ioctl(_uapi.TUNDETACHFILTER, b"\0" * 16, "detach_classic_filter")

    def set_tx_filter(self, macs: Sequence[bytes | str], *, allmulti: bool = False) -> None:
        """Accept only frames to these destination MACs (TAP; an empty list removes it)."""
        from mqtun.steer.filters import pack_tx_filter  # the one packer (and its model)

        if not self.tap:
            raise InvalidArgumentError("a MAC (TX) filter only applies to TAP devices")
        self._control().ioctl(_uapi.TUNSETTXFILTER, pack_tx_filter(macs, allmulti),
                              "set_txfilter")

    def netns_fd(self) -> int:
        """A new fd of the network namespace the device lives in now (TUNGETDEVNETNS).

        The caller closes it.
        """
        return int(self._control().ioctl(_uapi.TUNGETDEVNETNS, 0, "get_netns"))

    # ---- counters ---------------------------------------------------------------------------
    def stats(self) -> QueueStats:
        """Sum of the counters of every queue this object held (the closed ones too)."""
        return total([self._retired, *(q.stats for q in self.queues)])

    # ---- lifecycle --------------------------------------------------------------------------
    @property
    def closed(self) -> bool:
        """True once every queue this object opened is closed."""
        return not self.queues

    def _require_open(self) -> None:
        if self._ever_opened and self.closed:
            raise MqtunError(errno.EBADF, f"device {self._name} is closed", device=self._name)

    def close(self) -> None:
        """Close every queue we hold. A non-persistent device then disappears."""
        for q in reversed(list(self.queues)):
            q.close()
        self.link.close()

    def delete(self) -> None:
        """Remove the device even if it is persistent or others hold queues.

        It is deleted in whatever namespace it is in now; a device already gone is no error.
        """
        if self.closed:
            return
        try:
            self.set_persist(False)
            self.link.delete()
        except DeviceGoneError:
            pass
        finally:
            self.close()

    def _abort(self) -> None:
        """Undo a half-done create/attach: nothing half-made is left behind."""
        if self.created:
            with contextlib.suppress(MqtunError):
                self.set_persist(False)
        self.close()

    def __enter__(self) -> Device:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<Device {self._name} {self.kind} queues={len(self.queues)}>"

    def __iter__(self) -> Iterable[Queue]:
        return iter(self.queues)


def _query_name(queue: Queue) -> str:
    """The device's name as the kernel reports it on `queue` (TUNGETIFF)."""
    out = queue.ioctl(_uapi.TUNGETIFF, bytes(_uapi.IFREQ_SIZE), "get_name")
    return _uapi.unpack_ifreq(out)[0]  # type: ignore[arg-type]


def _check_flags(name: str, wanted: dict[str, bool | None], actual: dict[str, bool]) -> None:
    words = {"tap": ("a TAP", "a TUN"), "multi_queue": ("multiqueue", "single-queue"),
             "vnet_hdr": ("with a virtio-net header", "without a virtio-net header"),
             "packet_info": ("with packet info", "without packet info")}
    for key, want in wanted.items():
        if want is not None and bool(want) != actual[key]:
            has = words[key][0 if actual[key] else 1]
            raise FlagMismatchError(
                errno.EINVAL,
                f"device {name} is {has}, not as asked ({key}={want}); open it with "
                f"{key}={actual[key]} or leave {key} unset to adopt it",
                device=name, op="attach",
            )


def _refuse_other_kind(name: str) -> None:
    """EBUSY on create also means "a link of another kind has that name": say which."""
    try:
        find_link(name)
    except InvalidArgumentError as other:
        raise InvalidArgumentError(f"cannot create {name}: {other}; choose another name",
                                   device=name, op="create") from None


def _prog_fd(program: _HasFileno | int | None) -> int:
    if program is None:
        return -1
    if isinstance(program, int):
        return program
    return program.fileno()

