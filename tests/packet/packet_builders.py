"""Packets built, and segments checked, by scapy: the independent oracle of the packet tests.

Nothing here uses mqtun's checksum or parsing code: scapy builds every packet and recomputes
every checksum, so a test that compares mqtun's output with these helpers compares two
implementations.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    from scapy.layers.inet import IP, TCP, UDP, IPOption_RR
    from scapy.layers.inet6 import (
        IPv6,
        IPv6ExtHdrDestOpt,
        IPv6ExtHdrHopByHop,
        IPv6ExtHdrRouting,
    )
    from scapy.layers.l2 import Dot1Q, Ether
    from scapy.layers.vxlan import VXLAN
    from scapy.packet import Packet, Raw

SRC4, DST4 = "198.18.0.1", "198.18.0.2"
SRC6, DST6 = "fd00:6d71::1", "fd00:6d71::2"
MAC_A, MAC_B = "02:00:00:00:00:0a", "02:00:00:00:00:0b"


@dataclass(frozen=True)
class Shape:
    """How a test packet is framed: IP version, options/extension headers, TAP and VLAN tags."""

    v6: bool = False
    ip_options: bool = False  # IPv4 record-route option / IPv6 hop-by-hop + dest opts
    routing: bool = False  # IPv6 routing header with one address left
    tap: bool = False
    vlans: int = 0


def l3(shape: Shape, *, ip_id: int = 1000, df: bool = True, tos: int = 0) -> Packet:
    """The IP layer (with extension headers) of a test packet."""
    if shape.v6:
        pkt: Packet = IPv6(src=SRC6, dst=DST6, tc=tos, fl=0x12345)
        if shape.ip_options:
            pkt = pkt / IPv6ExtHdrHopByHop() / IPv6ExtHdrDestOpt()
        if shape.routing:
            pkt = pkt / IPv6ExtHdrRouting(addresses=["fd00:6d71::99"], segleft=1)
        return pkt
    opts = [IPOption_RR(routers=["198.18.0.9"])] if shape.ip_options else []
    return IP(src=SRC4, dst=DST4, id=ip_id, flags="DF" if df else 0, tos=tos, options=opts)


def l2(shape: Shape) -> Packet | None:
    if not shape.tap:
        return None
    pkt: Packet = Ether(src=MAC_A, dst=MAC_B)
    for i in range(shape.vlans):
        pkt = pkt / Dot1Q(vlan=10 + i)
    return pkt


def frame(shape: Shape, upper: Packet, **ip: int | bool) -> bytes:
    """Bytes of [Ethernet [VLAN..]] / IP / `upper`, checksums computed by scapy."""
    pkt = l3(shape, **ip) / upper  # type: ignore[arg-type]
    eth = l2(shape)
    if eth is not None:
        pkt = eth / pkt
    return bytes(pkt)


def tcp(
    shape: Shape,
    payload: bytes,
    *,
    seq: int = 1000,
    ack: int = 7,
    flags: str = "A",
    timestamps: bool = True,
    window: int = 500,
    **ip: int | bool,
) -> bytes:
    options = [("NOP", None), ("NOP", None), ("Timestamp", (11, 22))] if timestamps else []
    layer = TCP(sport=40000, dport=5001, seq=seq, ack=ack, flags=flags, window=window,
                options=options) / Raw(payload)  # fmt: skip
    return frame(shape, layer, **ip)


def udp(shape: Shape, payload: bytes, **ip: int | bool) -> bytes:
    return frame(shape, UDP(sport=40001, dport=5002) / Raw(payload), **ip)


def dissect(raw: bytes, shape: Shape) -> Packet:
    """scapy's reading of a packet of this shape."""
    if shape.tap:
        return Ether(raw)
    return IPv6(raw) if shape.v6 else IP(raw)


def recomputed(pkt: Packet) -> Packet:
    """The same packet with every checksum recomputed by scapy."""
    clone = pkt.copy()
    for layer in (IP, TCP, UDP):
        if layer in clone:
            del clone[layer].chksum
    return clone.__class__(bytes(clone))


def same_checksum(a: int, b: int) -> bool:
    """Equal, or the two one's-complement zeros (0x0000 and 0xFFFF)."""
    return a == b or {a, b} == {0, 0xFFFF}


def assert_checksums(raw: bytes, shape: Shape) -> Packet:
    """Every checksum of `raw` agrees with scapy's own computation; returns the dissection."""
    pkt = dissect(raw, shape)
    again = recomputed(pkt)
    for layer in (IP, TCP, UDP):
        if layer in pkt:
            got, want = pkt[layer].chksum, again[layer].chksum
            assert same_checksum(got, want), f"{layer.__name__} checksum {got:#x} != {want:#x}"
    return pkt


def vxlan(
    outer_v6: bool, inner: bytes, *, outer_csum: bool = True, ip_id: int = 300
) -> tuple[bytes, int, int]:
    """An Ethernet/IP/UDP(4789)/VXLAN/`inner` frame; returns it with (outer_th, inner_nh)."""
    outer = (
        IPv6(src=SRC6, dst=DST6)
        if outer_v6
        else IP(src="198.18.1.1", dst="198.18.1.2", id=ip_id, flags="DF")
    )
    udp_layer = UDP(sport=50000, dport=4789)
    if not outer_csum:
        udp_layer.chksum = 0
    pkt = Ether(src=MAC_A, dst=MAC_B) / outer / udp_layer / VXLAN(vni=42) / Raw(inner)
    raw = bytes(pkt)
    outer_th = 14 + (40 if outer_v6 else 20)
    return raw, outer_th, outer_th + 8 + 8 + 14


def vxlan_inner(shape: Shape, upper: Packet) -> bytes:
    """The inner Ethernet frame of a VXLAN packet."""
    return bytes(Ether(src=MAC_B, dst=MAC_A) / l3(shape) / upper)


__all__ = [
    "DST4",
    "DST6",
    "IP",
    "SRC4",
    "SRC6",
    "TCP",
    "UDP",
    "VXLAN",
    "Ether",
    "IPv6",
    "Raw",
    "Shape",
    "assert_checksums",
    "dissect",
    "frame",
    "recomputed",
    "same_checksum",
    "tcp",
    "udp",
    "vxlan",
    "vxlan_inner",
]
