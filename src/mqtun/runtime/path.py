"""The packet path a handler sits on: read buffers in, wire packets out, write buffers back.

Sans-IO: no file descriptor here. The I/O shell (serve, forward, sockets, asyncio) reads a
device's fd, gives each buffer to `PacketPath.decode`, hands the wire packets to the handler,
gives the handler's answers to `PacketPath.accept`, turns a drain's accepted packets into write
buffers with `PacketPath.encode` and writes each with `os.writev(fd, item.parts)`.

    path = PacketPath(Layout.of(dev_a), Layout.of(dev_b), counter=counts)
    wire = []
    for buf in bufs:                      # one drain: os.read() results
        path.decode(buf, wire)            # PI/virtio-net header gone, super-packets split
    answers = []
    for pkt in wire:
        path.accept(handler(pkt), answers)   # bytes-like packets of the right kind only
    for item in path.encode(answers):     # coalesced (TCP/UDP GRO) where dev_b takes it
        try:
            os.writev(fd_b, item.parts)
            path.sent(item)
        except OSError as exc:
            path.failed(item, reason_for(exc))   # every wire packet it held is counted

What a handler sees (split mode, the default): wire packets, an IP packet on TUN or an Ethernet
frame on TAP, without PI or virtio-net header, checksums complete, never longer than the MTU
(a TCP super-packet whose gso_size would exceed it is cut finer; a UDP one is dropped as
TOO_BIG). In super-packet mode (`super_packets=True`) each read comes whole, as a
`SuperPacket` with its offload metadata (a `VnetHeader` object, never header bytes).

Keeping a packet (the memoryview rule): a wire packet is `bytes` (the handler may keep it) or a
read-only memoryview into the buffer the shell read into (when a header was stripped without
a copy, `views=True`). A view stays valid as long as that buffer is not reused: a shell that
reads with os.read gives a new buffer each time, so its views may be kept; a shell that reads
into one reused buffer must say that a handler may keep a view only until it returns (or,
batch, until the batch handler returns), and must copy (`bytes(pkt)`) to keep one longer.
`views=False` gives bytes everywhere, at one copy per stripped packet.

Counting: every wire packet a read held is counted read (`wire_read`), and every one that is
not delivered is a drop with its reason (MALFORMED for a packet or super-packet that does not
parse, OFFLOAD for an offload request that cannot be carried out, TOO_BIG past the MTU,
REFUSED for what the other side cannot carry, FILTERED for a handler's None, BAD_RESULT for an
answer that is not a packet, HANDLER_ERROR for a generator that raised), counted per wire
packet: a super-packet that cannot be split counts every wire packet it held. The kernel's
IFLA_STATS64 counts a super-packet once: the shell keeps that figure (reads and writes).
"""

from __future__ import annotations

import functools
import struct
import sys
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Final, Literal, NamedTuple, Protocol, TypeAlias

from mqtun import _uapi
from mqtun.errors import InvalidArgumentError
from mqtun.packet import accel, gso
from mqtun.packet.checksum import complete_checksum, completed
from mqtun.packet.gro import MAX_SIZE, coalesce
from mqtun.packet.headers import Buffer, MalformedPacket, parse_ethernet, tun_pi
from mqtun.packet.vnet import ZERO_HEADER, VnetHeader, decoder, encode
from mqtun.stats import DropReason

if TYPE_CHECKING:
    from mqtun.device import Device

__all__ = [
    "FaultSink",
    "Layout",
    "Outgoing",
    "Packet",
    "PacketPath",
    "PathCounter",
    "SuperPacket",
    "WireCounts",
]

_PI = struct.Struct(_uapi.TUN_PI_FORMAT)
_ETH_V4: Final = _uapi.ETH_P_IP.to_bytes(2, "big")
_ETH_V6: Final = _uapi.ETH_P_IPV6.to_bytes(2, "big")
_TSO: Final = _uapi.TUN_F_TSO4 | _uapi.TUN_F_TSO6
_USO: Final = _uapi.TUN_F_USO4 | _uapi.TUN_F_USO6
_TUNNEL_GSO: Final = _uapi.TUN_F_UDP_TUNNEL_GSO
_MIN_IP: Final = 20  # the smallest IPv4 header; an IPv6 one is 40
_ETH: Final = _uapi.ETH_HLEN
_JOIN_MIN: Final = 512  # IP bytes: a smaller unchanged TCP segment is not worth a GRO pass
# What a path joins on write: True TCP and UDP, "tcp" TCP segments only, False nothing
Coalesce: TypeAlias = bool | Literal["tcp"]
_SINGLE: Final = (bytes, bytearray, memoryview)

# MalformedPacket reasons that are not about bytes that do not parse: too big for the MTU or
# for IP, or an offload request that cannot be carried out (the rest are MALFORMED)
_REASON_DROP: Final = {
    "over-mtu": DropReason.TOO_BIG,
    "oversized-segment": DropReason.TOO_BIG,
    **{r: DropReason.OFFLOAD for r in ("bad-gso-type", "zero-gso-size", "gso-proto-mismatch",
                                        "gso-fragment", "too-many-segments", "bad-csum-offset",
                                        "bad-tunnel-offsets", "bad-tunnel")},
}  # fmt: skip


@dataclass(frozen=True)
class Layout:
    """How packets look on one device's fd: what precedes them and what the kernel may send.

    `vnet_hdr_size` 0 means no virtio-net header (else >= 10: 10, 12, 24 or any size the queue
    was given with TUNSETVNETHDRSZ); `vnet_le` its byte order: None native, True little-endian
    (TUNSETVNETLE), False big-endian (TUNSETVNETBE). `offloads` is the TUN_F_* mask: on a
    device read from, what the kernel may hand out; on a device written to, what it is taken to
    accept (TSO: TCP GRO; USO: UDP GRO). `mtu` bounds the wire packets given to a handler.
    """

    tap: bool = False
    packet_info: bool = False
    vnet_hdr_size: int = 0
    vnet_le: bool | None = None
    offloads: int = 0
    mtu: int = 1500

    def __post_init__(self) -> None:
        if self.vnet_hdr_size and self.vnet_hdr_size < _uapi.VIRTIO_NET_HDR_SIZE:
            raise InvalidArgumentError(
                f"a virtio-net header is 0 (none) or at least 10 bytes, not {self.vnet_hdr_size}"
            )
        if self.offloads and not self.vnet_hdr_size:
            raise InvalidArgumentError(
                f"offloads {self.offloads:#x} need a virtio-net header (vnet_hdr_size >= 10)"
            )
        if not 68 <= self.mtu <= 65535:
            raise InvalidArgumentError(f"MTU must be 68..65535, not {self.mtu}")

    @classmethod
    def of(cls, device: Device, *, mtu: int | None = None) -> Layout:
        """The layout of an open device, from what the kernel reports (the MTU by netlink
        unless given)."""
        vnet = device.vnet_hdr_size if device.vnet_hdr else 0
        return cls(
            tap=device.tap,
            packet_info=device.packet_info,
            vnet_hdr_size=vnet,
            vnet_le=(True if vnet and device.vnet_le else None),
            offloads=(device.offloads or 0) if vnet else 0,
            mtu=device.link.mtu if mtu is None else mtu,
        )

    @property
    def header_size(self) -> int:
        """Bytes before each packet on the fd: packet info plus the virtio-net header."""
        return (_uapi.TUN_PI_SIZE if self.packet_info else 0) + self.vnet_hdr_size


class SuperPacket(NamedTuple):
    """A packet read whole (super-packet mode): the data and how it is to be cut."""

    data: Buffer
    """The IP packet (TUN) or Ethernet frame (TAP), without PI or virtio-net header."""
    offload: VnetHeader
    """Segmentation and checksum work still to do (ZERO_HEADER: a plain, complete packet)."""
    segments: int
    """How many wire packets it stands for."""


Packet: TypeAlias = Buffer | SuperPacket
"""What a handler may answer with: a wire packet, or (super-packet mode) a SuperPacket."""


class FaultSink(Protocol):
    """Where a path tells what a handler did wrong (`mqtun.runtime.loop.HandlerFaults` is one):
    rate-limited reports to the application, beside the counts."""

    def exception(self, exc: BaseException) -> None: ...

    def bad_result(self, handler: object, value: object) -> None: ...


class Outgoing(NamedTuple):
    """One write: `os.writev(fd, parts)` injects one packet standing for `packets` wire packets."""

    parts: tuple[Buffer, ...]
    packets: int


class PathCounter(Protocol):
    """What a path counts, per wire packet. `mqtun.stats.Counters` has `drop`; the shell adds
    the two wire counts (or `WireCounts` keeps all three)."""

    def drop(self, reason: DropReason, count: int = 1) -> None: ...

    def wire_read(self, count: int) -> None: ...

    def wire_written(self, count: int) -> None: ...


@dataclass
class WireCounts:
    """A `PathCounter` in plain integers."""

    read: int = 0
    written: int = 0
    dropped: dict[DropReason, int] = field(default_factory=dict)

    def drop(self, reason: DropReason, count: int = 1) -> None:
        self.dropped[reason] = self.dropped.get(reason, 0) + count

    def wire_read(self, count: int) -> None:
        self.read += count

    def wire_written(self, count: int) -> None:
        self.written += count

    @property
    def dropped_total(self) -> int:
        return sum(self.dropped.values())


class PacketPath:
    """Decode reads of `source`, validate answers, encode writes for `dest` (default: source).

    The answers a handler returns are of the source's kind (IP packets if the source is TUN,
    Ethernet frames if TAP) and are converted for `dest`: TAP to TUN strips the Ethernet header
    (a frame that is not IP is REFUSED), TUN to TAP adds one, which needs `ethernet=(source
    MAC, destination MAC)`; without it the pair is refused here. `coalesce` (default on) joins
    a drain's TCP and UDP segments into super-packets where `dest` takes them (a virtio-net
    header and TSO / USO in its offloads), `"tcp"` only its TCP segments; `verify` checks
    each joined segment's checksum first (the kernel trusts what it is given).
    """

    def __init__(
        self,
        source: Layout,
        dest: Layout | None = None,
        *,
        counter: PathCounter | None = None,
        super_packets: bool = False,
        coalesce: Coalesce = True,
        verify: bool = True,
        views: bool = True,
        ethernet: tuple[bytes, bytes] | None = None,
    ) -> None:
        dest = source if dest is None else dest
        self.source = source
        self.dest = dest
        self.counter: PathCounter = counter if counter is not None else WireCounts()
        self.super_packets = super_packets
        self.views = views
        self.verify = verify
        if not source.tap and dest.tap:
            if ethernet is None or len(ethernet) != 2 or any(len(m) != 6 for m in ethernet):
                raise InvalidArgumentError(
                    "a TUN-to-TAP path needs the Ethernet addresses its frames get: "
                    "ethernet=(source MAC, destination MAC), 6 bytes each"
                )
            self._eth: bytes | None = bytes(ethernet[1]) + bytes(ethernet[0])
        else:
            self._eth = None
        # read side
        self._pi_in = _uapi.TUN_PI_SIZE if source.packet_info else 0
        self._vnet_in = source.vnet_hdr_size
        self._hs_in = self._pi_in + self._vnet_in
        self._read_vnet = decoder(source.vnet_hdr_size or _uapi.VIRTIO_NET_HDR_SIZE,
                                  little_endian=source.vnet_le)
        self._tap_in = source.tap
        self._mtu_in = source.mtu
        self._fast_mtu = source.mtu + (_ETH if source.tap else 0)  # no parse below this
        # write side
        self._strip_l2 = source.tap and not dest.tap
        self._tap_out = dest.tap
        self._pi_out = dest.packet_info
        self._vnet_out = dest.vnet_hdr_size
        self._le_out = dest.vnet_le
        self._zero = encode(ZERO_HEADER, dest.vnet_hdr_size, little_endian=dest.vnet_le) if (
            dest.vnet_hdr_size) else b""  # fmt: skip
        self._gro_tcp = bool(coalesce) and bool(dest.vnet_hdr_size) and bool(dest.offloads & _TSO)
        self._gro_udp = coalesce is True and bool(dest.vnet_hdr_size) and bool(
            dest.offloads & _USO)
        self._l3_in = _ETH if source.tap else 0  # where a wire packet's IP header starts
        self._plain_out = not (self._pi_out or self._vnet_out or self._eth)

    @property
    def coalesces(self) -> bool:
        """Whether wire packets written through this path are joined into super-packets."""
        return self._gro_tcp or self._gro_udp

    def may_join(self, packet: Buffer) -> bool:
        """Whether coalescing should try to join this unchanged wire packet (read from
        `source`) with others: a UDP datagram when UDP is joined, a TCP segment of at least
        _JOIN_MIN bytes when TCP is. ACKs and request/response segments are written as read:
        the GRO pass over them measured slower than their writes (8 connections of
        request/response through a handler 0.43x plain forward, against 0.61x unjoined)."""
        if not (self._gro_tcp or self._gro_udp):
            return False
        l3 = self._l3_in
        if len(packet) < l3 + 10:
            return False
        version = packet[l3] >> 4
        proto = packet[l3 + 9] if version == 4 else packet[l3 + 6] if version == 6 else 0
        if proto == _uapi.IPPROTO_UDP:
            return self._gro_udp
        return proto == _uapi.IPPROTO_TCP and self._gro_tcp and len(packet) >= l3 + _JOIN_MIN

    def reads_joiner(self) -> Callable[[list[bytes]], tuple[list[Buffer], list[int] | None]] | None:
        """For a forwarder without a handler between devices of one layout: a function that
        joins one drain's raw reads as `encode` would join their wire packets, in C. It returns
        the buffers to write (the joined ones with a GSO header, every other read as it came,
        in order) and how many reads each holds (0: a read as it came; None: nothing joined,
        the reads themselves come back). None where it does not apply (no C loop, no
        virtio-net header, nothing to join, two layouts). A NEEDS_CSUM
        packet is joined with its partial checksum (the kernel's, which the writer's kernel
        finishes): nothing is completed or copied but the joined payloads."""
        fn = accel.coalesce_reads()
        if fn is None or not self.coalesces or not self._vnet_in or self.source != self.dest:
            return None  # (a TUN-to-TAP path, the one that adds an Ethernet header, is two layouts)
        le = self._le_out
        return functools.partial(
            fn, self._hs_in, self._pi_in, self._vnet_in,
            sys.byteorder == "little" if le is None else le, self._tap_in, MAX_SIZE,
            self._gro_tcp, self._gro_udp, self.verify)  # fmt: skip

    def plain_decoder(self) -> Callable[[list[bytes]], list[Buffer] | None] | None:
        """For a shell that hands wire packets to a handler: a function that decodes one drain
        in C when every read holds one plain packet (no super-packet, nothing to drop; a
        NEEDS_CSUM checksum finished), as `decode` would, and counts them; it returns the
        packets, one per read, or None (nothing counted: `decode` each read then). None where
        the C loop is not built or super-packets are handed whole."""
        fn = accel.decode_plain()
        if fn is None or self.super_packets:
            return None
        le = self.source.vnet_le
        little = sys.byteorder == "little" if le is None else le
        decode = functools.partial(
            fn, self._hs_in, _uapi.TUN_PKT_STRIP if self._pi_in else 0,
            self._pi_in if self._vnet_in else -1, little, self._fast_mtu, self.views)
        wire_read = self.counter.wire_read

        def decode_plain(reads: list[bytes]) -> list[Buffer] | None:
            packets: list[Buffer] | None = decode(reads)
            if packets is not None:
                wire_read(len(packets))
            return packets

        return decode_plain

    # ---- read side ----------------------------------------------------------------------
    def decode(self, buf: Buffer, out: list[Buffer]) -> int:
        """Append the wire packets one read buffer holds to `out`; return how many.

        What cannot be delivered is counted (per wire packet) and not appended. In
        super-packet mode use `decode_super` instead.
        """
        return self._decode(buf, out)[0]

    def decode_original(self, buf: Buffer, out: list[Buffer]) -> SuperPacket | None:
        """`decode`, and the read as it was: one `SuperPacket` (its offload as read) standing
        for the wire packets appended, or None if none was. A shell writes it instead of them
        when a handler returned every one of them unchanged (the same objects): a super-packet
        is written whole as the kernel made it (what coalescing would rebuild, without the
        work), and a single packet as read where the path would not join it (`may_join`)."""
        n, hdr, pkt = self._decode(buf, out)
        return SuperPacket(pkt, hdr, n) if n else None

    def _decode(self, buf: Buffer, out: list[Buffer]) -> tuple[int, VnetHeader, Buffer]:
        """(wire packets appended, the read's offload, the read's packet) -- the packet and
        offload as they can be written again (a checksum completed in place: no offload)."""
        n = len(buf)
        hs = self._hs_in
        if n <= hs:
            return self._bad(1, "short read"), ZERO_HEADER, buf
        if self._pi_in and _PI.unpack_from(buf)[0] & _uapi.TUN_PKT_STRIP:
            return self._bad(1, "truncated by the kernel (read buffer too small)"), ZERO_HEADER, buf
        if not hs:
            if n > self._fast_mtu and self._over_mtu(buf):
                return self._too_big(1), ZERO_HEADER, buf
            out.append(buf if self.views or type(buf) is bytes else bytes(buf))
            self.counter.wire_read(1)
            return 1, ZERO_HEADER, out[-1]
        view = memoryview(buf)
        hdr = ZERO_HEADER
        vh = self._pi_in
        if self._vnet_in and (view[vh] or view[vh + 1]):  # flags or gso_type: work to do
            hdr = self._read_vnet(view, vh)  # n > hs: the whole header is there
        pkt = original = view[hs:]
        if hdr.gso_type:
            try:
                segs = gso.split(hdr, pkt, tap=self._tap_in, mtu=self._mtu_in)
            except MalformedPacket as exc:
                return self._bad(gso.segment_count(hdr, pkt, tap=self._tap_in), exc.reason), \
                    hdr, pkt
            out.extend(segs)
            self.counter.wire_read(len(segs))
            return len(segs), hdr, original
        if hdr.flags & _uapi.VIRTIO_NET_HDR_F_NEEDS_CSUM:
            try:
                if pkt.readonly or not self.views:
                    pkt = memoryview(completed(pkt, hdr.csum_start, hdr.csum_offset))
                else:
                    complete_checksum(pkt, hdr.csum_start, hdr.csum_offset)
                    hdr = ZERO_HEADER  # the read itself now holds the complete checksum
            except MalformedPacket as exc:
                return self._bad(1, exc.reason), hdr, pkt
        if len(pkt) > self._fast_mtu and self._over_mtu(pkt):
            return self._too_big(1), hdr, pkt
        out.append((pkt if pkt.readonly else pkt.toreadonly()) if self.views else pkt.tobytes())
        self.counter.wire_read(1)
        return 1, hdr, original

    def decode_all(self, bufs: Iterable[Buffer]) -> list[Buffer]:
        """The wire packets of a whole drain, in order."""
        out: list[Buffer] = []
        for buf in bufs:
            self.decode(buf, out)
        return out

    def decode_super(self, buf: Buffer) -> SuperPacket | None:
        """One read buffer as a `SuperPacket` (not split), or None if it is counted as a drop."""
        parts = self._super_parts(buf)
        if parts is None:
            return None
        hdr, view, count = parts
        hs = self._hs_in
        pkt: Buffer = view.toreadonly() if hs and self.views else (
            buf if not hs else view.tobytes())  # fmt: skip
        return SuperPacket(pkt, hdr, count)

    def count_super(self, buf: Buffer) -> int:
        """What decode_super counts for a read that is written as it was read: its wire
        packets (0: counted as a drop), without copying the packet out of the buffer."""
        parts = self._super_parts(buf)
        return 0 if parts is None else parts[2]

    def _super_parts(self, buf: Buffer) -> tuple[VnetHeader, memoryview, int] | None:
        """A read's offload header, its packet (a view into `buf`) and wire packets, counted
        read; None if it is counted as a drop."""
        n = len(buf)
        hs = self._hs_in
        if n <= hs:
            self._bad(1, "short read")
            return None
        if self._pi_in and _PI.unpack_from(buf)[0] & _uapi.TUN_PKT_STRIP:
            self._bad(1, "truncated by the kernel")
            return None
        view = memoryview(buf)
        hdr = ZERO_HEADER
        if self._vnet_in:
            vh = self._pi_in
            if view[vh] or view[vh + 1]:
                hdr = self._read_vnet(view, vh)
        pkt = view[hs:] if hs else view
        count = gso.segment_count(hdr, pkt, tap=self._tap_in)
        self.counter.wire_read(count)
        return hdr, pkt, count

    def _bad(self, count: int, reason: str) -> int:
        self.counter.wire_read(count)
        self.counter.drop(_REASON_DROP.get(reason, DropReason.MALFORMED), count)
        return 0

    def _too_big(self, count: int) -> int:
        self.counter.wire_read(count)
        self.counter.drop(DropReason.TOO_BIG, count)
        return 0

    def _over_mtu(self, pkt: Buffer) -> bool:
        l3 = 0
        if self._tap_in:
            try:
                _, l3 = parse_ethernet(pkt)
            except MalformedPacket:
                return True
        return len(pkt) - l3 > self._mtu_in

    # ---- the handler's answers -----------------------------------------------------------
    def accept(
        self, result: object, out: list[Packet], *, handler: object = None,
        faults: FaultSink | None = None,
    ) -> int:  # fmt: skip
        """Validate what a handler returned for one packet and append the packets to `out`.

        The rules of `mqtun.runtime.loop.run_handler`, plus the packet's kind: None or an empty
        list is the handler's drop (FILTERED); a packet (bytes, bytearray, a contiguous
        memoryview) or a list, tuple or iterable of them is taken; a generator that raises is
        a HANDLER_ERROR; anything else, and each item that is not a packet of the source's
        kind (an IP packet on TUN, an Ethernet frame on TAP), is a BAD_RESULT drop, the first
        of them told to `faults` (with `handler`, to name it). In super-packet mode a
        `SuperPacket` is a packet too. Returns how many packets were appended.
        """
        if result is None:
            self.counter.drop(DropReason.FILTERED)
            return 0
        one = self._packet(result)
        if one is not None:
            out.append(one)
            return 1
        if type(result) is SuperPacket:  # a tuple, but one answer (not in super-packet mode)
            self._bad_result(1, result, handler, faults)
            return 0
        if isinstance(result, (list, tuple)):
            items: list[object] = list(result)
        elif isinstance(result, Iterable) and not isinstance(result, (str, dict, _SINGLE)):
            try:
                items = list(result)  # a generator runs the handler's code: it may raise
            except Exception as exc:
                self.counter.drop(DropReason.HANDLER_ERROR)
                if faults is not None:
                    faults.exception(exc)
                return 0
        else:
            self._bad_result(1, result, handler, faults)
            return 0
        if not items:
            self.counter.drop(DropReason.FILTERED)
            return 0
        taken = bad = 0
        first_bad: object = None
        for item in items:
            p = self._packet(item)
            if p is None:
                if not bad:
                    first_bad = item
                bad += 1
            else:
                out.append(p)
                taken += 1
        if bad:
            self._bad_result(bad, first_bad, handler, faults)
        return taken

    def _bad_result(self, count: int, value: object, handler: object,
                    faults: FaultSink | None) -> None:  # fmt: skip
        self.counter.drop(DropReason.BAD_RESULT, count)
        if faults is not None:
            faults.bad_result(handler, value)

    def _packet(self, p: object) -> Packet | None:
        """`p` as a packet of the source's kind, or None."""
        t = type(p)
        if t is SuperPacket:
            return p if self.super_packets else None  # type: ignore[return-value]
        if t is not bytes and t is not bytearray:
            try:  # a memoryview is kept as it is (the same object: see decode_original)
                mv = p if isinstance(p, memoryview) else memoryview(p)  # type: ignore[arg-type]
                if not mv.c_contiguous:
                    return None
                if mv.ndim != 1 or mv.itemsize != 1:
                    mv = mv.cast("B")
            except (TypeError, ValueError):  # no buffer (str, int, None), or a released view
                return None
            p = mv
        pkt: Buffer = p  # type: ignore[assignment]
        n = len(pkt)
        if self._tap_in:
            return pkt if n >= _ETH else None
        if n < _MIN_IP:
            return None
        v = pkt[0] >> 4
        return pkt if v == 4 or (v == 6 and n >= 40) else None

    # ---- write side ----------------------------------------------------------------------
    def encode(self, packets: Sequence[Packet]) -> list[Outgoing]:
        """Write buffers for `dest` from one drain's accepted packets, in order.

        Wire packets are coalesced (where `dest` takes super-packets) and converted; a
        `SuperPacket` (super-packet mode) is written whole where `dest` takes its offload,
        else split. What cannot be converted is counted and left out.
        """
        wire: list[Buffer] = []
        result: list[Outgoing] = []
        for p in packets:
            if isinstance(p, SuperPacket):
                if wire:
                    result.extend(self._encode_wire(wire))
                    wire = []
                result.extend(self._encode_super(p))
            else:
                wire.append(p)
        if wire:
            result.extend(self._encode_wire(wire))
        return result

    def sent(self, item: Outgoing) -> None:
        """The shell wrote `item`: count its wire packets written."""
        self.counter.wire_written(item.packets)

    def failed(self, item: Outgoing, reason: DropReason) -> None:
        """The shell could not write `item`: every wire packet it held is dropped for `reason`."""
        self.counter.drop(reason, item.packets)

    def _encode_wire(self, wire: list[Buffer]) -> list[Outgoing]:
        if self._strip_l2:
            wire = self._to_tun(wire)
        if self._plain_out:
            return [Outgoing((p,), 1) for p in wire]
        if (self._gro_tcp or self._gro_udp) and len(wire) > 1:  # one packet joins nothing
            items = coalesce(wire, tap=self._tap_out and not self._eth, tcp=self._gro_tcp,
                             udp=self._gro_udp, verify=self.verify)  # fmt: skip
        else:
            items = [(ZERO_HEADER, p) for p in wire]
        out = []
        for hdr, data in items:
            count = 1
            if hdr.gso_type:
                count = -(-(len(data) - hdr.hdr_len) // hdr.gso_size)
            out.append(Outgoing(self._frame(hdr, data), count))
        return out

    def _frame(self, hdr: VnetHeader, data: Buffer) -> tuple[Buffer, ...]:
        """The parts of one write: [PI] [virtio-net header] [Ethernet header] packet."""
        parts: list[Buffer] = []
        eth = self._eth
        if self._pi_out:  # a frame read as it is; a TUN packet given an Ethernet header later
            parts.append(tun_pi(data, self._tap_out and not eth))
        if self._vnet_out:
            if hdr is ZERO_HEADER or hdr == ZERO_HEADER:
                parts.append(self._zero)
            else:
                if eth:
                    hdr = _shift(hdr, _ETH)
                parts.append(encode(hdr, self._vnet_out, little_endian=self._le_out))
        if eth:
            parts.append(eth + (_ETH_V6 if len(data) and data[0] >> 4 == 6 else _ETH_V4))
        parts.append(data)
        return tuple(parts)

    def _to_tun(self, frames: list[Buffer]) -> list[Buffer]:
        """TAP frames as TUN packets: the Ethernet header (and VLAN tags) cut off, no copy."""
        out: list[Buffer] = []
        for f in frames:
            try:
                etype, l3 = parse_ethernet(f)
            except MalformedPacket:
                etype = l3 = 0
            if etype != _uapi.ETH_P_IP and etype != _uapi.ETH_P_IPV6:
                self.counter.drop(DropReason.REFUSED)  # ARP and the like mean nothing on TUN
                continue
            out.append(memoryview(f)[l3:])
        return out

    def _encode_super(self, sp: SuperPacket) -> list[Outgoing]:
        hdr, data = sp.offload, sp.data
        if self._strip_l2:
            try:
                etype, l3 = parse_ethernet(data)
            except MalformedPacket:
                etype = l3 = 0
            if etype != _uapi.ETH_P_IP and etype != _uapi.ETH_P_IPV6:
                self.counter.drop(DropReason.REFUSED, sp.segments)
                return []
            data = memoryview(data)[l3:]
            if hdr is not ZERO_HEADER and hdr != ZERO_HEADER:
                hdr = _shift(hdr, -l3)
        tap = self._tap_out and not self._eth
        if hdr.gso_type == 0 and not hdr.flags:
            return [Outgoing(self._frame(ZERO_HEADER, data), 1)]
        if self._takes(hdr):
            return [Outgoing(self._frame(hdr, data), sp.segments)]
        try:  # the destination cannot take it whole: cut it here (checksums completed)
            segs = gso.split(hdr, data, tap=tap)
        except MalformedPacket as exc:
            self.counter.drop(_REASON_DROP.get(exc.reason, DropReason.MALFORMED), sp.segments)
            return []
        return [Outgoing(self._frame(ZERO_HEADER, s), 1) for s in segs]

    def _takes(self, hdr: VnetHeader) -> bool:
        """Whether `dest` takes a packet with this offload as it is."""
        if not self._vnet_out:
            return False
        if hdr.gso_type == 0:
            return True  # NEEDS_CSUM alone: any virtio-net header carries it
        off = self.dest.offloads
        base = hdr.gso_base
        if hdr.is_tunnel and (
            not off & _TUNNEL_GSO or self._vnet_out < _uapi.VIRTIO_NET_HDR_V1_HASH_TUNNEL_SIZE
        ):
            return False
        if base == _uapi.VIRTIO_NET_HDR_GSO_UDP_L4:
            return bool(off & _USO)
        if base in (_uapi.VIRTIO_NET_HDR_GSO_TCPV4, _uapi.VIRTIO_NET_HDR_GSO_TCPV6):
            return bool(off & _TSO)
        return False


def _shift(hdr: VnetHeader, by: int) -> VnetHeader:
    """The header of the same packet with `by` bytes more (or fewer) in front of it."""
    def moved(v: int) -> int:
        return v + by if v else 0

    return hdr._replace(
        hdr_len=moved(hdr.hdr_len),
        csum_start=moved(hdr.csum_start) if hdr.flags & _uapi.VIRTIO_NET_HDR_F_NEEDS_CSUM else 0,
        outer_th_offset=moved(hdr.outer_th_offset),
        inner_nh_offset=moved(hdr.inner_nh_offset),
    )
