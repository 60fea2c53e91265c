"""python-pytun's API on mqtun: switch by changing one import.

    from mqtun.compat import pytun      # was: import pytun

`TunTapDevice`, the `IFF_*` constants and `Error` behave as python-pytun 2.4 does on Linux,
down to the exception types and errnos, so that code written for it keeps working; the
differential test (tests/test_compat_pytun.py) runs one script against both and compares.
What that takes, and why:

- The flags go to TUNSETIFF exactly as given (`Device.open_flags`): a TUN device keeps its
  4-byte packet-info header unless IFF_NO_PI is passed, an existing name is attached to, and
  the kernel alone decides EBUSY/EINVAL.
- The fd is in blocking mode, as python-pytun's is: `os.read(tun.fileno(), n)` blocks, and
  code that sets O_NONBLOCK itself gets `Error(EAGAIN)` from `read`. A blocking `read` waits
  in mqtun's poll, so a `close()` from another thread wakes it (python-pytun stays blocked).
- `addr`, `dstaddr`, `netmask`, `mtu`, `hwaddr`, `up()` and `down()` work by name in the
  caller's network namespace, even after `close()` while the device exists, as python-pytun's
  SIOC* ioctls do. They go through netlink and reproduce what those ioctls do to the kernel's
  state: they act on the first IPv4 address labelled with the device's name, a new address
  gets a /32 on TUN (point-to-point) and its classful prefix and broadcast on TAP, and so on.

Beyond python-pytun (what its users asked for), without changing any of the above:
`add_address()` / `remove_address()` / `addresses` for IPv6 (and IPv4) addresses, `owner` and
`group`, a `read` that `close()` wakes, a context manager, and `device` / `queue`: the full
mqtun objects underneath. Their fd is the same blocking one: call
`os.set_blocking(tun.fileno(), False)` before using mqtun's read timeouts on `tun.queue`.

`read()` and `write()` are one system call each, as python-pytun's C functions are, and so are
not counted in mqtun's per-queue statistics (`tun.queue.stats`): python-pytun kept none, and the
count measured 8% of a select() forwarder's time. The kernel's link statistics count them.
"""

from __future__ import annotations

import contextlib
import errno
import operator
import os
import socket
from collections.abc import Iterator
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, Final, NoReturn

from pyroute2.netlink.exceptions import NetlinkError  # type: ignore[import-untyped]

from mqtun import _uapi
from mqtun.device import Device
from mqtun.link import find_link, netlink
from mqtun.packet import accel

if TYPE_CHECKING:
    from pyroute2 import IPRoute  # type: ignore[import-untyped]

    from mqtun.queue import Queue

__all__ = [
    "IFF_MULTI_QUEUE",
    "IFF_NO_PI",
    "IFF_ONE_QUEUE",
    "IFF_TAP",
    "IFF_TUN",
    "IFF_TUN_EXCL",
    "IFF_VNET_HDR",
    "Error",
    "TunTapDevice",
]

IFF_TUN: Final = _uapi.IFF_TUN
IFF_TAP: Final = _uapi.IFF_TAP
IFF_NO_PI: Final = _uapi.IFF_NO_PI
IFF_ONE_QUEUE: Final = _uapi.IFF_ONE_QUEUE
IFF_VNET_HDR: Final = _uapi.IFF_VNET_HDR
IFF_TUN_EXCL: Final = _uapi.IFF_TUN_EXCL
IFF_MULTI_QUEUE: Final = _uapi.IFF_MULTI_QUEUE

# net_device flags (include/uapi/linux/if.h) that decide what SIOCSIFADDR does
_IFF_UP: Final = _uapi.IFF_UP
_IFF_BROADCAST: Final = _uapi.IFF_BROADCAST
_IFF_POINTOPOINT: Final = _uapi.IFF_POINTOPOINT
_RT_SCOPE_HOST: Final = _uapi.RT_SCOPE_HOST
_ALL_ONES: Final = 0xFFFFFFFF
_INT_MIN, _INT_MAX = -(2**31), 2**31 - 1


class Error(OSError):
    """python-pytun's exception: args are (errno, strerror) for a failed system call, as
    OSError's, or (message,) for an argument python-pytun itself refuses."""


def _errno_error(err: int) -> Error:
    return Error(err, os.strerror(err))


def _error(exc: OSError) -> Error:
    """The Error python-pytun raises for the same errno (mqtun's own message stays as cause)."""
    return _errno_error(exc.errno or errno.EIO)


# ---- argument parsing as CPython's PyArg_Parse* does it for python-pytun's C functions ----------
def _c_string(value: object, position: int) -> bytes:
    """The "s" format: a str without NUL, UTF-8 encoded."""
    if not isinstance(value, str):
        raise TypeError(f"argument {position} must be str, not {type(value).__name__}")
    raw = value.encode()
    if b"\0" in raw:
        raise ValueError("embedded null character")
    return raw


def _c_int(value: object) -> int:
    """The "i" format: an integer that fits a C int, else OverflowError."""
    number = operator.index(value)  # type: ignore[arg-type]
    if number > _INT_MAX:
        raise OverflowError("signed integer is greater than maximum")
    if number < _INT_MIN:
        raise OverflowError("signed integer is less than minimum")
    return number


def _c_bool(value: object, function: str) -> bool:
    """The "O!" format with PyBool_Type: True or False only."""
    if not isinstance(value, bool):
        raise TypeError(f"{function}() argument 1 must be bool, not {type(value).__name__}")
    return value


def _inet_aton(value: object) -> int:
    """An IPv4 address the way python-pytun reads one: ASCII, up to a NUL, inet_aton(3)."""
    if not isinstance(value, str):
        raise TypeError("bad argument type for built-in operation")
    text = value.encode("ascii").split(b"\0", 1)[0].decode("ascii")
    try:
        return int.from_bytes(socket.inet_aton(text), "big")
    except OSError:
        raise Error("Bad IP address") from None


def _ntoa(addr: int) -> str:
    return socket.inet_ntoa(addr.to_bytes(4, "big"))


def _mask(prefixlen: int) -> int:
    return (_ALL_ONES << (32 - prefixlen)) & _ALL_ONES


def _classful_prefix(addr: int) -> int:
    """inet_abc_len(): the prefix SIOCSIFADDR gives an address (-1: refused, multicast)."""
    if addr >> 24 == 0 or addr == _ALL_ONES:
        return 0
    for prefix, top, bits in ((8, 0x0, 0x80), (16, 0x80, 0xC0), (24, 0xC0, 0xE0)):
        if (addr >> 24) & bits == top:
            return prefix
    return 32 if addr >> 28 == 0xF else -1


# ---- the SIOC* address ioctls, reproduced over netlink ------------------------------------------
@dataclass(frozen=True)
class _Ifa:
    """One IPv4 address as devinet_ioctl sees it (struct in_ifaddr)."""

    local: int
    address: int  # the peer on a point-to-point link, else the same as local
    prefixlen: int
    broadcast: int | None
    scope: int
    label: str


@contextlib.contextmanager
def _rtnl() -> Iterator[IPRoute]:
    """Netlink in the caller's namespace; a kernel refusal becomes Error(errno)."""
    try:
        with netlink() as ipr:
            yield ipr
    except NetlinkError as exc:
        raise _errno_error(exc.code) from exc


def _link(ipr: IPRoute, name: str) -> Any:
    found = ipr.link_lookup(ifname=name)
    if not found:
        raise _errno_error(errno.ENODEV)
    return ipr.get_links(found[0])[0]


def _first_ifa(ipr: IPRoute, index: int, name: str) -> _Ifa | None:
    """The address the ioctls act on: the first IPv4 address labelled with the name."""
    for msg in ipr.get_addr(family=socket.AF_INET, index=index):
        if msg.get_attr("IFA_LABEL") != name:
            continue
        local = msg.get_attr("IFA_LOCAL") or msg.get_attr("IFA_ADDRESS")
        bcast = msg.get_attr("IFA_BROADCAST")
        return _Ifa(
            local=_aton_plain(local),
            address=_aton_plain(msg.get_attr("IFA_ADDRESS") or local),
            prefixlen=msg["prefixlen"],
            broadcast=None if bcast is None else _aton_plain(bcast),
            scope=msg["scope"],
            label=name,
        )
    return None


def _aton_plain(text: str) -> int:
    return int.from_bytes(socket.inet_aton(text), "big")


def _ifa_args(index: int, ifa: _Ifa) -> dict[str, Any]:
    return {"index": index, "family": socket.AF_INET, "local": _ntoa(ifa.local),
            "address": _ntoa(ifa.address), "prefixlen": ifa.prefixlen, "label": ifa.label}


def _replace_ifa(ipr: IPRoute, index: int, old: _Ifa | None, new: _Ifa | None) -> None:
    """inet_del_ifa() then inet_insert_ifa(): the ioctls change an address by re-adding it."""
    if old is not None:
        ipr.addr("del", **_ifa_args(index, old))
    if new is not None and new.local != 0:  # the kernel drops a 0.0.0.0 address on insert
        args = _ifa_args(index, new)
        args["scope"] = new.scope
        if new.broadcast is not None:
            args["broadcast"] = _ntoa(new.broadcast)
        ipr.addr("add", **args)


def _get_ifa(name: str) -> _Ifa:
    with _rtnl() as ipr:
        ifa = _first_ifa(ipr, _link(ipr, name)["index"], name)
    if ifa is None:
        raise _errno_error(errno.EADDRNOTAVAIL)
    return ifa


def _set_addr(name: str, addr: int) -> None:
    """SIOCSIFADDR: replace the address; /32 on point-to-point, else classful + broadcast."""
    with _rtnl() as ipr:
        link = _link(ipr, name)
        index, flags = link["index"], link["flags"]
        old = _first_ifa(ipr, index, name)
        prefix = _classful_prefix(addr)
        if prefix < 0:
            raise _errno_error(errno.EINVAL)
        if old is not None and old.local == addr:
            return
        broadcast = None
        if flags & _IFF_POINTOPOINT:
            prefix = 32
        elif flags & _IFF_BROADCAST and prefix < 31:
            broadcast = addr | (~_mask(prefix) & _ALL_ONES)
        scope = _RT_SCOPE_HOST if addr >> 24 == 127 else 0
        new = _Ifa(addr, addr, prefix, broadcast, scope, old.label if old else name)
        _replace_ifa(ipr, index, old, new)


def _set_dstaddr(name: str, addr: int) -> None:
    """SIOCSIFDSTADDR: the peer address of the first address."""
    with _rtnl() as ipr:
        index = _link(ipr, name)["index"]
        old = _first_ifa(ipr, index, name)
        if old is None:
            raise _errno_error(errno.EADDRNOTAVAIL)
        if old.address == addr:
            return
        if _classful_prefix(addr) < 0:
            raise _errno_error(errno.EINVAL)
        _replace_ifa(ipr, index, old, replace(old, address=addr))


def _set_netmask(name: str, mask: int) -> None:
    """SIOCSIFNETMASK: a contiguous mask; the broadcast follows if it was the default one."""
    with _rtnl() as ipr:
        link = _link(ipr, name)
        index, flags = link["index"], link["flags"]
        old = _first_ifa(ipr, index, name)
        if old is None:
            raise _errno_error(errno.EADDRNOTAVAIL)
        inverse = ~mask & _ALL_ONES
        if inverse & (inverse + 1):
            raise _errno_error(errno.EINVAL)
        old_mask = _mask(old.prefixlen)
        if mask == old_mask:
            return
        prefix = bin(mask).count("1")
        broadcast = old.broadcast
        default_bcast = old.local | (~old_mask & _ALL_ONES)
        if flags & _IFF_BROADCAST and prefix < 31 and (broadcast or 0) == default_bcast:
            broadcast = old.local | inverse
        _replace_ifa(ipr, index, old, replace(old, prefixlen=prefix, broadcast=broadcast))


def _link_attr(name: str, attr: str) -> Any:
    with _rtnl() as ipr:
        return _link(ipr, name).get_attr(attr)


def _set_link(name: str, **kwargs: Any) -> None:
    with _rtnl() as ipr:
        ipr.link("set", index=_link(ipr, name)["index"], **kwargs)


def _set_up(name: str, up: bool) -> None:
    """SIOCGIFFLAGS then SIOCSIFFLAGS only if IFF_UP has to change."""
    with _rtnl() as ipr:
        link = _link(ipr, name)
        if bool(link["flags"] & _IFF_UP) != up:
            ipr.link("set", index=link["index"], state="up" if up else "down")


def _write_argument(data: object) -> bytes:
    """What python-pytun's "s#" write takes besides bytes: a str (as UTF-8), a bytes subclass."""
    if isinstance(data, str):
        return data.encode()
    if isinstance(data, bytes):
        return data
    try:
        memoryview(data)  # type: ignore[arg-type]
    except TypeError:
        raise TypeError(
            f"a bytes-like object is required, not '{type(data).__name__}'") from None
    raise TypeError("write() argument 1 must be read-only bytes-like object, "
                    f"not {type(data).__name__}")


_RWF_NOWAIT: Final = os.RWF_NOWAIT
# read()'s kept buffer: the size asked, the one-element iovec list preadv takes, a view to copy out
_Held = tuple[int, list[bytearray], memoryview]
# a read's errnos that mean "nothing to read now" (EOPNOTSUPP: no RWF_NOWAIT for this fd)
_WAIT_ERRNOS: Final = frozenset((errno.EAGAIN, errno.EINTR, errno.EOPNOTSUPP))


class _QueueFilePython:
    """`fileno`/`read`/`write` in Python, where mqtun._reads is not built: the twin of its C
    `QueueFile`, doing the same common case in one frame and one syscall each (a queued packet
    read into the buffer kept from the last read of this size, one bytes object written) and
    leaving the rest to TunTapDevice's `_read_slow`/`_write_slow`/`_failed`. A failed syscall
    is not retried: a read the kernel refused (EINVAL, a buffer shorter than the packet info)
    has dropped its packet already."""

    __slots__ = ("_held", "_queue")
    _queue: Queue | None
    _held: _Held | None  # read()'s buffer, kept between reads

    def fileno(self) -> int:
        """The queue's fd; -1 once closed (python-pytun's loops test for that)."""
        q = self._queue  # select() asks on every call: a closed queue's fd is already -1
        return -1 if q is None else q.fd

    def read(self, size: int, /) -> bytes:
        """read(size) -> at most size bytes of one packet (the rest of it is dropped).

        Blocks on a blocking fd until a packet arrives or close() is called from another
        thread (then Error(EBADF)); on an fd set to O_NONBLOCK, Error(EAGAIN) if none is queued.
        """
        held, self._held = self._held, None  # a second thread reading meanwhile makes its own
        if held is None or held[0] != size:
            self._held = held
            return self._read_slow(size)
        try:
            got = os.preadv(self._queue.fd, held[1], -1, _RWF_NOWAIT)  # type: ignore[union-attr]
        except OSError as exc:
            self._held = held
            if exc.errno in _WAIT_ERRNOS:  # nothing queued: the slow path waits or says so
                return self._read_slow(size)
            return self._failed(exc.errno or errno.EIO)  # not retried: the packet is gone
        data = held[2][:got].tobytes()
        self._held = held
        return data

    def write(self, data: str | bytes, /) -> int:
        """write(data) -> number of bytes written: one packet (a str is written as UTF-8)."""
        if type(data) is not bytes:
            return self._write_slow(data)
        try:  # a closed queue's fd is -1, so EBADF
            return os.write(self._queue.fd, data)  # type: ignore[union-attr]
        except OSError as exc:
            return self._failed(exc.errno or errno.EIO)

    # TunTapDevice's, as for QueueFile: everything but the common case
    def _read_slow(self, size: int, /) -> bytes:
        raise NotImplementedError

    def _write_slow(self, data: object, /) -> int:
        raise NotImplementedError

    def _failed(self, err: int, /) -> NoReturn:
        raise NotImplementedError


try:
    from mqtun._reads import QueueFile as _QueueFileC
except ImportError:  # built without a C compiler
    _QueueFileC = None  # type: ignore[assignment, misc]

if TYPE_CHECKING:
    _QueueFile = _QueueFilePython
else:  # python-pytun's fd methods as C methods where built: see mqtun/_reads.c
    _QueueFile = (_QueueFileC if _QueueFileC is not None and accel.ACCELERATE
                  else _QueueFilePython)


# ---- the device ---------------------------------------------------------------------------------
class TunTapDevice(_QueueFile):
    """TunTapDevice(name='', flags=IFF_TUN, dev='/dev/net/tun') -> TUN/TAP device object.

    One queue (fd) of a tun/tap device, created or attached by one TUNSETIFF with `flags`.
    `fileno`, `read` and `write` come from `_QueueFile`: C methods where mqtun._reads is built.
    """

    __slots__ = ("_device", "_name")

    def __init__(self, name: str = "", flags: int = IFF_TUN,
                 dev: str = _uapi.TUN_DEVICE_PATH) -> None:
        self._queue = None  # so that __del__ of a failed construction is safe
        self._held = None  # read()'s buffer, kept between reads (the slow path's)
        raw = _c_string(name, 1)
        flags = _c_int(flags)
        path = _c_string(dev, 3).decode()
        if not flags & (IFF_TUN | IFF_TAP):
            raise Error("Bad flags: either IFF_TUN or IFF_TAP must be set")
        if flags & IFF_TUN and flags & IFF_TAP:
            raise Error("Bad flags: IFF_TUN and IFF_TAP could not both be set")
        if len(raw) >= _uapi.IFNAMSIZ:
            raise Error("Interface name too long")
        try:
            device = Device.open_flags(name, flags, path=path)
        except OSError as exc:
            raise _error(exc) from exc
        self._device = device
        self._queue = device.queues[0]  # from here on, __del__ closes it
        self._name = device.name
        os.set_blocking(self._queue.fd, True)  # python-pytun's fd blocks: see the docstring

    # ---- python-pytun's attributes (by name, in the caller's namespace) -----------------------
    @property
    def name(self) -> str:
        """The name the kernel gave at creation (kept after close, as python-pytun does)."""
        return self._name

    @property
    def addr(self) -> str:
        return _ntoa(_get_ifa(self._name).local)

    @addr.setter
    def addr(self, value: str) -> None:
        _set_addr(self._name, _inet_aton(value))

    @property
    def dstaddr(self) -> str:
        return _ntoa(_get_ifa(self._name).address)

    @dstaddr.setter
    def dstaddr(self, value: str) -> None:
        _set_dstaddr(self._name, _inet_aton(value))

    @property
    def netmask(self) -> str:
        return _ntoa(_mask(_get_ifa(self._name).prefixlen))

    @netmask.setter
    def netmask(self, value: str) -> None:
        _set_netmask(self._name, _inet_aton(value))

    @property
    def mtu(self) -> int:
        return int(_link_attr(self._name, "IFLA_MTU"))

    @mtu.setter
    def mtu(self, value: int) -> None:
        number = operator.index(value)
        if not -(2**63) <= number < 2**63:
            raise OverflowError("Python int too large to convert to C long")
        mtu = (number + 2**31) % 2**32 - 2**31  # stored in a C int, as python-pytun does
        if mtu <= 0:
            raise Error("Bad MTU, should be > 0")
        _set_link(self._name, mtu=mtu)

    @property
    def hwaddr(self) -> bytes:
        """Six bytes; zeros on a TUN device, which has no hardware address."""
        mac = _link_attr(self._name, "IFLA_ADDRESS")
        raw = bytes.fromhex(mac.replace(":", "")) if mac else b""
        return raw[: _uapi.ETH_ALEN].ljust(_uapi.ETH_ALEN, b"\0")

    @hwaddr.setter
    def hwaddr(self, value: bytes) -> None:
        if not isinstance(value, bytes):
            raise TypeError(f"expected bytes, {type(value).__name__} found")
        if len(value) != _uapi.ETH_ALEN:
            raise Error("Bad MAC address")
        _set_link(self._name, address=value.hex(":"))

    def up(self) -> None:
        """up() -> None. Bring up the device."""
        _set_up(self._name, True)

    def down(self) -> None:
        """down() -> None. Bring down the device."""
        _set_up(self._name, False)

    # ---- python-pytun's fd methods: fileno, read, write in _QueueFile; these are the rest ----
    def _read_slow(self, size: int, /) -> bytes:
        """read() for what the one-syscall path does not do: a new size, a wait, an error."""
        n = operator.index(size) & _ALL_ONES  # the "I" format masks, it does not check
        held, self._held = self._held, None
        q = self._queue
        if q is None or q.closed:
            raise _errno_error(errno.EBADF)
        try:
            if n == 0:
                return os.read(q.fd, 0)  # the kernel still checks that the device exists
            if held is None or len(held[2]) != n:
                scratch = bytearray(n)  # zeroing a fresh 64 KiB per packet costs more than a read
                held = (size, [scratch], memoryview(scratch))
            while True:
                try:
                    got = q._read_nowait(held[1][0])  # RWF_NOWAIT, or poll first
                    break
                except BlockingIOError:
                    if not os.get_blocking(q.fd):
                        raise
                q.wait_readable()  # a blocking fd: wait here, where a close() wakes it
            data = held[2][:got].tobytes()
            self._held = held
        except OSError as exc:
            raise _error(exc) from exc
        return data

    def _write_slow(self, data: object, /) -> int:
        """write() of what is not a bytes object: a str, a bytes subclass (or a TypeError)."""
        try:  # a closed queue's fd is -1, so EBADF
            return os.write(self._queue.fd, _write_argument(data))  # type: ignore[union-attr]
        except OSError as exc:
            raise _error(exc) from exc

    def _failed(self, err: int, /) -> NoReturn:
        """The Error python-pytun raises for a read or write that failed with `err`."""
        raise _errno_error(err)

    def close(self) -> None:
        """close() -> None. Close the fd (a non-persistent device then disappears)."""
        if self._queue is not None:
            self._queue.close()

    def persist(self, flag: bool = True, /) -> None:
        """persist(flag) -> None. Keep the device after the last close (TUNSETPERSIST)."""
        flag = _c_bool(flag, "persist")
        self._live()
        try:
            self._device.set_persist(flag)
        except OSError as exc:
            raise _error(exc) from exc

    def mq_attach(self, flag: bool = True, /) -> None:
        """mq_attach(flag) -> None. Re-enable (True) or disable (False) this queue."""
        flag = _c_bool(flag, "attach")
        q = self._live()
        try:
            if flag:
                q.enable()
            else:
                q.disable()
        except OSError as exc:
            raise _error(exc) from exc

    # ---- beyond python-pytun --------------------------------------------------------------------
    @property
    def device(self) -> Device:
        """The mqtun Device underneath (holding this one queue)."""
        return self._device

    @property
    def queue(self) -> Queue:
        """The mqtun Queue underneath; its fd is in blocking mode unless you change it."""
        assert self._queue is not None
        return self._queue

    @property
    def owner(self) -> int | None:
        """The uid allowed to open queues without CAP_NET_ADMIN (None: not set)."""
        return self._tun_info("owner")

    @owner.setter
    def owner(self, value: int | str) -> None:
        self._live()
        try:
            self._device.set_owner(value)
        except OSError as exc:
            raise _error(exc) from exc

    @property
    def group(self) -> int | None:
        """The gid allowed to open queues without CAP_NET_ADMIN (None: not set)."""
        return self._tun_info("group")

    @group.setter
    def group(self, value: int | str) -> None:
        self._live()
        try:
            self._device.set_group(value)
        except OSError as exc:
            raise _error(exc) from exc

    def add_address(self, cidr: str, peer: str | None = None) -> None:
        """Add an IPv6 or IPv4 address with its prefix, e.g. "fd00::1/64" (peer: p2p)."""
        self._link_call(lambda: self._device.link.add_address(cidr, peer))

    def remove_address(self, cidr: str) -> None:
        self._link_call(lambda: self._device.link.remove_address(cidr))

    @property
    def addresses(self) -> list[str]:
        """Every address of the device, IPv4 and IPv6, as "address/prefix"."""
        return list(self._link_call(self._device.link.addresses))

    def __enter__(self) -> TunTapDevice:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        # python-pytun closes the fd when the object goes away; so do we
        with contextlib.suppress(Exception):
            self.close()

    def __repr__(self) -> str:
        return f"<mqtun.compat.pytun.TunTapDevice {self._name} fd={self.fileno()}>"

    # ---- internals ------------------------------------------------------------------------------
    def _live(self) -> Queue:
        """The open queue, or the EBADF python-pytun gets from its closed fd (-1)."""
        q = self._queue
        if q is None or q.closed:
            raise _errno_error(errno.EBADF)
        return q

    def _link_call(self, fn: Any) -> Any:
        self._live()
        try:
            return fn()
        except OSError as exc:
            raise _error(exc) from exc

    def _tun_info(self, field: str) -> int | None:
        try:
            info = find_link(self._name)
        except OSError as exc:
            raise _error(exc) from exc
        if info is None:
            raise _errno_error(errno.ENODEV)
        value: int | None = getattr(info, field)
        return value
