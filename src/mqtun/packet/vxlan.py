"""VXLAN (RFC 7348) as pure functions: the 8-byte header, validation, and what a tunnel end needs
around it (the outer source port, the datagrams of a coalesced read, the virtio-net header a
decapsulated frame is written to a TAP with).

The header: a 32-bit word of flags (only the I flag, 0x08 in the first byte, is defined; every
other bit is reserved and must be zero), then the 24-bit VNI and a reserved byte. A receiver
drops, as the kernel's vxlan_rcv does: a datagram shorter than the header ("vxlan-short"), a
header without the I flag or with any reserved bit set ("vxlan-bad-flags"), another VNI than
its own ("vxlan-wrong-vni"), and an inner frame shorter than an Ethernet header
("vxlan-truncated").

The outer UDP source port carries the inner flow's entropy, as udp_flow_src_port does: a hash of
the inner flow (`flow_hash`) scaled into a port range (`source_port`). Equal flows get equal
ports, so every device on the path (ECMP, RSS, a reuseport group) keeps a flow in one place.
"""

from __future__ import annotations

import struct
import zlib
from typing import Final

from mqtun._uapi import (
    ETH_ALEN,
    ETH_HLEN,
    ETH_P_IP,
    ETH_P_IPV6,
    ICMP_DEST_UNREACH,
    ICMP_FRAG_NEEDED,
    ICMPV6_PKT_TOOBIG,
    IP_DF,
    IP_LOCAL_PORT_RANGE_DEFAULT,
    IPPROTO_ICMP,
    IPPROTO_ICMPV6,
    IPPROTO_TCP,
    IPPROTO_UDP,
    IPV4_MIN_MTU,
    IPV6_MIN_MTU,
    TCP_CSUM_OFFSET,
    UDP_CSUM_OFFSET,
    VIRTIO_NET_HDR_F_NEEDS_CSUM,
    VIRTIO_NET_HDR_GSO_TCPV4,
    VIRTIO_NET_HDR_GSO_TCPV6,
    VIRTIO_NET_HDR_GSO_UDP_L4,
    VXLAN_HF_VNI,
    VXLAN_HLEN,
    VXLAN_VNI_MAX,
)
from mqtun.errors import InvalidArgumentError
from mqtun.packet.checksum import checksum, pseudo_header_sum, residue
from mqtun.packet.headers import Buffer, MalformedPacket, parse, parse_ethernet
from mqtun.packet.vnet import ZERO_HEADER, VnetHeader

__all__ = [
    "VXLAN_REASONS",
    "check",
    "datagrams",
    "decapsulate",
    "encapsulate",
    "flow_hash",
    "header",
    "receive_header",
    "source_port",
    "too_big_reply",
]

VXLAN_REASONS: Final = ("vxlan-short", "vxlan-bad-flags", "vxlan-wrong-vni", "vxlan-truncated")
"""Every reason `check` gives, in a fixed order (counters are laid out by it)."""

_HDR = struct.Struct("!II")
_U16 = struct.Struct("!H")
_M: Final = 0xFFFF


def _check_vni(vni: int) -> int:
    if not isinstance(vni, int) or not 0 <= vni <= VXLAN_VNI_MAX:
        raise InvalidArgumentError(f"a VXLAN VNI is 0..{VXLAN_VNI_MAX}, not {vni!r}", op="vxlan")
    return vni


def header(vni: int) -> bytes:
    """The 8-byte VXLAN header for `vni`: the I flag, the VNI, every reserved bit zero."""
    return _HDR.pack(VXLAN_HF_VNI, _check_vni(vni) << 8)


def encapsulate(frame: Buffer, vni: int) -> bytes:
    """The UDP payload that carries the Ethernet `frame` in VXLAN network `vni`."""
    return b"".join((header(vni), frame))


def check(datagram: Buffer, vni: int) -> str | None:
    """Why a received UDP payload is not a frame of network `vni` (one of VXLAN_REASONS),
    or None when it is one: then the frame is ``datagram[8:]``. Never raises on contents."""
    n = len(datagram)
    if n < VXLAN_HLEN:
        return "vxlan-short"
    flags, word = _HDR.unpack_from(datagram)
    if flags != VXLAN_HF_VNI or word & 0xFF:
        return "vxlan-bad-flags"
    if word >> 8 != vni:
        return "vxlan-wrong-vni"
    if n < VXLAN_HLEN + ETH_HLEN:
        return "vxlan-truncated"
    return None


def decapsulate(datagram: Buffer, vni: int) -> memoryview:
    """The inner Ethernet frame of a VXLAN datagram (no copy); MalformedPacket(reason) if the
    datagram is not one of network `vni`."""
    reason = check(datagram, vni)
    if reason is not None:
        raise MalformedPacket(reason)
    return memoryview(datagram)[VXLAN_HLEN:]


def flow_hash(frame: Buffer) -> int:
    """A 32-bit hash of the inner flow: version, addresses, protocol and ports of an IP frame,
    else the two MAC addresses (as the kernel falls back to for a frame without a flow).
    Deterministic across processes, so every worker gives a flow the same value."""
    try:
        p = parse(frame, tap=True)
    except MalformedPacket:
        return zlib.crc32(bytes(frame[: 2 * ETH_ALEN]))
    key = b"".join((bytes((p.version, p.proto)), p.src, p.dst, _U16.pack(p.sport),
                    _U16.pack(p.dport)))
    return zlib.crc32(key)


def source_port(hash32: int, low: int = IP_LOCAL_PORT_RANGE_DEFAULT[0],
                high: int = IP_LOCAL_PORT_RANGE_DEFAULT[1]) -> int:
    """The outer UDP source port for a flow hash, as the kernel's udp_flow_src_port maps it:
    the hash's upper half folded in (only the top 16 bits count), then scaled into
    [low, high) — `high` itself is never used, as in the kernel."""
    if not 0 < low < high <= _M:
        raise InvalidArgumentError(f"a source port range needs 0 < low < high <= 65535, "
                                   f"not {low}..{high}", op="vxlan")
    h = hash32 & 0xFFFFFFFF
    h = (h ^ (h << 16)) & 0xFFFFFFFF
    return ((h * (high - low)) >> 32) + low


def _inner_ip_end(buf: Buffer) -> int:
    """Where the first inner frame's IP packet ends by its own length field (0: not IP)."""
    try:
        etype, l3 = parse_ethernet(buf, VXLAN_HLEN)
    except MalformedPacket:
        return 0
    if etype == ETH_P_IP and len(buf) >= l3 + 4:
        return l3 + int(_U16.unpack_from(buf, l3 + 2)[0])
    if etype == ETH_P_IPV6 and len(buf) >= l3 + 6:
        return l3 + 40 + int(_U16.unpack_from(buf, l3 + 4)[0])
    return 0


def datagrams(buf: memoryview, segment_size: int) -> list[memoryview]:
    """The VXLAN datagrams in one read of a UDP_GRO socket (`segment_size` from its cmsg, 0 when
    there was none).

    Two kinds of read carry a segment size: a train of equal datagrams (GRO, or a UDP GSO
    send on the same host), cut every `segment_size` bytes; and one tunnel super-datagram (the
    kernel hands a VXLAN TSO packet from a veth peer over whole, the size being the inner
    MSS), recognised by its inner IP length spanning the whole read: it stays whole."""
    n = len(buf)
    if segment_size <= 0 or n <= segment_size:
        return [buf]
    if _inner_ip_end(buf) == n:
        return [buf]
    return [buf[i : i + segment_size] for i in range(0, n, segment_size)]


def receive_header(frame: Buffer, gso_size: int = 0, mtu: int = 0) -> VnetHeader:
    """The virtio-net header to write a decapsulated frame to a TAP with.

    - a super-frame -- `gso_size` > 0 (a tunnel super-datagram's inner MSS), or an IP packet
      longer than the TAP's `mtu` (a super-datagram that came without a segment size; its MSS
      is what the MTU leaves) -- gets a GSO header of its kind with NEEDS_CSUM, its transport
      checksum field being the kernel's partial seed;
    - a frame whose TCP/UDP checksum does not verify but holds exactly the pseudo-header sum:
      NEEDS_CSUM (a veth sender leaves checksums partial, the kernel trusting its metadata,
      which a socket read loses); the kernel completes it.
    - anything else: no header work (a bad checksum stays bad: the kernel drops it).
    Never raises on contents.
    """
    try:
        p = parse(frame, tap=True, use_ip_length=gso_size <= 0)
    except MalformedPacket:
        return ZERO_HEADER
    if p.fragment or p.l4_len == 0 or p.proto not in (IPPROTO_TCP, IPPROTO_UDP):
        return ZERO_HEADER
    off = TCP_CSUM_OFFSET if p.proto == IPPROTO_TCP else UDP_CSUM_OFFSET
    if gso_size <= 0 and 0 < mtu < p.end - p.l3_off:
        gso_size = mtu - (p.payload_off - p.l3_off)
    if gso_size > 0:
        if p.proto == IPPROTO_UDP:
            kind = VIRTIO_NET_HDR_GSO_UDP_L4
        else:
            kind = VIRTIO_NET_HDR_GSO_TCPV4 if p.version == 4 else VIRTIO_NET_HDR_GSO_TCPV6
        return VnetHeader(VIRTIO_NET_HDR_F_NEEDS_CSUM, kind, p.payload_off, gso_size,
                          p.l4_off, off)
    at = p.l4_off + off
    field = (frame[at] << 8) | frame[at + 1]
    if p.proto == IPPROTO_UDP and field == 0:
        return ZERO_HEADER  # no checksum (IPv4)
    length = p.end - p.l4_off
    seed = pseudo_header_sum(p.src, p.pseudo_dst, p.proto, length)
    if (residue(frame[p.l4_off : p.end]) + seed) % _M == 0:
        return ZERO_HEADER  # complete and correct
    if field == seed:
        return VnetHeader(VIRTIO_NET_HDR_F_NEEDS_CSUM, 0, p.payload_off, 0, p.l4_off, off)
    return ZERO_HEADER


def too_big_reply(frame: Buffer, mtu: int) -> bytes | None:
    """The ICMP error that tells the sender of `frame` (an Ethernet frame from the TAP) to send
    IP packets of at most `mtu` bytes: "fragmentation needed" for IPv4 with DF set, "packet too
    big" for IPv6; None when no such error is due (IPv4 without DF, not IP, an ICMP error
    itself). It comes from the frame's destination, as the kernel's tunnels build it
    (iptunnel_pmtud_build_icmp), so the sender's stack lowers its path MTU to that address."""
    try:
        p = parse(frame, tap=True, use_ip_length=False)
    except MalformedPacket:
        return None
    l3 = p.l3_off
    eth = b"".join((frame[6:12], frame[0:6], frame[12:l3]))
    if p.version == 4:
        flags = (frame[l3 + 6] << 8) | frame[l3 + 7]
        if not flags & IP_DF or (p.proto == IPPROTO_ICMP and frame[p.l4_off] not in (0, 8)):
            return None
        quoted = bytes(frame[l3 : l3 + min(len(frame) - l3, IPV4_MIN_MTU - 20 - 8)])
        icmp = bytearray(struct.pack("!BBHHH", ICMP_DEST_UNREACH, ICMP_FRAG_NEEDED, 0, 0,
                                     min(mtu, 0xFFFF)) + quoted)
        struct.pack_into("!H", icmp, 2, checksum(icmp))
        ip = bytearray(struct.pack("!BBHHHBBH4s4s", 0x45, 0xC0, 20 + len(icmp), 0, 0, 64,
                                   IPPROTO_ICMP, 0, p.dst, p.src))
        struct.pack_into("!H", ip, 10, checksum(ip))
        return b"".join((eth, ip, icmp))
    if p.proto == IPPROTO_ICMPV6 and p.l4_off < len(frame) and frame[p.l4_off] < 128:
        return None  # never answer an ICMPv6 error with one
    quoted = bytes(frame[l3 : l3 + min(len(frame) - l3, IPV6_MIN_MTU - 40 - 8)])
    body = bytearray(struct.pack("!BBHI", ICMPV6_PKT_TOOBIG, 0, 0, mtu) + quoted)
    seed = pseudo_header_sum(p.dst, p.src, IPPROTO_ICMPV6, len(body))
    struct.pack_into("!H", body, 2, checksum(body, seed))
    ip6 = struct.pack("!IHBB16s16s", 6 << 28, len(body), IPPROTO_ICMPV6, 64, p.dst, p.src)
    return b"".join((eth, ip6, bytes(body)))
