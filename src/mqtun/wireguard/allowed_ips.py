"""Allowed IPs: the longest-prefix table that is both WireGuard's router and its source filter.

Outbound, the destination address picks the peer (`lookup`); inbound, a decrypted packet is
accepted only if its source address maps back to the peer whose key decrypted it. One prefix
belongs to one peer: inserting it for another peer moves it, as in wireguard-go. The table is a
dict per (family, prefix length); a lookup tries the lengths in use from longest to shortest.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Hashable, Iterator
from typing import Generic, TypeVar

__all__ = ["AllowedIPs"]

P = TypeVar("P", bound=Hashable)
Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def _network(prefix: str | Network) -> Network:
    # wg and wireguard-go mask host bits: 10.0.0.1/24 means 10.0.0.0/24
    return ipaddress.ip_network(prefix, strict=False) if isinstance(prefix, str) else prefix


class AllowedIPs(Generic[P]):
    def __init__(self) -> None:
        # (version, prefix length) -> {network address as int: peer}
        self._tables: dict[tuple[int, int], dict[int, P]] = {}
        self._lengths: dict[int, list[int]] = {4: [], 6: []}

    def insert(self, prefix: str | Network, peer: P) -> None:
        net = _network(prefix)
        key = (net.version, net.prefixlen)
        if key not in self._tables:
            self._tables[key] = {}
            self._lengths[net.version] = sorted({*self._lengths[net.version], net.prefixlen},
                                                reverse=True)
        self._tables[key][int(net.network_address)] = peer

    def remove(self, prefix: str | Network, peer: P) -> bool:
        """Remove `prefix` if `peer` owns it (another peer's entry stays)."""
        net = _network(prefix)
        table = self._tables.get((net.version, net.prefixlen), {})
        addr = int(net.network_address)
        if table.get(addr) != peer:
            return False
        del table[addr]
        return True

    def remove_peer(self, peer: P) -> None:
        for table in self._tables.values():
            for addr in [a for a, p in table.items() if p == peer]:
                del table[addr]

    def entries(self, peer: P) -> Iterator[Network]:
        for (version, plen), table in sorted(self._tables.items()):
            for addr, owner in sorted(table.items()):
                if owner == peer:
                    yield ipaddress.ip_network((addr, plen)) if version == 4 else \
                        ipaddress.IPv6Network((addr, plen))

    def lookup(self, address: bytes | bytearray | memoryview | str) -> P | None:
        """The peer for a packed (4 or 16 bytes) or textual address, by longest prefix."""
        if isinstance(address, str):
            packed = ipaddress.ip_address(address).packed
        else:
            packed = bytes(address)
        bits = len(packed) * 8
        version = 4 if bits == 32 else 6
        value = int.from_bytes(packed, "big")
        for plen in self._lengths[version]:
            table = self._tables[(version, plen)]
            if not table:
                continue
            peer = table.get(value >> (bits - plen) << (bits - plen) if plen else 0)
            if peer is not None:
                return peer
        return None

    def allows(self, peer: P, source: bytes | str) -> bool:
        """Inbound check: does `source` route back to `peer`?"""
        return self.lookup(source) == peer
