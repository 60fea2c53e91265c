"""Link setup through netlink: state, MTU, addresses, txqueuelen, MAC, moving namespaces."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from nettools import udp_flows
from pyroute2 import IPRoute

from mqtun import Device, InvalidArgumentError, MqtunError, NetNamespace, find_link


def test_up_down_mtu_txqueuelen() -> None:
    with Device.create() as dev:
        link = dev.link
        assert not link.is_up
        link.up()
        assert link.is_up
        link.set_mtu(9000)
        assert link.mtu == 9000
        link.set_txqueuelen(64)
        assert link.info().txqueuelen == 64
        link.down()
        assert not link.is_up
        with pytest.raises(InvalidArgumentError, match="MTU"):
            link.set_mtu(10)
        with pytest.raises(InvalidArgumentError):
            link.set_txqueuelen(-1)


def test_addresses_ipv4_ipv6_and_peer() -> None:
    with Device.create() as dev:
        dev.link.up()
        dev.link.add_address("198.18.5.1/24")
        dev.link.add_address("fd00:6d71::1/64")
        dev.link.add_address("198.18.6.1/32", peer="198.18.6.2")
        addrs = dev.link.addresses()
        assert "198.18.5.1/24" in addrs and "fd00:6d71::1/64" in addrs
        assert "198.18.6.2/32" in addrs or "198.18.6.1/32" in addrs
        dev.link.remove_address("198.18.5.1/24")
        assert "198.18.5.1/24" not in dev.link.addresses()
        with pytest.raises(InvalidArgumentError, match="not an address"):
            dev.link.add_address("banana")
        with pytest.raises(MqtunError):
            dev.link.add_address("fd00:6d71::1/64")  # exists already: netlink EEXIST


def test_tap_mac_address() -> None:
    with Device.create("tp%d", tap=True) as dev:
        dev.link.set_hwaddr("02:11:22:33:44:55")
        assert dev.link.hwaddr == "02:11:22:33:44:55"


def test_moved_device_keeps_working(make_netns: Callable[[], NetNamespace]) -> None:
    other = make_netns()
    with Device.create("mv0", 2) as dev:
        dev.link.move_to_netns(other.name)
        assert find_link("mv0") is None, "gone from here"
        # the Link follows the device: configuration happens in the other namespace
        dev.link.up()
        dev.link.add_address("198.18.7.1/24")
        assert "198.18.7.1/24" in dev.link.addresses()
        with other.enter():
            assert find_link("mv0") is not None
            udp_flows("198.18.7.2", range(100, 120))
        fds = {q.fd: q for q in dev.queues}
        import select
        import time

        got = 0
        deadline = time.monotonic() + 5
        while got < 20 and time.monotonic() < deadline:
            for fd in select.select(list(fds), [], [], 0.1)[0]:
                got += len(fds[fd].read_batch(64))
        assert got == 20, "queue fds stay valid after the move"
        assert dev.link.stats()["tx_packets"] == 20
    with other.enter():
        assert find_link("mv0") is None, "closing the last queue removed it over there"


def test_delete_finds_a_moved_persistent_device(make_netns: Callable[[], NetNamespace]) -> None:
    other = make_netns()
    dev = Device.create("mvp0", persist=True)
    dev.link.move_to_netns(other.name)
    dev.delete()
    with other.enter():
        assert find_link("mvp0") is None


def test_move_to_a_missing_namespace() -> None:
    with Device.create() as dev, pytest.raises(InvalidArgumentError, match="no network namespace"):
        dev.link.move_to_netns("mqt-does-not-exist")


_SPAWNS: list[str] | None = None


def _count_spawns(event: str, _args: object) -> None:
    if _SPAWNS is not None and event in ("os.fork", "os.forkpty", "os.posix_spawn",
                                         "subprocess.Popen", "os.exec"):
        _SPAWNS.append(event)


def test_a_moved_device_is_managed_without_a_helper_process(
    make_netns: Callable[[], NetNamespace],
) -> None:
    """One netlink socket opened inside the device's namespace serves every Link call there
    (pyroute2's IPRoute(netns=...) forks a helper per socket)."""
    global _SPAWNS
    import sys

    sys.addaudithook(_count_spawns)
    other = make_netns()
    with Device.create("nf0") as dev:
        dev.link.move_to_netns(other.name)
        dev.link.up()
        _SPAWNS = []
        try:
            for _ in range(5):
                dev.link.info()
            dev.link.add_address("198.18.9.1/24")
            assert dev.link.wait_operational(0.5) in (True, False)
            assert "198.18.9.1/24" in dev.link.addresses()
            spawned = list(_SPAWNS)
        finally:
            _SPAWNS = None
        assert spawned == [], f"Link calls started processes: {spawned}"
        with other.enter():
            assert find_link("nf0") is not None


def test_namespaces_are_made_and_removed_without_running_ip() -> None:
    global _SPAWNS
    import os
    import sys

    sys.addaudithook(_count_spawns)
    _SPAWNS = []
    try:
        ns = NetNamespace.create(prefix="mqt-")
        try:
            assert os.path.exists(ns.path)
            with ns.enter(), Device.create("in0") as dev, IPRoute() as ipr:
                lo = ipr.get_links(ipr.link_lookup(ifname="lo")[0])[0]
                assert lo["flags"] & 1, "loopback is up"
                assert find_link("in0") is not None and dev.link.info().name == "in0"
        finally:
            ns.delete()
        popens = [e for e in _SPAWNS if e == "subprocess.Popen"]
    finally:
        _SPAWNS = None
    assert not os.path.exists(ns.path)
    assert popens == [], "no `ip netns add/del` (pyroute2.netns does it)"
