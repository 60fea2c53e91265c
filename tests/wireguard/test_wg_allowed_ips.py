"""Allowed IPs against a brute-force longest-prefix match (ipaddress as the oracle)."""

from __future__ import annotations

import ipaddress

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mqtun.wireguard.allowed_ips import AllowedIPs

pytestmark = pytest.mark.sans_io  # pure: no device, no namespace


def _brute(entries: dict[ipaddress.IPv4Network | ipaddress.IPv6Network, str],
           address: str) -> str | None:
    addr = ipaddress.ip_address(address)
    best = [(n.prefixlen, p) for n, p in entries.items() if addr.version == n.version and addr in n]
    return max(best)[1] if best else None


_v4 = st.tuples(st.integers(0, 2**32 - 1), st.integers(0, 32)).map(
    lambda t: ipaddress.ip_network((t[0], t[1]), strict=False))
_v6 = st.tuples(st.integers(0, 2**128 - 1), st.integers(0, 128)).map(
    lambda t: ipaddress.IPv6Network((t[0], t[1]), strict=False))


@given(st.lists(st.tuples(st.one_of(_v4, _v6), st.sampled_from("abc")), max_size=30),
       st.lists(st.one_of(st.integers(0, 2**32 - 1).map(lambda i: str(ipaddress.IPv4Address(i))),
                          st.integers(0, 2**128 - 1).map(lambda i: str(ipaddress.IPv6Address(i)))),
                max_size=20))
def test_lookup_matches_brute_force(inserts: list[tuple[ipaddress.IPv4Network, str]],
                                    probes: list[str]) -> None:
    table: AllowedIPs[str] = AllowedIPs()
    model: dict[ipaddress.IPv4Network | ipaddress.IPv6Network, str] = {}
    for net, peer in inserts:
        table.insert(net, peer)
        model[net] = peer
    # probe the inserted networks' own addresses too (hits), not only random ones (misses)
    for address in [*probes, *(str(n.network_address) for n in model)]:
        assert table.lookup(address) == _brute(model, address)
        assert table.lookup(ipaddress.ip_address(address).packed) == _brute(model, address)


def test_one_prefix_one_peer_remove_and_entries() -> None:
    t: AllowedIPs[str] = AllowedIPs()
    t.insert("198.19.0.0/16", "a")
    t.insert("198.19.7.9/24", "b")             # host bits masked, as wg does
    t.insert("fd00::/8", "a")
    assert t.lookup("198.19.7.1") == "b" and t.lookup("198.19.8.1") == "a"
    assert t.lookup("fd00::1") == "a" and t.lookup("fe80::1") is None
    assert t.lookup("10.0.0.1") is None
    t.insert("198.19.7.0/24", "a")             # moves to a
    assert t.lookup("198.19.7.1") == "a" and list(t.entries("b")) == []
    assert not t.remove("198.19.7.0/24", "b") and t.remove("198.19.7.0/24", "a")
    assert [str(n) for n in t.entries("a")] == ["198.19.0.0/16", "fd00::/8"]
    assert t.allows("a", "198.19.1.1") and not t.allows("b", "198.19.1.1")
    t.remove_peer("a")
    assert t.lookup("198.19.1.1") is None
    t.insert("0.0.0.0/0", "c")
    assert t.lookup("1.2.3.4") == "c" and t.lookup("::1") is None
