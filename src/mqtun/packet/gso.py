"""Split a GSO super-packet into the wire-size packets it stands for (segmentation in userspace).

A queue with TSO/USO offloads hands out TCP/UDP super-packets of up to 64 KB with a
virtio-net header saying how to cut them; a device without those offloads (or a socket)
needs the segments. `split` does what the kernel's tcp_gso_segment/__udp_gso_segment do:

- the L4 payload is cut in `gso_size` chunks and every chunk gets a copy of the headers;
- IPv4: total length, id + i, header checksum; IPv6: payload length;
- TCP: seq + offset, CWR only on the first segment, FIN and PSH only on the last;
- UDP (USO): length per segment;
- every transport checksum is computed in full (the super-packet's field is ignored).

The header's `hdr_len` and `csum_start` are hints; the packet's own headers are parsed and
win. Anything that does not parse, or a header that asks for something impossible, raises
`MalformedPacket` and nothing else.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Any, Final, NamedTuple

from mqtun._uapi import (
    GSO_MAX_SEGS,
    IPPROTO_TCP,
    IPPROTO_UDP,
    TCPHDR_CWR,
    TCPHDR_FIN,
    TCPHDR_PSH,
    UDP_HLEN,
    VIRTIO_NET_HDR_F_NEEDS_CSUM,
    VIRTIO_NET_HDR_F_UDP_TUNNEL_CSUM,
    VIRTIO_NET_HDR_GSO_ECN,
    VIRTIO_NET_HDR_GSO_NONE,
    VIRTIO_NET_HDR_GSO_TCPV4,
    VIRTIO_NET_HDR_GSO_TCPV6,
    VIRTIO_NET_HDR_GSO_UDP,
    VIRTIO_NET_HDR_GSO_UDP_L4,
    VIRTIO_NET_HDR_GSO_UDP_TUNNEL,
    VIRTIO_NET_HDR_GSO_UDP_TUNNEL_IPV4,
    VIRTIO_NET_HDR_GSO_UDP_TUNNEL_IPV6,
    VXLAN_HLEN,
)
from mqtun.packet import accel
from mqtun.packet.checksum import (
    completed,
    congruent,
    fold_plan,
    piece_sums_array,
    pseudo_header_residue,
    residue,
    vector,
)
from mqtun.packet.headers import Buffer, MalformedPacket, Parsed, parse, parse_ethernet
from mqtun.packet.vnet import VnetHeader

__all__ = ["Train", "segment_count", "split", "split_train"]

_M: Final = 0xFFFF
_U16 = struct.Struct("!H")
_U32 = struct.Struct("!I")
_U16X2 = struct.Struct("!HH")
_MAX_L3: Final = 0xFFFF
_VECTOR_ROWS: Final = 8  # fewer full segments than this: numpy's fixed cost outweighs the loop


def _as_bytes_view(packet: Buffer) -> memoryview:
    mv = memoryview(packet)
    if mv.ndim != 1 or mv.itemsize != 1 or mv.format != "B":
        mv = mv.cast("B")
    return mv


def split(
    hdr: VnetHeader,
    packet: Buffer,
    *,
    tap: bool = False,
    max_segments: int = GSO_MAX_SEGS,
    mtu: int | None = None,
) -> list[bytes]:
    """The wire packets that `packet` (an IP packet, or an Ethernet frame if `tap`) stands for.

    Without GSO the packet comes back alone, its checksum completed if NEEDS_CSUM is set. A
    super-packet whose payload fits in one segment still gets full checksums. More than
    `max_segments` segments raise `MalformedPacket("too-many-segments")`.

    With `mtu`, no segment's IP packet is longer: a TCP super-packet is cut in smaller
    segments if its gso_size asks for more (as TSO may), a UDP one (whose datagrams cannot be
    re-cut) raises `MalformedPacket("over-mtu")`. Without GSO the packet is not checked.
    """
    mv = _as_bytes_view(packet)
    gso = hdr.gso_type
    if gso == VIRTIO_NET_HDR_GSO_NONE:
        if hdr.flags & VIRTIO_NET_HDR_F_NEEDS_CSUM:
            return [completed(mv, hdr.csum_start, hdr.csum_offset)]
        return [packet if type(packet) is bytes else mv.tobytes()]
    if hdr.gso_size <= 0:
        raise MalformedPacket("zero-gso-size")
    if gso & VIRTIO_NET_HDR_GSO_UDP_TUNNEL:
        return _split_tunnel(hdr, mv, tap, max_segments, mtu)
    p = parse(mv, tap=tap, use_ip_length=False)
    _check_kind(gso & ~VIRTIO_NET_HDR_GSO_ECN, p)
    rows, pieces = _segment(mv, p, _fit(hdr.gso_size, p, mtu, 0), max_segments, as_list=True)
    return _split_rows(rows) + pieces if rows is not None else pieces


@dataclass(frozen=True, slots=True)
class Train:
    """`count` packets of `size` bytes back to back in `body`, then a shorter `tail` (empty if
    none): a split in the form UDP GSO sends it (one UDP_SEGMENT sendmsg per run, no list of
    per-segment objects, no join)."""

    body: Buffer
    size: int
    count: int
    tail: Buffer

    def __len__(self) -> int:
        return self.count + (1 if len(self.tail) else 0)

    def packets(self) -> list[bytes]:
        """Each packet as bytes (for tests and for callers that want split()'s form)."""
        body = bytes(self.body)
        out = [body[k : k + self.size] for k in range(0, self.count * self.size, self.size)]
        return [*out, bytes(self.tail)] if len(self.tail) else out


def split_train(
    hdr: VnetHeader,
    packet: Buffer,
    *,
    tap: bool = False,
    prefix: bytes = b"",
    max_segments: int = GSO_MAX_SEGS,
    mtu: int | None = None,
) -> Train:
    """What split() returns, each packet behind `prefix` (e.g. a tunnel header), as a Train:
    the full-size segments are built in one pass into one buffer (numpy), ready for a
    UDP_SEGMENT send. The same checks, refusals and fields as split(); a packet without GSO
    is a train of one."""
    mv = _as_bytes_view(packet)
    gso = hdr.gso_type
    if gso == VIRTIO_NET_HDR_GSO_NONE or gso & VIRTIO_NET_HDR_GSO_UDP_TUNNEL:
        pieces = [b"".join((prefix, s)) for s in split(hdr, mv, tap=tap,
                                                        max_segments=max_segments, mtu=mtu)]
        return _train_of(pieces)
    if hdr.gso_size <= 0:
        raise MalformedPacket("zero-gso-size")
    p = parse(mv, tap=tap, use_ip_length=False)
    _check_kind(gso & ~VIRTIO_NET_HDR_GSO_ECN, p)
    rows, pieces = _segment(mv, p, _fit(hdr.gso_size, p, mtu, 0), max_segments, prefix)
    if rows is None:
        return _train_of(pieces)
    (tail,) = pieces or (b"",)
    return Train(rows.body, rows.size, rows.segments, tail)


def _train_of(pieces: list[bytes]) -> Train:
    """Pieces of one size but maybe the last, as a Train (their full ones joined)."""
    size = len(pieces[0])
    if len(pieces) > 1 and len(pieces[-1]) != size:
        return Train(b"".join(pieces[:-1]), size, len(pieces) - 1, pieces[-1])
    return Train(b"".join(pieces) if len(pieces) > 1 else pieces[0], size, len(pieces), b"")


def _fit(mss: int, p: Parsed, mtu: int | None, outer: int) -> int:
    """The segment payload size to cut at: `mss`, or less so that an IP packet of `outer`
    bytes of encapsulation plus the headers in `p` stays within `mtu` (TCP only)."""
    if mtu is None:
        return mss
    room = mtu - outer - (p.payload_off - p.l3_off)
    if mss <= room:
        return mss
    if p.proto != IPPROTO_TCP or room <= 0:
        raise MalformedPacket("over-mtu", f"segments of {mss} bytes, {room} fit in MTU {mtu}")
    return room


def segment_count(hdr: VnetHeader, packet: Buffer, *, tap: bool = False) -> int:
    """How many wire packets `packet` stands for: what split() would return, without cutting.

    For counting: a super-packet that does not parse is estimated from its header (hdr_len,
    gso_size), and a plain packet is one.
    """
    exact = exact_segment_count(hdr, packet, tap=tap)
    if exact is not None:
        return exact
    return max(1, -(-(len(packet) - hdr.hdr_len) // hdr.gso_size))


def exact_segment_count(hdr: VnetHeader, packet: Buffer, *, tap: bool = False) -> int | None:
    """segment_count where it is exact: None where it would only estimate (a UDP tunnel's
    super-packet, or one that does not parse)."""
    if hdr.gso_type == VIRTIO_NET_HDR_GSO_NONE:
        return 1
    size = hdr.gso_size
    if size <= 0:
        return 1
    if hdr.gso_type & VIRTIO_NET_HDR_GSO_UDP_TUNNEL:
        return None  # the estimate is good enough here
    try:
        p = parse(packet, tap=tap, use_ip_length=False)
    except MalformedPacket:
        return None
    return max(1, -(-(p.end - p.payload_off) // size))


def _check_kind(base: int, p: Parsed) -> None:
    if base == VIRTIO_NET_HDR_GSO_TCPV4:
        ok = p.version == 4 and p.proto == IPPROTO_TCP
    elif base == VIRTIO_NET_HDR_GSO_TCPV6:
        ok = p.version == 6 and p.proto == IPPROTO_TCP
    elif base == VIRTIO_NET_HDR_GSO_UDP_L4:
        ok = p.proto == IPPROTO_UDP
    elif base == VIRTIO_NET_HDR_GSO_UDP:
        raise MalformedPacket("bad-gso-type", "UFO (GSO_UDP, IP fragmentation) is not supported")
    else:
        raise MalformedPacket("bad-gso-type", f"gso_type {base:#x}")
    if not ok:
        raise MalformedPacket(
            "gso-proto-mismatch", f"gso_type {base:#x} on IPv{p.version} protocol {p.proto}"
        )
    if p.fragment:
        raise MalformedPacket("gso-fragment", "an IP fragment cannot be segmented")


class Rows(NamedTuple):
    """`segments` packets of `size` bytes back to back in `body` (a numpy array's bytes or
    the C loop's bytearray)."""

    body: Buffer
    segments: int
    size: int


def _segment(mv: memoryview, p: Parsed, mss: int, max_segments: int, prefix: bytes = b"",
             *, as_list: bool = False) -> tuple[Rows | None, list[bytes]]:  # fmt: skip
    """Cut the super-packet described by `p` (offsets into `mv`) into `mss`-byte segments,
    each behind `prefix`: (the first full ones as Rows, or None; the rest as bytes). With
    `as_list` the C loop gives every segment as bytes (split()'s form: no rows to slice). Full TCP
    segments go to the C loop where it is built (mqtun.packet.accel), else many full segments
    go the vectorized way (numpy); the short last one and few segments the per-segment
    loop."""
    hlen = p.payload_off
    plen = p.end - hlen
    nseg = -(-plen // mss) if plen else 1
    if nseg > max_segments:
        raise MalformedPacket("too-many-segments", f"{nseg} segments of {mss} bytes")
    l3, l4 = p.l3_off, p.l4_off
    v4 = p.version == 4
    biggest = (l4 - l3) + (hlen - l4) + min(mss, plen)
    if biggest - (0 if v4 else 40) > _MAX_L3:
        raise MalformedPacket("oversized-segment", f"a {biggest}-byte IP packet")
    head = bytearray(mv[:hlen])
    payload = mv[hlen : p.end]
    pre = len(prefix)
    rows = None
    out: list[bytes] = []
    append = out.append
    join = b"".join
    pack16 = _U16.pack_into
    pack16x2 = _U16X2.pack_into
    nfull = plen // mss
    c_rows = accel.tcp_rows() if p.proto == IPPROTO_TCP and nfull >= 2 else None

    if v4:
        ip_id0 = (head[l3 + 4] << 8) | head[l3 + 5]
        head[l3 + 2 : l3 + 6] = b"\0\0\0\0"
        head[l3 + 10 : l3 + 12] = b"\0\0"
        ip_base = residue(head[l3:l4]) if c_rows is None else 0
        ip_hl = l4 - l3
    else:
        ip_id0 = ip_base = 0
        ip_hl = l4 - l3 - 40  # IPv6 payload length counts extension headers
    pseudo = pseudo_header_residue(p.src, p.pseudo_dst, p.proto, 0)
    last = nseg - 1

    # Full segments reuse one fold plan (see checksum.fold_plan); the short last one does not.
    plan = fold_plan(mss + (mss & 1))
    np = vector() if nfull >= _VECTOR_ROWS and c_rows is None else None
    sums_array = piece_sums_array(payload, mss, nfull) if np is not None else None
    sums = None
    frombytes = int.from_bytes
    first = 0  # the segments before this one were made by the vectorized path

    if p.proto == IPPROTO_TCP:
        thl = hlen - l4
        seq0 = int.from_bytes(head[l4 + 4 : l4 + 8], "big")
        flags0 = head[l4 + 13]
        head[l4 + 4 : l4 + 8] = b"\0\0\0\0"
        head[l4 + 13] = 0
        head[l4 + 16 : l4 + 18] = b"\0\0"
        mid_flags = flags0 & ~(TCPHDR_CWR | TCPHDR_FIN | TCPHDR_PSH)
        if nseg == 1:
            first_flags = last_flags = flags0
        else:
            first_flags = flags0 & ~(TCPHDR_FIN | TCPHDR_PSH)
            last_flags = flags0 & ~TCPHDR_CWR
        flags3 = (first_flags, mid_flags, last_flags if nfull == nseg else mid_flags)
        if c_rows is not None:  # every segment, the short last one too, in one C call
            tmpl = _full_segment_template(prefix + head, l3 + pre, l4 + pre, v4,
                                          ip_hl + thl + mss, mid_flags)
            cut = c_rows(tmpl, payload, mss, l3 + pre, l4 + pre, v4, ip_id0, seq0, first_flags,
                         mid_flags, last_flags, pseudo % _M, as_list)
            if as_list:
                return None, cut
            size = len(tmpl) + mss
            body = memoryview(cut)
            tail = body[nfull * size :]
            return Rows(body[: nfull * size], nfull, size), [bytes(tail)] if tail else []
        base = residue(head[l4:hlen]) + pseudo + thl
        if sums_array is not None:
            rows = _as_rows(_tcp_rows(np, sums_array, prefix + head, payload, nfull, mss,
                                      l3 + pre, l4 + pre, v4, ip_hl + thl, ip_id0, ip_base, seq0,
                                      base, flags3))  # fmt: skip
            first = nfull
        pack32 = _U32.pack_into
        a = first * mss
        for i in range(first, nseg):
            b = a + mss
            chunk = payload[a:b]
            if i < nfull:
                if sums is not None:
                    v = sums[i]
                else:
                    v = frombytes(chunk, "little")  # see checksum.congruent: x256 makes it big
                    for s, m in plan:
                        v = (v >> s) + (v & m)
                    v <<= 8
                seglen = mss
            else:
                v = congruent(chunk)
                seglen = len(chunk)
            seq = (seq0 + a) & 0xFFFFFFFF
            fl = mid_flags if 0 < i < last else (first_flags if i == 0 else last_flags)
            r = (base + seglen + (seq >> 16) + (seq & 0xFFFF) + fl + v) % _M
            pack32(head, l4 + 4, seq)
            head[l4 + 13] = fl
            pack16(head, l4 + 16, _M - r if r else 0)
            if v4:
                tot = ip_hl + thl + seglen
                ip_id = (ip_id0 + i) & 0xFFFF
                r = (ip_base + tot + ip_id) % _M
                pack16x2(head, l3 + 2, tot, ip_id)
                pack16(head, l3 + 10, _M - r if r else 0)
            else:
                pack16(head, l3 + 4, ip_hl + thl + seglen)
            append(join((prefix, head, chunk)))
            a = b
        return rows, out

    # UDP (USO): the header's length and checksum change per segment
    head[l4 + 4 : l4 + 8] = b"\0\0\0\0"
    base = residue(head[l4:hlen]) + pseudo
    if sums_array is not None:
        rows = _as_rows(_udp_rows(np, sums_array, prefix + head, payload, nfull, mss, l3 + pre,
                                  l4 + pre, v4, ip_hl, ip_id0, ip_base, base))  # fmt: skip
        first = nfull
    a = first * mss
    for i in range(first, nseg):
        b = a + mss
        chunk = payload[a:b]
        if i < nfull:
            if sums is not None:
                v = sums[i]
            else:
                v = frombytes(chunk, "little")
                for s, m in plan:
                    v = (v >> s) + (v & m)
                v <<= 8
            ulen = UDP_HLEN + mss
        else:
            v = congruent(chunk)
            ulen = UDP_HLEN + len(chunk)
        r = (base + ulen + ulen + v) % _M
        pack16x2(head, l4 + 4, ulen, _M - r if r else _M)  # a zero UDP checksum is sent as 0xFFFF
        if v4:
            tot = ip_hl + ulen
            ip_id = (ip_id0 + i) & 0xFFFF
            r = (ip_base + tot + ip_id) % _M
            pack16x2(head, l3 + 2, tot, ip_id)
            pack16(head, l3 + 10, _M - r if r else 0)
        else:
            pack16(head, l3 + 4, ip_hl + ulen)
        append(join((prefix, head, chunk)))
        a = b
    return rows, out


# ---- the full-size segments in one pass (numpy) -------------------------------------------
# A 64 KB super-packet's ~45 full segments are built as the rows of one array: the header
# template broadcast, the payload copied in, and the fields that differ per segment (TCP seq,
# flags and checksum, UDP checksum, IPv4 id and header checksum) written as columns computed
# all at once, as 16-bit words where the row allows. split() slices the array's bytes into
# segments; split_train() hands the array itself to the sender (each row one datagram of a
# UDP_SEGMENT send, behind its tunnel header). About a third of the time of the per-segment
# loop, which remains for the short last segment and where numpy is absent.


def _rows(np: Any, head: bytearray, payload: memoryview, nfull: int, mss: int) -> Any:
    """An (nfull, len(head) + mss) uint8 array: the template header, then each payload slice."""
    hlen = len(head)
    rows = np.empty((nfull, hlen + mss), dtype=np.uint8)
    rows[:, :hlen] = np.frombuffer(head, dtype=np.uint8)
    rows[:, hlen:] = np.frombuffer(payload, dtype=np.uint8, count=nfull * mss).reshape(nfull, mss)
    return rows


# (-x) mod 0xFFFF as (_BIG - x) % 0xFFFF, one subtraction and one remainder: _BIG is a multiple
# of 0xFFFF above every sum computed here (segment sums stay below 2**57)
_BIG: Final = _M << 42


def _column16(np: Any, rows: Any, at: int, values: Any) -> None:
    """Store `values` as big-endian 16-bit fields at byte `at` of every row."""
    rows[:, at : at + 2] = values.astype(">u2").view(np.uint8).reshape(-1, 2)


def _as_rows(array: Any) -> Rows:
    count, size = array.shape
    return Rows(array.reshape(-1), count, size)


def _split_rows(rows: Rows) -> list[bytes]:
    big = bytes(rows.body)
    size = rows.size
    return [big[k : k + size] for k in range(0, len(big), size)]


def _full_segment_template(head: bytes | bytearray, l3: int, l4: int, v4: bool, ip_len: int,
                           flags: int) -> bytearray:  # fmt: skip
    """The headers every full segment starts from: the IP length of a full segment, the
    middle segments' TCP flags (`head`: the zeroed fields of _segment)."""
    tmpl = bytearray(head)
    _U16.pack_into(tmpl, l3 + 2 if v4 else l3 + 4, ip_len)
    tmpl[l4 + 13] = flags
    return tmpl


def _steps(np: Any, n: int, mss: int) -> tuple[Any, Any]:
    """(0, 1, .., n-1) and (0, mss, .., (n-1) * mss) as uint64 arrays, kept for the next call."""
    key = (n, mss)
    got = _step_cache.get(key)
    if got is None:
        if len(_step_cache) > 64:
            _step_cache.clear()
        i = np.arange(n, dtype=np.uint64)
        got = _step_cache[key] = (i, i * np.uint64(mss))
    return got


_step_cache: dict[tuple[int, int], tuple[Any, Any]] = {}
_U64_32: Final = 0xFFFFFFFF


def _words(np: Any, rows: Any, *offsets: int) -> Any:
    """The rows as big-endian 16-bit words when every field at `offsets` is at an even byte of
    an even-length row (one store per field, no per-field byte view), else None."""
    if rows.shape[1] & 1 or any(at & 1 for at in offsets):
        return None
    return rows.view(">u2")


def _tcp_rows(np: Any, sums: Any, head: bytes | bytearray, payload: memoryview, nfull: int,
              mss: int, l3: int, l4: int, v4: bool, ip_len: int, ip_id0: int, ip_base: int,
              seq0: int, base: int, flags: tuple[int, int, int]) -> Any:  # fmt: skip
    """The `nfull` full TCP segments (see _segment: the same fields, the same sums), as the
    rows of an array (`head` is the row's template up to the payload, offsets into it)."""
    first_flags, mid_flags, last_flags = flags
    tot = ip_len + mss
    rows = _rows(np, _full_segment_template(head, l3, l4, v4, tot, mid_flags), payload, nfull,
                 mss)
    index, offset = _steps(np, nfull, mss)
    u64 = np.uint64
    # seq = seq0 + i * mss in 32-bit arithmetic (which wraps as TCP does); its 16-bit words
    # add up to seq itself modulo 0xFFFF, so seq goes into the checksum whole
    seq = (offset + u64(seq0)) & u64(_U64_32)
    rows[0, l4 + 13] = first_flags
    rows[-1, l4 + 13] = last_flags
    csum = (u64(_BIG - base - mss - mid_flags) - sums - seq) % u64(_M)
    csum[0] = (int(csum[0]) - first_flags + mid_flags) % _M
    csum[-1] = (int(csum[-1]) - last_flags + mid_flags) % _M
    words = _words(np, rows, l3, l4)
    if words is not None:  # stores truncate to 16 bits: seq's low word is seq itself
        words[:, (l4 + 4) >> 1] = seq >> u64(16)
        words[:, (l4 + 6) >> 1] = seq
        words[:, (l4 + 16) >> 1] = csum
    else:
        rows[:, l4 + 4 : l4 + 8] = seq.astype(">u4").view(np.uint8).reshape(nfull, 4)
        _column16(np, rows, l4 + 16, csum)
    if v4:
        _ipv4_columns(np, rows, words, index, l3, ip_id0, ip_base, tot)
    return rows


def _ipv4_columns(np: Any, rows: Any, words: Any, index: Any, l3: int, ip_id0: int,
                  ip_base: int, tot: int) -> None:  # fmt: skip
    """IPv4 id (counting up from ip_id0, 16-bit wrap) and header checksum of every row."""
    u64 = np.uint64
    ids = (index + u64(ip_id0)) & u64(0xFFFF)
    csum = (u64(_BIG - ip_base - tot) - ids) % u64(_M)
    if words is not None:
        words[:, (l3 + 4) >> 1] = ids
        words[:, (l3 + 10) >> 1] = csum
    else:
        _column16(np, rows, l3 + 4, ids)
        _column16(np, rows, l3 + 10, csum)


def _udp_rows(np: Any, sums: Any, head: bytes | bytearray, payload: memoryview, nfull: int,
              mss: int, l3: int, l4: int, v4: bool, ip_len: int, ip_id0: int, ip_base: int,
              base: int) -> Any:  # fmt: skip
    """The `nfull` full UDP datagrams (see _segment), as the rows of an array."""
    ulen = UDP_HLEN + mss
    tmpl = bytearray(head)
    _U16.pack_into(tmpl, l4 + 4, ulen)
    _U16.pack_into(tmpl, l3 + 2 if v4 else l3 + 4, ip_len + ulen)
    rows = _rows(np, tmpl, payload, nfull, mss)
    r = (np.uint64(_BIG - base - ulen - ulen) - sums) % np.uint64(_M)
    r[r == 0] = _M  # a zero UDP checksum is sent as 0xFFFF
    words = _words(np, rows, l3, l4)
    if words is not None:
        words[:, (l4 + 6) >> 1] = r
    else:
        _column16(np, rows, l4 + 6, r)
    if v4:
        index, _ = _steps(np, nfull, mss)
        _ipv4_columns(np, rows, words, index, l3, ip_id0, ip_base, ip_len + ulen)
    return rows


def _split_tunnel(
    hdr: VnetHeader, mv: memoryview, tap: bool, max_segments: int, mtu: int | None
) -> list[bytes]:
    """Split an outer-IP/UDP/tunnel-header/inner-L2/IP/TCP-or-UDP super-packet (e.g. VXLAN).

    outer_th_offset names the outer UDP header and inner_nh_offset the inner IP header (both
    from the frame start); the bytes in between (UDP, VXLAN, inner Ethernet) are copied as
    they are. The outer UDP checksum is computed when the header's UDP_TUNNEL_CSUM flag asks
    for it, else left 0, as the kernel's tunnel segmentation does.
    """
    gso = hdr.gso_type
    tunnel = gso & VIRTIO_NET_HDR_GSO_UDP_TUNNEL
    if tunnel == VIRTIO_NET_HDR_GSO_UDP_TUNNEL_IPV4:
        outer_version = 4
    elif tunnel == VIRTIO_NET_HDR_GSO_UDP_TUNNEL_IPV6:
        outer_version = 6
    else:
        raise MalformedPacket("bad-tunnel", "both UDP_TUNNEL_IPV4 and _IPV6 set")
    inner_kind = gso & ~(VIRTIO_NET_HDR_GSO_ECN | VIRTIO_NET_HDR_GSO_UDP_TUNNEL)
    if inner_kind not in (
        VIRTIO_NET_HDR_GSO_TCPV4,
        VIRTIO_NET_HDR_GSO_TCPV6,
        VIRTIO_NET_HDR_GSO_UDP_L4,
    ):
        raise MalformedPacket("bad-gso-type", f"inner gso_type {inner_kind:#x} in a UDP tunnel")
    outer = parse(mv, tap=tap, use_ip_length=False)
    if outer.version != outer_version or outer.proto != IPPROTO_UDP:
        raise MalformedPacket(
            "gso-proto-mismatch",
            f"tunnel over IPv{outer_version}, outer IPv{outer.version} protocol {outer.proto}",
        )
    if outer.fragment:
        raise MalformedPacket("gso-fragment", "the outer packet is an IP fragment")
    outer_th = outer.l4_off
    if hdr.outer_th_offset and hdr.outer_th_offset != outer_th:
        raise MalformedPacket(
            "bad-tunnel-offsets", f"outer_th_offset {hdr.outer_th_offset}, UDP at {outer_th}"
        )
    inner_nh = hdr.inner_nh_offset
    if not inner_nh:  # not given: assume VXLAN and an inner Ethernet frame
        _, inner_nh = parse_ethernet(mv, outer_th + UDP_HLEN + VXLAN_HLEN)
    if inner_nh < outer_th + UDP_HLEN or inner_nh >= len(mv):
        raise MalformedPacket(
            "bad-tunnel-offsets", f"inner_nh_offset {inner_nh} (outer UDP at {outer_th})"
        )
    inner_mv = mv[inner_nh:]
    inner = parse(inner_mv, use_ip_length=False)
    _check_kind(inner_kind, inner)
    rows, pieces = _segment(
        inner_mv, inner, _fit(hdr.gso_size, inner, mtu, inner_nh - outer.l3_off), max_segments
    )
    segments = _split_rows(rows) + pieces if rows is not None else pieces

    l3 = outer.l3_off
    prefix = bytearray(mv[:inner_nh])
    v4 = outer.version == 4
    over_ip = inner_nh - l3 - (0 if v4 else 40)
    over_udp = inner_nh - outer_th
    if over_ip + max(len(s) for s in segments) > _MAX_L3:
        raise MalformedPacket("oversized-segment", "outer packet over 64 KB")
    if v4:
        ip_id0 = (prefix[l3 + 4] << 8) | prefix[l3 + 5]
        prefix[l3 + 2 : l3 + 6] = b"\0\0\0\0"
        prefix[l3 + 10 : l3 + 12] = b"\0\0"
        ip_base = residue(prefix[l3:outer_th])
    else:
        ip_id0 = ip_base = 0
    prefix[outer_th + 4 : outer_th + 8] = b"\0\0\0\0"
    udp_part = bytes(prefix[outer_th:])  # UDP + tunnel header + inner L2, length/csum zeroed
    want_csum = bool(hdr.flags & VIRTIO_NET_HDR_F_UDP_TUNNEL_CSUM)
    even = not over_udp & 1
    if want_csum:
        udp_base = pseudo_header_residue(outer.src, outer.pseudo_dst, IPPROTO_UDP, 0)
        if even:
            udp_base += residue(udp_part)
    out: list[bytes] = []
    for i, seg in enumerate(segments):
        ulen = over_udp + len(seg)
        csum = 0
        if want_csum:
            covered = seg if even else b"".join((udp_part, seg))
            r = (udp_base + residue(covered) + ulen + ulen) % _M
            csum = _M - r if r else _M
        _U16X2.pack_into(prefix, outer_th + 4, ulen, csum)
        if v4:
            tot = inner_nh - l3 + len(seg)
            ip_id = (ip_id0 + i) & 0xFFFF
            r = (ip_base + tot + ip_id) % _M
            _U16X2.pack_into(prefix, l3 + 2, tot, ip_id)
            _U16.pack_into(prefix, l3 + 10, _M - r if r else 0)
        else:
            _U16.pack_into(prefix, l3 + 4, over_ip + len(seg))
        out.append(b"".join((prefix, seg)))
    return out
