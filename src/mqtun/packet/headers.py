"""Ethernet/802.1Q, IPv4, IPv6, TCP and UDP: where each header starts, and a flow key.

Parsing only finds offsets and a few fields; it never copies a payload. Anything that does not
hold together raises `MalformedPacket` with a short `reason` (a constant string such as
"truncated-ipv4") so that a worker can count its drops by cause without parsing messages.
"""

from __future__ import annotations

import struct
from typing import Final, NamedTuple, TypeAlias

from mqtun._uapi import (
    ETH_HLEN,
    ETH_P_8021AD,
    ETH_P_8021Q,
    ETH_P_IP,
    ETH_P_IPV6,
    IPPROTO_AH,
    IPPROTO_DSTOPTS,
    IPPROTO_FRAGMENT,
    IPPROTO_HOPOPTS,
    IPPROTO_ROUTING,
    IPPROTO_TCP,
    IPPROTO_UDP,
    IPV6_RH_TYPE_SRH,
    TUN_PI_FORMAT,
)
from mqtun.errors import MqtunException

__all__ = [
    "MAX_VLAN_TAGS",
    "REASONS",
    "VLAN_TPIDS",
    "Buffer",
    "FlowKey",
    "MalformedPacket",
    "Parsed",
    "flow_key",
    "parse",
    "parse_ethernet",
    "tun_pi",
]

Buffer: TypeAlias = bytes | bytearray | memoryview
"""What the packet functions read: anything with the buffer protocol over plain bytes."""

FlowKey: TypeAlias = tuple[int, bytes, bytes, int, int, int]
"""(ip version, source address, destination address, protocol, source port, dest port)."""

VLAN_TPIDS: Final = (ETH_P_8021Q, ETH_P_8021AD)
"""The tag protocol ids a VLAN tag is recognised by, in any order: the two the kernel's
eth_type_vlan() knows, so a frame parsed here as IP is one the kernel segments, checksums and
dissects as IP too. (0x9100 and other pre-802.1ad TPIDs are opaque ethertypes to the kernel: a
super-packet built over one would be refused on write, and none is ever read.)"""
MAX_VLAN_TAGS: Final = 2
"""Tags looked through: a customer tag under a service tag (802.1ad) is the deepest standard
stack, and the steering programs (mqtun.steer) look through as many; a deeper stack is not-ip."""
_IPV6_EXT_HEADERS: Final = frozenset(
    (IPPROTO_HOPOPTS, IPPROTO_ROUTING, IPPROTO_FRAGMENT, IPPROTO_AH, IPPROTO_DSTOPTS)
)

REASONS: Final = frozenset(
    {
        # parsing
        "truncated-ethernet",
        "truncated-vlan",
        "not-ip",
        "bad-ip-version",
        "truncated-ipv4",
        "bad-ipv4-header-length",
        "bad-ipv4-length",
        "truncated-ipv6",
        "truncated-ipv6-ext",
        "truncated-tcp",
        "bad-tcp-header-length",
        "truncated-udp",
        # virtio-net header and offload requests
        "short-vnet-header",
        "bad-gso-type",
        "zero-gso-size",
        "gso-proto-mismatch",
        "gso-fragment",
        "too-many-segments",
        "oversized-segment",
        "over-mtu",
        "bad-csum-offset",
        "bad-tunnel-offsets",
        "bad-tunnel",
    }
)
"""Every `MalformedPacket.reason` this package raises: a fixed set, so counters can be fixed too."""


class MalformedPacket(MqtunException, ValueError):
    """A packet or virtio-net header that cannot be what it claims; `reason` says which part.

    A ValueError, not an OSError: `except OSError` around a read or a write must never swallow
    a parse error (nor a parse error be taken for a device that went away).
    """

    def __init__(self, reason: str, detail: str = "") -> None:
        self.reason = reason
        self.detail = detail
        text = f"malformed packet ({reason})"
        self.message = f"{text}: {detail}" if detail else text
        super().__init__(self.message)

    def __str__(self) -> str:
        return self.message

    def __reduce__(self):  # type: ignore[no-untyped-def]
        # keep reason/detail when a worker process sends the error back
        return (type(self), (self.reason, self.detail))


class Parsed(NamedTuple):
    """Offsets (from the start of the buffer) and the fields a flow key or a checksum needs."""

    l3_off: int
    """Start of the IP header: 0 for TUN, 14 (+4 per VLAN tag) for TAP."""
    version: int
    l4_off: int
    """Start of the transport header (after any IPv4 options and IPv6 extension headers)."""
    proto: int
    """The upper-layer protocol: TCP 6, UDP 17, or whatever follows the last IP header."""
    l4_len: int
    """TCP header with options, 8 for UDP, 0 when the transport header is not parsed."""
    payload_off: int
    end: int
    """End of the IP packet: l3_off + the IP length field, or the buffer's end if asked."""
    src: bytes
    dst: bytes
    pseudo_dst: bytes
    """The destination the transport checksum covers: `dst`, or an IPv6 routing header's last."""
    sport: int
    dport: int
    fragment: bool
    """An IP fragment: then only the first one has ports, the rest have l4_len 0."""

    @property
    def l3_len(self) -> int:
        """IP header length, IPv4 options and IPv6 extension headers included."""
        return self.l4_off - self.l3_off

    @property
    def payload_len(self) -> int:
        return self.end - self.payload_off


_U16 = struct.Struct("!H")
_IPV4 = struct.Struct("!BBHHHBBH4s4s")
_IPV6 = struct.Struct("!IHBB16s16s")
_PORTS = struct.Struct("!HH")


_PI = struct.Struct(TUN_PI_FORMAT)
_PI_V4: Final = _PI.pack(0, ETH_P_IP.to_bytes(2, "big"))
_PI_V6: Final = _PI.pack(0, ETH_P_IPV6.to_bytes(2, "big"))


def tun_pi(packet: Buffer, ethernet: bool) -> bytes:
    """The packet-info header (struct tun_pi, IFF_NO_PI off) to write before `packet`: flags 0
    and the protocol -- an Ethernet frame's EtherType, else from the IP version."""
    if ethernet:
        return _PI.pack(0, bytes(packet[12:14]) if len(packet) >= ETH_HLEN else b"\0\0")
    return _PI_V6 if len(packet) and packet[0] >> 4 == 6 else _PI_V4


def parse_ethernet(buf: Buffer, offset: int = 0) -> tuple[int, int]:
    """(ethertype, offset of the L3 header) of an Ethernet frame, skipping up to two VLAN tags
    (TPID 0x8100 or 0x88a8, see VLAN_TPIDS). The one Ethernet parser of mqtun.packet."""
    n = len(buf)
    if n < offset + ETH_HLEN:
        raise MalformedPacket("truncated-ethernet", f"{n - offset} bytes")
    off = offset + 12
    (etype,) = _U16.unpack_from(buf, off)
    tags = 0
    while etype in VLAN_TPIDS:
        tags += 1
        if tags > MAX_VLAN_TAGS:
            raise MalformedPacket("not-ip", f"more than {MAX_VLAN_TAGS} VLAN tags")
        off += 4
        if n < off + 2:
            raise MalformedPacket("truncated-vlan")
        (etype,) = _U16.unpack_from(buf, off)
    return etype, off + 2


def _ipv6_final_destination(buf: Buffer, off: int, ext_len: int, dst: bytes) -> bytes:
    """The address a transport checksum uses when a routing header still has hops to go."""
    rtype = buf[off + 2]
    segments_left = buf[off + 3]
    if segments_left == 0:
        return dst
    if rtype in (0, 2):  # RH0 / Mobile IPv6 type 2: the last address listed is the final one
        count = (ext_len - 8) // 16
        if count >= 1:
            at = off + 8 + (count - 1) * 16
            return bytes(buf[at : at + 16])
    elif rtype == IPV6_RH_TYPE_SRH and ext_len >= 24:  # Segment List[0] is the final one
        return bytes(buf[off + 8 : off + 24])
    return dst


def parse(buf: Buffer, *, tap: bool = False, offset: int = 0, use_ip_length: bool = True) -> Parsed:
    """Parse one IP packet (TUN) or Ethernet frame (TAP) starting at `offset`.

    With `use_ip_length` the packet ends where the IP length field says (a TAP frame may carry
    padding after it); without, it ends at the end of the buffer, which is how the kernel reads
    a GSO super-packet whose length fields are about to be rewritten per segment.
    """
    n = len(buf)
    if tap:
        etype, l3 = parse_ethernet(buf, offset)
        if etype != ETH_P_IP and etype != ETH_P_IPV6:
            raise MalformedPacket("not-ip", f"ethertype {etype:#06x}")
    else:
        l3 = offset
        etype = 0
    if n <= l3:
        raise MalformedPacket("bad-ip-version", "empty packet")
    version = buf[l3] >> 4
    if tap and version != (4 if etype == ETH_P_IP else 6):
        raise MalformedPacket("bad-ip-version", f"version {version} in ethertype {etype:#06x}")
    fragment = False
    if version == 4:
        if n < l3 + 20:
            raise MalformedPacket("truncated-ipv4", f"{n - l3} bytes")
        vihl, _tos, tot_len, _id, frag, _ttl, proto, _csum, src, dst = _IPV4.unpack_from(buf, l3)
        ihl = (vihl & 0x0F) * 4
        if ihl < 20:
            raise MalformedPacket("bad-ipv4-header-length", f"IHL {ihl // 4}")
        if n < l3 + ihl:
            raise MalformedPacket("truncated-ipv4", f"header of {ihl} bytes in {n - l3}")
        if use_ip_length:
            if tot_len < ihl:
                raise MalformedPacket("bad-ipv4-length", f"total length {tot_len} < {ihl}")
            end = l3 + tot_len
            if end > n:
                raise MalformedPacket("truncated-ipv4", f"total length {tot_len} > {n - l3}")
        else:
            end = n
        l4 = l3 + ihl
        if frag & 0x3FFF:  # MF or a fragment offset
            fragment = True
            if frag & 0x1FFF:  # not the first fragment: no transport header here
                return Parsed(l3, 4, l4, proto, 0, l4, end, src, dst, dst, 0, 0, True)
        pseudo_dst = dst
    elif version == 6:
        if n < l3 + 40:
            raise MalformedPacket("truncated-ipv6", f"{n - l3} bytes")
        _vtf, plen, proto, _hop, src, dst = _IPV6.unpack_from(buf, l3)
        if use_ip_length:
            end = l3 + 40 + plen
            if end > n:
                raise MalformedPacket("truncated-ipv6", f"payload length {plen} > {n - l3 - 40}")
        else:
            end = n
        l4 = l3 + 40
        pseudo_dst = dst
        while proto in _IPV6_EXT_HEADERS:
            if end < l4 + 8:
                raise MalformedPacket("truncated-ipv6-ext", f"extension header {proto}")
            if proto == IPPROTO_FRAGMENT:
                ext_len = 8
                (frag,) = _U16.unpack_from(buf, l4 + 2)
                fragment = True
                if frag & 0xFFF8:  # not the first fragment
                    nxt = buf[l4]
                    return Parsed(l3, 6, l4 + 8, nxt, 0, l4 + 8, end, src, dst, dst, 0, 0, True)
            elif proto == IPPROTO_AH:
                ext_len = (buf[l4 + 1] + 2) * 4
            else:
                ext_len = (buf[l4 + 1] + 1) * 8
            if end < l4 + ext_len:
                raise MalformedPacket("truncated-ipv6-ext", f"extension header {proto}")
            if proto == IPPROTO_ROUTING:
                pseudo_dst = _ipv6_final_destination(buf, l4, ext_len, dst)
            proto = buf[l4]
            l4 += ext_len
    else:
        raise MalformedPacket("bad-ip-version", f"version {version}")

    if proto == IPPROTO_TCP:
        if end < l4 + 20:
            raise MalformedPacket("truncated-tcp", f"{end - l4} bytes")
        th_len = (buf[l4 + 12] >> 4) * 4
        if th_len < 20:
            raise MalformedPacket("bad-tcp-header-length", f"data offset {th_len // 4}")
        if end < l4 + th_len:
            raise MalformedPacket("truncated-tcp", f"header of {th_len} bytes in {end - l4}")
        sport, dport = _PORTS.unpack_from(buf, l4)
        return Parsed(
            l3, version, l4, proto, th_len, l4 + th_len, end, src, dst, pseudo_dst,
            sport, dport, fragment,
        )  # fmt: skip
    if proto == IPPROTO_UDP:
        if end < l4 + 8:
            raise MalformedPacket("truncated-udp", f"{end - l4} bytes")
        sport, dport = _PORTS.unpack_from(buf, l4)
        return Parsed(
            l3, version, l4, proto, 8, l4 + 8, end, src, dst, pseudo_dst, sport, dport, fragment
        )
    return Parsed(l3, version, l4, proto, 0, l4, end, src, dst, pseudo_dst, 0, 0, fragment)


def flow_key(p: Parsed) -> FlowKey:
    """The 5-tuple (with the IP version) that names the flow a parsed packet belongs to."""
    return (p.version, p.src, p.dst, p.proto, p.sport, p.dport)
