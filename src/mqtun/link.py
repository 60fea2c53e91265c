"""The link side of a device, through netlink (pyroute2): state, MTU, addresses, counters.

Creating a tun device over rtnetlink is refused by the kernel, so creation is ioctl-only
(device.py); everything a user does to the link after that goes through pyroute2 here, in the
network namespace the device lives in *now* (the kernel tells us with TUNGETDEVNETNS), so a
device moved to another namespace keeps working.
"""

from __future__ import annotations

import contextlib
import errno
import ipaddress
import os
import socket
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

from pyroute2 import IPRoute  # type: ignore[import-untyped]
from pyroute2.netlink.exceptions import NetlinkError  # type: ignore[import-untyped]

from mqtun import _uapi
from mqtun.errors import InvalidArgumentError, MqtunError, PermissionDeniedError, kernel_error
from mqtun.netns import entered_fd

if TYPE_CHECKING:
    from mqtun.device import Device

__all__ = ["Link", "LinkInfo", "delete_link", "find_link", "list_tun_links", "netlink"]


@dataclass(frozen=True)
class LinkInfo:
    """What the kernel reports of a tun/tap link (IFLA_TUN_* and the generic link fields)."""

    name: str
    ifindex: int
    kind: str  # "tun" or "tap"
    packet_info: bool
    vnet_hdr: bool
    persist: bool
    multi_queue: bool
    num_queues: int | None  # None: the kernel reports counts for multiqueue devices only
    num_disabled_queues: int | None
    max_tx_queues: int  # IFLA_NUM_TX_QUEUES: the kernel's limit (256 multiqueue, else 1)
    max_rx_queues: int  # IFLA_NUM_RX_QUEUES
    owner: int | None
    group: int | None
    mtu: int
    txqueuelen: int
    up: bool
    carrier: bool
    operstate: str
    hwaddr: str | None
    addresses: list[str] = field(default_factory=list)
    stats: dict[str, int] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@contextlib.contextmanager
def netlink(netns_fd: int | None = None) -> Iterator[IPRoute]:
    """A short-lived IPRoute socket in the namespace `netns_fd` names (the caller's if None)."""
    ipr = _open_ipr(netns_fd)
    try:
        yield ipr
    finally:
        ipr.close()


def _open_ipr(netns_fd: int | None) -> IPRoute:
    """An IPRoute socket in that namespace: opened there by this thread (setns in and out),
    not by a forked helper as `IPRoute(netns=...)` would do for every socket."""
    if netns_fd is None or _ns_key(netns_fd) == _current_ns_key():
        return IPRoute()
    with entered_fd(netns_fd):
        return IPRoute()


def _ns_key(fd: int) -> tuple[int, int]:
    st = os.fstat(fd)
    return st.st_dev, st.st_ino


def _current_ns_key() -> tuple[int, int]:
    st = os.stat("/proc/thread-self/ns/net")
    return st.st_dev, st.st_ino


def _tun_data(msg: Any) -> dict[str, int] | None:
    info = msg.get_attr("IFLA_LINKINFO")
    if info is None or info.get_attr("IFLA_INFO_KIND") != "tun":
        return None
    data = info.get_attr("IFLA_INFO_DATA")
    return dict(data["attrs"]) if data is not None else {}


def _link_info(ipr: IPRoute, msg: Any) -> LinkInfo | None:
    tun = _tun_data(msg)
    if tun is None:
        return None
    index = msg["index"]
    addrs = [
        f"{a.get_attr('IFA_ADDRESS')}/{a['prefixlen']}" for a in ipr.get_addr(index=index)
    ]
    flags = msg["flags"]
    return LinkInfo(
        name=msg.get_attr("IFLA_IFNAME"),
        ifindex=index,
        kind="tap" if tun.get("IFLA_TUN_TYPE") == 2 else "tun",
        packet_info=bool(tun.get("IFLA_TUN_PI", 0)),
        vnet_hdr=bool(tun.get("IFLA_TUN_VNET_HDR", 0)),
        persist=bool(tun.get("IFLA_TUN_PERSIST", 0)),
        multi_queue=bool(tun.get("IFLA_TUN_MULTI_QUEUE", 0)),
        num_queues=tun.get("IFLA_TUN_NUM_QUEUES"),
        num_disabled_queues=tun.get("IFLA_TUN_NUM_DISABLED_QUEUES"),
        max_tx_queues=int(msg.get_attr("IFLA_NUM_TX_QUEUES") or 1),
        max_rx_queues=int(msg.get_attr("IFLA_NUM_RX_QUEUES") or 1),
        owner=tun.get("IFLA_TUN_OWNER"),
        group=tun.get("IFLA_TUN_GROUP"),
        mtu=msg.get_attr("IFLA_MTU"),
        txqueuelen=msg.get_attr("IFLA_TXQLEN"),
        up=bool(flags & _uapi.IFF_UP),
        carrier=bool(msg.get_attr("IFLA_CARRIER")),
        operstate=msg.get_attr("IFLA_OPERSTATE") or "UNKNOWN",
        hwaddr=msg.get_attr("IFLA_ADDRESS"),
        addresses=addrs,
        stats=dict(msg.get_attr("IFLA_STATS64") or {}),
    )


def list_tun_links() -> list[LinkInfo]:
    """Every tun/tap link in the caller's network namespace, mqtun's or anyone's."""
    with netlink() as ipr:
        infos = (_link_info(ipr, m) for m in ipr.get_links())
        return sorted((i for i in infos if i is not None), key=lambda i: i.ifindex)


def find_link(name: str) -> LinkInfo | None:
    """The tun/tap link called `name` in the caller's namespace; None if there is none.

    Raises InvalidArgumentError if a link of that name exists but is not tun/tap.
    """
    with netlink() as ipr:
        found = ipr.link_lookup(ifname=name)
        if not found:
            return None
        msg = ipr.get_links(found[0])[0]
        info = _link_info(ipr, msg)
        if info is None:
            kind = (msg.get_attr("IFLA_LINKINFO") or {}) and msg.get_attr(
                "IFLA_LINKINFO"
            ).get_attr("IFLA_INFO_KIND")
            raise InvalidArgumentError(
                f"{name} is a {kind or 'physical/loopback'} link, not a tun/tap device",
                device=name, op="lookup",
            )
        return info


def delete_link(name: str) -> None:
    """Delete the tun/tap link `name` in the caller's namespace (persistent or not)."""
    if find_link(name) is None:
        raise MqtunError(errno.ENODEV, f"no tun/tap device named {name} in this network "
                         "namespace", device=name, op="delete")
    with netlink() as ipr:
        try:
            ipr.link("del", index=ipr.link_lookup(ifname=name)[0])
        except NetlinkError as exc:
            raise kernel_error(OSError(exc.code, str(exc)), "delete", name) from None


class Link:
    """Netlink operations on one device, in whatever namespace the device is in now.

    One netlink socket is kept open in the device's namespace (opened there, so no helper
    process is forked per call) and replaced when the device moves to another namespace.
    """

    def __init__(self, device: Device) -> None:
        self._device = device
        self._ipr: IPRoute | None = None
        self._ipr_ns: tuple[int, int] | None = None

    def _socket(self) -> IPRoute:
        """The netlink socket in the namespace the device is in now (TUNGETDEVNETNS)."""
        try:
            nsfd: int | None = self._device.netns_fd()
        except PermissionDeniedError:
            nsfd = None  # TUNGETDEVNETNS needs CAP_NET_ADMIN: assume the caller's namespace
        try:
            key = _ns_key(nsfd) if nsfd is not None else _current_ns_key()
            if self._ipr is None or key != self._ipr_ns:
                self.close()
                self._ipr = _open_ipr(nsfd)
                self._ipr_ns = key
            return self._ipr
        finally:
            if nsfd is not None:
                os.close(nsfd)

    def close(self) -> None:
        """Close the netlink socket (the next call opens another)."""
        ipr, self._ipr, self._ipr_ns = self._ipr, None, None
        if ipr is not None:
            ipr.close()

    def _run(self, op: str, fn: Callable[[IPRoute, int], Any]) -> Any:
        name = self._device.known_name
        try:
            ipr = self._socket()
            name = self._device.name
            found = ipr.link_lookup(ifname=name)
            if not found:
                raise MqtunError(errno.ENODEV, f"link {name} not found", device=name, op=op)
            return fn(ipr, found[0])
        except NetlinkError as exc:
            raise kernel_error(OSError(exc.code, str(exc)), op, name) from None

    def delete(self) -> None:
        """Delete the link (in its namespace), persistent or not."""
        self._run("delete", lambda ipr, idx: ipr.link("del", index=idx))

    def offloads(self) -> int:
        """The TUN_F_* mask the device's features show (see Device.offloads)."""

        def read(ethtool: Any) -> int:
            features = ethtool.get_features()
            return sum(bit for name, bit in _uapi.TUN_F_FEATURES if features[name])

        return int(self._ethtool("get_offloads", read))

    def channels(self) -> tuple[int, int]:
        """(queues attached now, the most it can have): the combined channels `ethtool -l`
        shows, which tun reports from its live queue count (disabled queues excluded)."""

        def read(ethtool: Any) -> tuple[int, int]:
            ch = ethtool.get_channels()
            return int(ch.combined_count), int(ch.max_combined)

        got: tuple[int, int] = self._ethtool("get_channels", read)
        return got

    def _ethtool(self, op: str, fn: Callable[[Any], Any]) -> Any:
        """Run `fn` on an ethtool ioctl socket opened in the device's namespace."""
        from pyroute2.ethtool.ioctl import IoctlEthtool  # type: ignore[import-untyped]

        name = self._device.name
        nsfd = _netns_fd_or_none(self._device)
        try:
            with contextlib.ExitStack() as stack:
                if nsfd is not None and _ns_key(nsfd) != _current_ns_key():
                    stack.enter_context(entered_fd(nsfd))
                ethtool = IoctlEthtool(name)
            try:
                return fn(ethtool)
            finally:
                ethtool.close()
        except OSError as exc:
            raise kernel_error(exc, op, name) from None
        finally:
            if nsfd is not None:
                os.close(nsfd)

    @property
    def ifindex(self) -> int:
        """The ifindex in the device's current namespace (it may change with the namespace)."""
        return int(self._run("ifindex", lambda ipr, idx: idx))

    def info(self) -> LinkInfo:
        """Everything the kernel reports of the link, counters included."""
        info: LinkInfo = self._run("info",
                                   lambda ipr, idx: _link_info(ipr, ipr.get_links(idx)[0]))
        return info

    def stats(self) -> dict[str, int]:
        """Device totals (IFLA_STATS64): rx_* counts userspace writes, tx_* counts reads."""
        stats: dict[str, int] = self._run(
            "stats", lambda ipr, idx: dict(ipr.get_links(idx)[0].get_attr("IFLA_STATS64"))
        )
        return stats

    def up(self) -> None:
        self._run("up", lambda ipr, idx: ipr.link("set", index=idx, state="up"))

    def down(self) -> None:
        self._run("down", lambda ipr, idx: ipr.link("set", index=idx, state="down"))

    def wait_operational(self, timeout: float = 2.0) -> bool:
        """Wait (bounded) until the kernel reports the link operational (up, carrier, operstate).

        After a device's first queue is (re)attached the kernel turns the carrier on and
        re-activates the qdisc asynchronously (linkwatch, up to about a second): packets the
        stack sends before that are dropped (tx_dropped). Returns False on timeout.
        """
        import time

        deadline = time.monotonic() + timeout
        while True:
            info = self.info()
            # a fresh device reports UNKNOWN until its first carrier change, then UP/DOWN
            if info.up and info.carrier and info.operstate in ("UP", "UNKNOWN"):
                return True
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.01)

    @property
    def is_up(self) -> bool:
        return self.info().up

    @property
    def mtu(self) -> int:
        return self.info().mtu

    def set_mtu(self, mtu: int) -> None:
        if not isinstance(mtu, int) or isinstance(mtu, bool) or not 68 <= mtu <= 65535:
            raise InvalidArgumentError(f"MTU must be an integer 68..65535, not {mtu!r}")
        self._run("set_mtu", lambda ipr, idx: ipr.link("set", index=idx, mtu=mtu))

    def set_txqueuelen(self, length: int) -> None:
        """The per-queue ring size: packets beyond it are dropped (tx_dropped)."""
        if not isinstance(length, int) or length < 0:
            raise InvalidArgumentError(f"txqueuelen must be a non-negative integer: {length!r}")
        self._run("set_txqueuelen", lambda ipr, idx: ipr.link("set", index=idx, txqlen=length))

    @property
    def hwaddr(self) -> str | None:
        return self.info().hwaddr

    def set_hwaddr(self, mac: str) -> None:
        """Set the MAC address (TAP devices)."""
        self._run("set_hwaddr", lambda ipr, idx: ipr.link("set", index=idx, address=mac))

    def add_address(self, cidr: str, peer: str | None = None) -> None:
        """Add an IPv4/IPv6 address, e.g. "198.18.0.1/24" or "fd00::1/64" (peer for p2p)."""
        iface = _interface(cidr)
        kwargs: dict[str, Any] = {"address": str(iface.ip), "prefixlen": iface.network.prefixlen}
        if peer is not None:
            kwargs["local"] = str(iface.ip)
            kwargs["address"] = peer
        if iface.version == 6:
            kwargs["family"] = socket.AF_INET6
            kwargs["flags"] = _uapi.IFA_F_NODAD  # usable at once, no duplicate detection wait
        self._run("add_address", lambda ipr, idx: ipr.addr("add", index=idx, **kwargs))

    def remove_address(self, cidr: str) -> None:
        iface = _interface(cidr)
        self._run(
            "remove_address",
            lambda ipr, idx: ipr.addr(
                "del", index=idx, address=str(iface.ip), prefixlen=iface.network.prefixlen
            ),
        )

    def addresses(self) -> list[str]:
        return self.info().addresses

    def move_to_netns(self, target: str | int) -> None:
        """Move the device to another network namespace (a name under /run/netns, a path, or
        an fd). Queue fds stay valid; this Link follows the device to its new namespace."""
        if isinstance(target, int):
            self._run("set_netns", lambda ipr, idx: ipr.link("set", index=idx, net_ns_fd=target))
            return
        path = target if "/" in target else f"/run/netns/{target}"
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as exc:
            raise InvalidArgumentError(
                f"no network namespace at {path}: {exc.strerror}", op="set_netns"
            ) from None
        try:
            self._run("set_netns", lambda ipr, idx: ipr.link("set", index=idx, net_ns_fd=fd))
        finally:
            os.close(fd)


def _netns_fd_or_none(device: Device) -> int | None:
    try:
        return device.netns_fd()
    except PermissionDeniedError:
        return None


def _interface(cidr: str) -> ipaddress.IPv4Interface | ipaddress.IPv6Interface:
    try:
        return ipaddress.ip_interface(cidr)
    except ValueError as exc:
        raise InvalidArgumentError(f"not an address/prefix: {cidr!r} ({exc})") from None
