"""Coalesce wire-size TCP/UDP packets into GSO super-packets before a write (GRO in userspace).

Writing one 64 KB super-packet with a virtio-net header costs the kernel one trip through the
stack instead of forty-five. `coalesce` joins a batch's in-order segments of one flow the way
the kernel's own GRO would accept them (the rules below follow tcp_gro_receive/inet_gro_receive,
as wireguard-go's tun/offload_linux.go also does), so that the kernel's segmentation of the
result gives back the very same packets:

- same flow: the 5-tuple, and on TAP the same Ethernet header (MACs, VLAN tags);
- IPv4 without options or fragmentation, equal TOS, TTL and DF, ids counting up by one (or, with
  DF set, all equal); IPv6 without extension headers, equal class, flow label and hop limit;
- except UDP datagrams with DF set, whose ids may be anything: the ID of an atomic datagram means
  nothing (RFC 6864), and unconnected sockets take theirs from a counter shared by every flow to
  that host (ids 16 apart for 16 flows), so by the kernel's rule they would never join. The
  kernel's segmentation of the result gives them ids counting up from the first one's; all else
  comes back byte for byte. (wireguard-go's GRO ignores ids for TCP and UDP alike.)
- TCP: the sequence number continues the group, equal ack, window, urgent pointer, header
  length and option bytes (timestamps included); ACK set, no SYN/FIN/RST/URG; CWR only on the
  first segment (the result then carries the GSO ECN bit); PSH ends a group;
- UDP: a non-zero checksum (a zero one cannot be verified or restored);
- every segment but the last has the first one's payload size; a shorter one ends the group;
- the coalesced IP packet stays within `max_size` (65535) bytes;
- each joined segment's transport checksum is verified first (`verify=True`), so that the
  kernel, which trusts NEEDS_CSUM packets, is never handed corrupted data to re-checksum.

Anything else passes through untouched with a zero header, and the output keeps the input's
order: a group sits where its first packet was, and a packet of a flow that cannot join that
flow's open group closes it, so packets of one flow are never reordered. (Packets whose ports
are not looked at, IPv4 with options, IPv6 with extension headers and IP fragments, do not
close a group of the same addresses and ports; such mixes within one flow do not occur in
practice.)

Output shape: a list of (VnetHeader, bytes-like), one per packet to write; a pass-through
packet is the caller's own object (a memoryview stays a view).
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from typing import Any, Final

from mqtun._uapi import (
    ETH_P_IP,
    ETH_P_IPV6,
    IPPROTO_TCP,
    IPPROTO_UDP,
    TCP_CSUM_OFFSET,
    TCPHDR_ACK,
    TCPHDR_CWR,
    TCPHDR_FIN,
    TCPHDR_PSH,
    TCPHDR_RST,
    TCPHDR_SYN,
    TCPHDR_URG,
    UDP_CSUM_OFFSET,
    UDP_HLEN,
    VIRTIO_NET_HDR_F_NEEDS_CSUM,
    VIRTIO_NET_HDR_GSO_ECN,
    VIRTIO_NET_HDR_GSO_TCPV4,
    VIRTIO_NET_HDR_GSO_TCPV6,
    VIRTIO_NET_HDR_GSO_UDP_L4,
)
from mqtun.packet import accel
from mqtun.packet.checksum import (
    congruent,
    packet_sums,
    piece_sums_array,
    pseudo_header_sum,
    residue,
    vector,
)
from mqtun.packet.headers import Buffer, MalformedPacket, parse, parse_ethernet
from mqtun.packet.vnet import ZERO_HEADER, VnetHeader

__all__ = ["MAX_SIZE", "coalesce", "offload_checksum"]

_M: Final = 0xFFFF
MAX_SIZE: Final = 0xFFFF  # an IP packet's largest length: coalesce's default max_size
_NOT_FOR_GRO: Final = TCPHDR_SYN | TCPHDR_FIN | TCPHDR_RST | TCPHDR_URG
_IPV4_DF: Final = 0x4000
_IPV4_FRAG: Final = 0x3FFF  # MF + fragment offset (the reserved bit is compared, not refused)

# IP header then the fixed transport header, in one unpack
_V4TCP = struct.Struct("!xBHHHBxxx4s4sHHIIBBHxxH")  # tos tot id frag ttl src dst | tcp
_V6TCP = struct.Struct("!IHxB16s16sHHIIBBHxxH")  # vtf plen hop src dst | tcp
_V4UDP = struct.Struct("!xBHHHBxxx4s4sHHHH")
_V6UDP = struct.Struct("!IHxB16s16sHHHH")
_U16 = struct.Struct("!H")
_U16X2 = struct.Struct("!HH")
_U32 = struct.Struct("!I")
_from_bytes = int.from_bytes


class _Group:
    """A run of same-flow segments being joined; `parts` are their payloads, in order."""

    __slots__ = (
        "any_id",
        "base_flags",
        "checked",
        "first",
        "first_sum",
        "hlen",
        "id_step",
        "ip_id",
        "is_open",
        "l3",
        "l4",
        "mask",
        "masked",
        "mss",
        "n",
        "n0",
        "next_seq",
        "parts",
        "proto",
        "psh",
        "sig",
        "size",
        "v4",
        "vadj",
    )

    def __init__(
        self,
        first: Buffer,
        proto: int,
        v4: bool,
        l3: int,
        l4: int,
        hlen: int,
        sig: tuple[object, ...],
        mss: int,
        ip_id: int,
        next_seq: int,
        psh: bool,
        first_sum: int | None,
        any_id: bool = False,
    ) -> None:
        self.first = first
        self.first_sum = first_sum  # congruent() of `first`, when already known
        self.proto = proto
        self.v4 = v4
        self.l3 = l3
        self.l4 = l4
        self.hlen = hlen
        self.sig = sig
        self.mss = mss
        self.ip_id = ip_id
        self.id_step = -1  # unknown until the second segment: 1 counting, 0 fixed (DF)
        self.any_id = any_id  # a UDP datagram with DF: ids not compared (the module doc)
        self.next_seq = next_seq
        self.psh = psh
        self.is_open = not psh
        self.n = 1
        self.size = hlen - l3 + mss  # the IP packet's length so far
        self.parts: list[Buffer] = [memoryview(first)[hlen:]]
        self.vadj = 0  # verification constant, set by the first packet's check
        self.checked = False  # _verify_first ran (a failure also closes the group)
        self.masked: int | None = None  # the fast path's header image, armed at the 2nd segment
        self.mask = self.n0 = self.base_flags = 0


_masks: dict[tuple[int, int, int, int], int] = {}
_FAST_PATH = True  # tests turn it off to check the fast paths (and the C one) against the general


def _arm(g: _Group) -> None:
    """Prepare the fast path: the header bits every full-size follower must repeat exactly.

    Masked out are what changes per segment (IPv4 id and header checksum, TCP seq, flags and
    checksum, UDP checksum); everything else (addresses, ports, TOS/TTL/DF or class/flow/hop
    limit, lengths of a full-size segment, ack, window, options, the Ethernet header) must be
    bit-equal, which is the general path's flow key and signature in one comparison.
    """
    l3, l4, hlen = g.l3, g.l4, g.hlen
    ck = (l3, l4, hlen, g.proto)
    mask = _masks.get(ck)
    if mask is None:
        m = bytearray(b"\xff" * hlen)
        if g.v4:
            m[l3 + 4 : l3 + 6] = m[l3 + 10 : l3 + 12] = b"\0\0"
        if g.proto == IPPROTO_TCP:
            m[l4 + 4 : l4 + 8] = b"\0\0\0\0"
            m[l4 + 13] = 0
            m[l4 + 16 : l4 + 18] = b"\0\0"
        else:
            m[l4 + 6 : l4 + 8] = b"\0\0"
        mask = _masks[ck] = _from_bytes(m, "big")
    first = g.first
    g.mask = mask
    g.masked = _from_bytes(first[:hlen], "big") & mask
    g.n0 = len(first)
    if g.proto == IPPROTO_TCP:
        g.base_flags = first[l4 + 13] & ~(TCPHDR_PSH | TCPHDR_CWR)


def _verify_first(g: _Group) -> bool:
    """Check the group's first packet and keep the constant its followers are checked with.

    A whole packet is summed (no slice copy): on IPv4 a correct header sums to 0xFFFF, so the
    sum verifies the IP header checksum too and leaves the transport part; on IPv6 the fixed
    header words other than the addresses are taken out again. With `vadj`, a packet of the
    group is intact when (sum + vadj [+ transport length on IPv4]) % 0xFFFF == 0.
    """
    pkt, l3, l4 = g.first, g.l3, g.l4
    adj = -residue(pkt[:l3]) if l3 else 0
    if g.v4:
        adj += residue(pkt[l3 + 12 : l3 + 20]) + g.proto  # pseudo-header: addresses, protocol
        total = len(pkt) - l4
    else:
        adj += g.proto - residue(pkt[l3 : l3 + 8]) + (len(pkt) - l4)  # minus payload length
        total = 0
    g.vadj = adj
    g.checked = True
    folded = congruent(pkt) if g.first_sum is None else g.first_sum
    if (folded + adj + total) % _M:
        g.is_open = False
        return False
    return True


def coalesce(
    packets: Sequence[Buffer],
    *,
    tap: bool = False,
    max_size: int = MAX_SIZE,
    tcp: bool = True,
    udp: bool = True,
    verify: bool = True,
) -> list[tuple[VnetHeader, Buffer]]:
    """Join the batch's coalescable segments into super-packets; see the module doc for the rules.

    `packets` are IP packets (TUN) or Ethernet frames (TAP) with complete checksums. `udp=False`
    keeps UDP out (for a kernel without USO), `tcp=False` TCP; `verify=False` skips the
    checksum verification (only for packets whose integrity is already known). A packet that
    is not joined comes back as the caller's own object (no copy). Never raises on contents.
    """
    max_size = min(max_size, MAX_SIZE)
    joined = accel.coalesce() if _FAST_PATH else None
    if joined is not None:  # the same rules in C, one pass (this code is its reference)
        return joined(packets, tap, max_size, tcp, udp, verify)  # type: ignore[no-any-return]
    out: list[tuple[VnetHeader, Buffer] | _Group] = []
    groups: dict[tuple[object, ...], _Group] = {}
    fg: _Group | None = None  # the group that took the last packet: the fast path's guess
    np = vector() if len(packets) >= _RUN_MIN and _FAST_PATH else None
    sums = None if np is not None or not verify else packet_sums(packets)
    count = len(packets)
    i = -1
    while i + 1 < count:
        i += 1
        pkt = packets[i]
        n = len(pkt)
        # --- fast path: a full-size follower of the group that took the previous packet ------
        if (
            fg is not None
            and n == fg.n0
            and fg.is_open
            and fg.masked is not None
            and _from_bytes(pkt[: fg.hlen], "big") & fg.mask == fg.masked
        ):
            l3, l4 = fg.l3, fg.l4
            if fg.proto == IPPROTO_TCP:
                (seq,) = _U32.unpack_from(pkt, l4 + 4)
                flags = pkt[l4 + 13]
                ok = seq == fg.next_seq and flags & ~TCPHDR_PSH == fg.base_flags
            else:
                flags = 0
                ok = bool(pkt[l4 + 6] or pkt[l4 + 7])
            if (
                ok
                and (
                    not fg.v4
                    or fg.any_id
                    or ((pkt[l3 + 4] << 8) | pkt[l3 + 5]) == (fg.ip_id + fg.id_step * fg.n) & 0xFFFF
                )
                and fg.size + fg.mss <= max_size
                and (
                    not verify
                    or (((sums and sums[i]) or congruent(pkt)) + fg.vadj
                        + (n - l4 if fg.v4 else 0)) % _M == 0
                )
            ):
                fg.parts.append(memoryview(pkt)[fg.hlen :])
                fg.n += 1
                fg.size += fg.mss
                if fg.proto == IPPROTO_TCP:
                    fg.next_seq = (fg.next_seq + fg.mss) & 0xFFFFFFFF
                    if flags & TCPHDR_PSH:
                        fg.psh = True
                        fg.is_open = False
                continue
        # --- general path -----------------------------------------------------------------
        l3 = 0
        l2: bytes = b""
        if tap:
            try:
                etype, l3 = parse_ethernet(pkt)
            except MalformedPacket:
                etype = 0
            if etype != ETH_P_IP and etype != ETH_P_IPV6:
                out.append((ZERO_HEADER, pkt))
                continue
            l2 = bytes(pkt[:l3])
        g = None
        vb = pkt[l3] if n > l3 else 0
        proto = -1
        v4 = vb == 0x45  # IPv4 without options
        if v4:
            if n >= l3 + 28:
                proto = pkt[l3 + 9]
            l4 = l3 + 20
        elif vb >> 4 == 6:
            if n >= l3 + 48:
                proto = pkt[l3 + 6]
            l4 = l3 + 40
        # --- parse: the flow key, whether the packet may join, and what must match ----------
        candidate = False
        seq = cwr = 0
        psh = False
        ip_id = frag = 0
        if proto == IPPROTO_TCP and tcp and n >= l4 + 20:
            if v4:
                (tos, tot, ip_id, frag, ttl, src, dst, sport, dport,
                 seq, ack, doff, flags, win, urg) = _V4TCP.unpack_from(pkt, l3)  # fmt: skip
                ok = tot == n - l3 and not frag & _IPV4_FRAG
                ipsig: tuple[int, ...] = (tos, frag, ttl)
            else:
                vtf, plen, hop, src, dst, sport, dport, seq, ack, doff, flags, win, urg = (
                    _V6TCP.unpack_from(pkt, l3)
                )
                ok = plen == n - l4
                ipsig = (vtf, hop)
            key: tuple[object, ...] = (l2, src, dst, IPPROTO_TCP, sport, dport)
            g = groups.get(key)
            hlen = l4 + (doff >> 4) * 4
            size = n - hlen
            if (
                ok
                and hlen >= l4 + 20
                and size > 0
                and flags & TCPHDR_ACK
                and not flags & _NOT_FOR_GRO
            ):
                candidate = True
                psh = bool(flags & TCPHDR_PSH)
                cwr = flags & TCPHDR_CWR
                opts = bytes(pkt[l4 + 20 : hlen]) if hlen > l4 + 20 else b""
                sig: tuple[object, ...] = (
                    ipsig, ack, doff, flags & ~(TCPHDR_PSH | TCPHDR_CWR), win, urg, opts,
                )  # fmt: skip
        elif proto == IPPROTO_UDP and udp and n >= l4 + 8:
            if v4:
                tos, tot, ip_id, frag, ttl, src, dst, sport, dport, ulen, ucsum = (
                    _V4UDP.unpack_from(pkt, l3)
                )
                ok = tot == n - l3 and not frag & _IPV4_FRAG
                sig = (tos, frag, ttl)
            else:
                vtf, plen, hop, src, dst, sport, dport, ulen, ucsum = _V6UDP.unpack_from(pkt, l3)
                ok = plen == n - l4
                sig = (vtf, hop)
            key = (l2, src, dst, IPPROTO_UDP, sport, dport)
            g = groups.get(key)
            hlen = l4 + UDP_HLEN
            size = n - hlen
            candidate = ok and ulen == n - l4 and ucsum != 0 and size > 0
        if not candidate:
            if g is not None:  # same flow, but this packet cannot join: keep the flow in order
                g.is_open = False
            out.append((ZERO_HEADER, pkt))
            continue
        # --- join the flow's open group, or start a new one ---------------------------------
        if (
            g is not None
            and g.is_open
            and sig == g.sig
            and size <= g.mss
            and g.size + size <= max_size
            and (proto == IPPROTO_UDP or (seq == g.next_seq and not cwr))
            and (
                not v4
                or g.any_id
                or (
                    ip_id == (g.ip_id + g.id_step * g.n) & 0xFFFF
                    if g.id_step >= 0
                    else _id_step(g, ip_id, frag)
                )
            )
            and (
                not verify
                or (
                    (g.checked or _verify_first(g))
                    and (((sums and sums[i]) or congruent(pkt)) + g.vadj + (n - l4 if v4 else 0))
                    % _M == 0
                )
            )
        ):
            g.parts.append(memoryview(pkt)[hlen:])
            g.n += 1
            g.size += size
            g.next_seq = (seq + size) & 0xFFFFFFFF
            if psh or size < g.mss:
                g.psh = psh
                g.is_open = False
            elif g.masked is None and _FAST_PATH:
                _arm(g)
                if np is not None:  # the full-size run that follows, checked all at once
                    i += _absorb(np, g, packets, i + 1, max_size, verify)
            fg = g
            continue
        if g is not None:
            g.is_open = False
        g = groups[key] = _Group(
            pkt, proto, v4, l3, l4, hlen, sig, size, ip_id, (seq + size) & 0xFFFFFFFF, psh,
            sums[i] if sums else None, v4 and proto == IPPROTO_UDP and bool(frag & _IPV4_DF),
        )
        out.append(g)
        fg = g
        if np is not None and g.is_open and i + _RUN_MIN < count and len(packets[i + 1]) == n:
            i += _start_run(np, g, packets, i + 1, max_size, verify)
    return [item if type(item) is tuple else _finish(item) for item in out]  # type: ignore[arg-type]


_RUN_MIN: Final = 8  # a run of fewer full-size followers goes through the per-packet fast path
_rows_masks: dict[tuple[int, int, int, int], Any] = {}
_steps: dict[int, Any] = {}


def _start_run(np: Any, g: _Group, packets: Sequence[Buffer], start: int, max_size: int,
               verify: bool) -> int:  # fmt: skip
    """At a group's first packet: join the full-size run that follows it at once (see _absorb),
    if one does; the group is left as it was when none joins."""
    _arm(g)
    took = _absorb(np, g, packets, start, max_size, verify) if (
        not verify or _verify_first(g)) else 0  # fmt: skip
    if not took:
        g.masked = None  # the general path takes the next packet, as without the run
    return took


def _absorb(
    np: Any, g: _Group, packets: Sequence[Buffer], start: int, max_size: int, verify: bool
) -> int:
    """Join the run of full-size packets from `start` that the per-packet paths would join,
    checked as the rows of one array; returns how many joined (0: the run is left to them).

    The same tests, all rows at once: each header equal to the one expected (the first
    packet's, with the TCP seq and the IPv4 id counted on, the flags without PSH), a UDP
    checksum non-zero, the size limit, each row's checksum; PSH joins, then ends the group.
    """
    n0 = g.n0
    end = start
    limit = min(len(packets), start + (max_size - g.size) // g.mss)
    # the run is of this flow only: addresses (and any options or extension headers) and ports
    # as the first packet's -- interleaved flows of one size would make a run that fails at
    # its first row, each array pass wasted (measured: 12 us a packet for 16 UDP flows)
    a, b = g.l3 + (12 if g.v4 else 8), g.l4 + 4
    flow = g.first[a:b]
    while end < limit and len(packets[end]) == n0 and packets[end][a:b] == flow:
        end += 1
    k = end - start
    if k < _RUN_MIN or n0 & 1 or not g.is_open:
        return 0
    l3, l4, hlen, tcp = g.l3, g.l4, g.hlen, g.proto == IPPROTO_TCP
    step = g.id_step
    if g.v4 and not g.any_id and step < 0:  # the second packet decides: ids +1, or fixed (DF)
        nxt = packets[start]
        got = (nxt[l3 + 4] << 8) | nxt[l3 + 5]
        if got == (g.ip_id + 1) & 0xFFFF:
            step = 1
        elif got == g.ip_id and g.first[l3 + 6] & (_IPV4_DF >> 8):
            step = 0
        else:
            return 0
    ck = (l3, l4, hlen, g.proto)
    mask = _rows_masks.get(ck)
    if mask is None:  # what must equal: all but the checksums and the PSH bit
        m = bytearray(b"\xff" * hlen)
        if g.v4:
            m[l3 + 10 : l3 + 12] = b"\0\0"
        if tcp:
            m[l4 + 13] = 0xFF & ~TCPHDR_PSH
            m[l4 + 16 : l4 + 18] = b"\0\0"
        else:
            m[l4 + 6 : l4 + 8] = b"\0\0"
        mask = _rows_masks[ck] = np.frombuffer(bytes(m), dtype=np.uint8)
    steps = _steps.get(k)
    if steps is None:
        steps = _steps[k] = np.arange(k, dtype=np.uint32)
    buf = b"".join(packets[start:end])
    rows = np.frombuffer(buf, dtype=np.uint8).reshape(k, n0)
    heads = rows[:, :hlen]
    want = np.empty((k, hlen), dtype=np.uint8)
    want[:] = np.frombuffer(g.first, dtype=np.uint8, count=hlen) & mask
    if tcp:
        seq = steps * np.uint32(g.mss) + np.uint32(g.next_seq)  # 32-bit wrap, as TCP's
        want[:, l4 + 4 : l4 + 8] = seq.astype(">u4").view(np.uint8).reshape(k, 4)
        want[:, l4 + 13] = g.base_flags
    if g.any_id:
        want[:, l3 + 4 : l3 + 6] = heads[:, l3 + 4 : l3 + 6]
    elif g.v4:
        ids = (steps * np.uint32(step) + np.uint32(g.ip_id + step * g.n)).astype(">u2")
        want[:, l3 + 4 : l3 + 6] = ids.view(np.uint8).reshape(k, 2)
    ok = ((heads & mask) == want).all(1)
    if not tcp:
        ok &= (heads[:, l4 + 6] | heads[:, l4 + 7]) != 0
    if verify:
        sums = piece_sums_array(buf, n0, k, big_endian=False)
        if sums is None:
            return 0
        c0 = (g.vadj + (n0 - l4 if g.v4 else 0)) * 256 % _M  # see piece_sums_array
        ok &= (sums + np.uint64(c0)) % np.uint64(_M) == 0
    took = k if ok.all() else int(ok.argmin())  # the first row that fails ends the run
    if tcp and took:
        pushed = np.flatnonzero(heads[:took, l4 + 13] & TCPHDR_PSH)
        if len(pushed):
            took = int(pushed[0]) + 1
            g.psh = True
            g.is_open = False
    if not took:
        return 0
    g.parts.append(rows[:took, hlen:].tobytes())
    g.id_step = step
    g.n += took
    g.size += took * g.mss
    if tcp:
        g.next_seq = (g.next_seq + took * g.mss) & 0xFFFFFFFF
    return took


def _id_step(g: _Group, ip_id: int, frag: int) -> bool:
    """At the second segment: IPv4 ids must count up by one, or (DF set) stay fixed."""
    if ip_id == (g.ip_id + 1) & 0xFFFF:
        g.id_step = 1
        return True
    if ip_id == g.ip_id and frag & _IPV4_DF:
        g.id_step = 0
        return True
    return False


def _finish(g: _Group) -> tuple[VnetHeader, Buffer]:
    """The group's super-packet and its header (or its single packet, untouched)."""
    first = g.first
    if g.n == 1:
        return ZERO_HEADER, first
    l3, l4, hlen = g.l3, g.l4, g.hlen
    head = bytearray(first[:hlen])
    l4_len = g.size - (l4 - l3)
    if g.v4:
        head[l3 + 10 : l3 + 12] = b"\0\0"
        _U16.pack_into(head, l3 + 2, g.size)
        r = residue(head[l3:l4])
        _U16.pack_into(head, l3 + 10, _M - r if r else 0)
        src = bytes(head[l3 + 12 : l3 + 16])
        dst = bytes(head[l3 + 16 : l3 + 20])
    else:
        _U16.pack_into(head, l3 + 4, g.size - 40)
        src = bytes(head[l3 + 8 : l3 + 24])
        dst = bytes(head[l3 + 24 : l3 + 40])
    seed = pseudo_header_sum(src, dst, g.proto, l4_len)
    if g.proto == IPPROTO_TCP:
        cwr = head[l4 + 13] & TCPHDR_CWR
        if g.psh:
            head[l4 + 13] |= TCPHDR_PSH
        _U16.pack_into(head, l4 + TCP_CSUM_OFFSET, seed)
        gso_type = VIRTIO_NET_HDR_GSO_TCPV4 if g.v4 else VIRTIO_NET_HDR_GSO_TCPV6
        if cwr:
            gso_type |= VIRTIO_NET_HDR_GSO_ECN
        csum_offset = TCP_CSUM_OFFSET
    else:
        _U16X2.pack_into(head, l4 + 4, l4_len, seed)
        gso_type = VIRTIO_NET_HDR_GSO_UDP_L4
        csum_offset = UDP_CSUM_OFFSET
    g.parts.insert(0, memoryview(head))
    data = b"".join(g.parts)
    hdr = VnetHeader(VIRTIO_NET_HDR_F_NEEDS_CSUM, gso_type, hlen, g.mss, l4, csum_offset)
    return hdr, data


def offload_checksum(packet: Buffer, *, tap: bool = False) -> tuple[VnetHeader, bytes]:
    """The reverse of completing a NEEDS_CSUM packet: leave its TCP/UDP checksum to the kernel.

    The checksum field gets the pseudo-header sum and the header says NEEDS_CSUM, csum_start at
    the transport header; a packet that is neither TCP nor UDP (or a later fragment) comes back
    unchanged with a zero header. Raises `MalformedPacket` if the packet does not parse.
    """
    p = parse(packet, tap=tap)
    if p.l4_len == 0 or (p.proto != IPPROTO_TCP and p.proto != IPPROTO_UDP) or p.fragment:
        return ZERO_HEADER, packet if type(packet) is bytes else bytes(packet)
    buf = bytearray(packet)
    seed = pseudo_header_sum(p.src, p.pseudo_dst, p.proto, p.end - p.l4_off)
    off = TCP_CSUM_OFFSET if p.proto == IPPROTO_TCP else UDP_CSUM_OFFSET
    _U16.pack_into(buf, p.l4_off + off, seed)
    hdr = VnetHeader(VIRTIO_NET_HDR_F_NEEDS_CSUM, 0, p.payload_off, 0, p.l4_off, off)
    return hdr, bytes(buf)
