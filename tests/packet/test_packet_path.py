"""runtime.path without a device: layouts, split on read, validation, coalesce on write, counts.

Every packet a test starts from is built by scapy (packet_builders) and every packet the path
hands out is checked by scapy: the path's own checksum code is never its own oracle.
"""

from __future__ import annotations

import os
import random
import struct
from collections.abc import Callable, Sequence

import packet_builders as pb
import pytest
from hypothesis import given
from hypothesis import strategies as st

from mqtun._uapi import (
    TUN_F_CSUM,
    TUN_F_TSO4,
    TUN_F_TSO6,
    TUN_F_USO4,
    TUN_F_USO6,
    TUN_PKT_STRIP,
    VIRTIO_NET_HDR_F_DATA_VALID,
    VIRTIO_NET_HDR_F_NEEDS_CSUM,
    VIRTIO_NET_HDR_GSO_TCPV4,
    VIRTIO_NET_HDR_GSO_UDP_L4,
)
from mqtun.errors import InvalidArgumentError
from mqtun.packet import (
    ZERO_HEADER,
    Buffer,
    MalformedPacket,
    VnetHeader,
    accel,
    coalesce,
    encode,
    offload_checksum,
    parse,
)
from mqtun.runtime.path import Layout, Outgoing, Packet, PacketPath, SuperPacket, WireCounts
from mqtun.stats import DropReason

pytestmark = pytest.mark.usefixtures("both_sums")  # numpy and pure-Python sums

OFFLOADS = TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO6 | TUN_F_USO4 | TUN_F_USO6
MAC_A = bytes.fromhex("02000000000a")
MAC_B = bytes.fromhex("02000000000b")


def tcp_stream(shape: pb.Shape, sizes: Sequence[int], *, seq0: int = 5000, sport: int = 40000,
               psh_last: bool = False) -> list[bytes]:  # fmt: skip
    out, seq = [], seq0
    for i, size in enumerate(sizes):
        flags = "AP" if psh_last and i == len(sizes) - 1 else "A"
        out.append(pb.frame(shape, pb.TCP(sport=sport, dport=5001, seq=seq % 2**32, ack=7,
                                          flags=flags, window=500) / pb.Raw(os.urandom(size)),
                            ip_id=(100 + i) % 0x10000))  # fmt: skip
        seq += size
    return out


def udp_stream(shape: pb.Shape, sizes: Sequence[int], *, sport: int = 40001) -> list[bytes]:
    return [pb.frame(shape, pb.UDP(sport=sport, dport=5002) / pb.Raw(os.urandom(s)),
                     ip_id=(7 + i) % 0x10000) for i, s in enumerate(sizes)]  # fmt: skip


def counts(path: PacketPath) -> WireCounts:
    assert isinstance(path.counter, WireCounts)
    return path.counter


def read_buffer(layout: Layout, hdr: VnetHeader, packet: bytes, *, pi_flags: int = 0) -> bytes:
    """What a read from a device of `layout` gives for `packet` with `hdr`."""
    parts = []
    if layout.packet_info:
        v6 = packet[0] >> 4 == 6
        proto = packet[12:14] if layout.tap else (b"\x86\xdd" if v6 else b"\x08\x00")
        parts.append(struct.pack("=H2s", pi_flags, proto))
    if layout.vnet_hdr_size:
        parts.append(encode(hdr, layout.vnet_hdr_size, little_endian=layout.vnet_le))
    return b"".join(parts) + packet


def written(layout: Layout, items: list[Outgoing]) -> list[bytes]:
    """The wire packets the kernel would see for these writes: each write read back with a
    path of the written device's layout (which splits super-packets)."""
    back = PacketPath(layout, Layout(tap=layout.tap), views=False)
    out: list[bytes] = []
    for item in items:
        got: list[Buffer] = []
        assert back.decode(b"".join(item.parts), got) == item.packets
        out.extend(bytes(g) for g in got)
    assert counts(back).dropped_total == 0
    return out


def super_packet(segs: list[bytes], tap: bool) -> tuple[VnetHeader, bytes]:
    ((hdr, data),) = coalesce(segs, tap=tap)
    assert hdr.gso_type
    return hdr, bytes(data)


layouts = st.builds(
    Layout,
    tap=st.booleans(),
    packet_info=st.booleans(),
    vnet_hdr_size=st.sampled_from([0, 10, 12, 20, 24]),
    vnet_le=st.sampled_from([None, True, False]),
)


# ---- read side ------------------------------------------------------------------------------
@given(layouts, st.integers(0, 1400), st.booleans(), st.booleans())
def test_plain_packets_come_out_as_they_were(layout: Layout, size: int, v6: bool,
                                             udp: bool) -> None:  # fmt: skip
    shape = pb.Shape(v6=v6, tap=layout.tap)
    pkt = (udp_stream if udp else tcp_stream)(shape, [size])[0]
    path = PacketPath(layout)
    out: list[Buffer] = []
    assert path.decode(read_buffer(layout, ZERO_HEADER, pkt), out) == 1
    assert [bytes(p) for p in out] == [pkt]
    assert counts(path).read == 1 and counts(path).dropped_total == 0


@given(st.booleans(), st.booleans(), st.integers(2, 45), st.integers(200, 1448), st.booleans())
def test_the_original_of_a_super_packet_is_the_read_as_it_was(
    tap: bool, v6: bool, count: int, mss: int, udp: bool
) -> None:
    """decode_original: the segments for the handler, and the read itself, which written
    again gives the very bytes that were read (the kernel's header and packet)."""
    shape = pb.Shape(v6=v6, tap=tap)
    segs = (udp_stream if udp else tcp_stream)(shape, [mss] * count)
    hdr, sp = super_packet(segs, tap)
    layout = Layout(tap=tap, vnet_hdr_size=10, offloads=OFFLOADS, mtu=9000)
    path = PacketPath(layout)
    out: list[Buffer] = []
    buf = read_buffer(layout, hdr, sp)
    original = path.decode_original(buf, out)
    assert out == segs and original is not None
    assert (bytes(original.data), original.offload, original.segments) == (sp, hdr, count)
    (item,) = path.encode([original])
    assert b"".join(bytes(p) for p in item.parts) == buf and item.packets == count
    assert counts(path).read == count


@given(st.booleans(), st.booleans(), st.booleans())
def test_the_original_of_a_partial_checksum_read_keeps_or_completes_it(
        tap: bool, v6: bool, writable: bool) -> None:  # fmt: skip
    """A read-only read stays as read (partial checksum, NEEDS_CSUM); one completed in place
    for the handler is complete, so its original needs no offload."""
    shape = pb.Shape(v6=v6, tap=tap)
    pkt = tcp_stream(shape, [300])[0]
    hdr, partial = offload_checksum(pkt, tap=tap)
    layout = Layout(tap=tap, vnet_hdr_size=12, offloads=TUN_F_CSUM)
    buf = read_buffer(layout, hdr, partial)
    original = PacketPath(layout).decode_original(bytearray(buf) if writable else buf, [])
    assert original is not None and original.segments == 1
    if writable:
        assert original.offload == ZERO_HEADER and bytes(original.data) == pkt
    else:
        assert original.offload == hdr and bytes(original.data) == partial


def test_a_read_that_is_dropped_has_no_original() -> None:
    layout = Layout(vnet_hdr_size=10)
    assert PacketPath(layout).decode_original(b"\0" * 10, []) is None  # a short read


@given(st.booleans(), st.booleans(), st.booleans(), st.integers(0, 1400), st.booleans())
def test_partial_checksums_are_completed(tap: bool, v6: bool, udp: bool, size: int,
                                         writable: bool) -> None:  # fmt: skip
    shape = pb.Shape(v6=v6, tap=tap)
    pkt = (udp_stream if udp else tcp_stream)(shape, [size])[0]
    hdr, partial = offload_checksum(pkt, tap=tap)
    assert hdr.flags == VIRTIO_NET_HDR_F_NEEDS_CSUM
    layout = Layout(tap=tap, vnet_hdr_size=12, offloads=TUN_F_CSUM)
    buf = read_buffer(layout, hdr, partial)
    out: list[Buffer] = []
    PacketPath(layout).decode(bytearray(buf) if writable else buf, out)
    (got,) = out
    pb.assert_checksums(bytes(got), shape)
    assert isinstance(got, memoryview) and got.readonly  # a view; a handler cannot scribble


@given(st.booleans(), st.booleans(), st.integers(2, 45), st.integers(200, 1448), st.data())
def test_super_packets_are_split_into_the_wire_packets(
    tap: bool, v6: bool, count: int, mss: int, data: st.DataObject
) -> None:
    shape = pb.Shape(v6=v6, tap=tap, vlans=data.draw(st.integers(0, 2)) if tap else 0)
    udp = data.draw(st.booleans())
    last = data.draw(st.integers(1, mss))
    sizes = [mss] * (count - 1) + [last]
    segs = udp_stream(shape, sizes) if udp else tcp_stream(shape, sizes)
    hdr, sp = super_packet(segs, tap)
    layout = Layout(tap=tap, vnet_hdr_size=10, offloads=OFFLOADS, mtu=9000)
    path = PacketPath(layout)
    out: list[Buffer] = []
    assert path.decode(read_buffer(layout, hdr, sp), out) == count
    assert out == segs
    for s in out[:3]:
        pb.assert_checksums(bytes(s), shape)


@given(st.booleans(), st.booleans(), st.integers(600, 1400), st.integers(2, 20))
def test_no_wire_packet_is_longer_than_the_mtu(tap: bool, v6: bool, mtu: int,
                                               count: int) -> None:  # fmt: skip
    """A TCP super-packet cut for a larger MTU is cut finer; the byte stream is the same."""
    shape = pb.Shape(v6=v6, tap=tap)
    segs = tcp_stream(shape, [1448] * count)
    hdr, sp = super_packet(segs, tap)
    layout = Layout(tap=tap, vnet_hdr_size=10, offloads=OFFLOADS, mtu=mtu)
    path = PacketPath(layout)
    out: list[Buffer] = []
    path.decode(read_buffer(layout, hdr, sp), out)
    l2 = 14 if tap else 0
    assert all(len(p) - l2 <= mtu for p in out)
    wire = [bytes(p) for p in out]
    stream = b"".join(bytes(pb.dissect(p, shape)[pb.TCP].payload) for p in wire)
    assert stream == b"".join(bytes(pb.dissect(p, shape)[pb.TCP].payload) for p in segs)
    for p in wire:
        pb.assert_checksums(p, shape)
    assert counts(path).read == len(out)


def test_udp_super_packet_over_the_mtu_is_dropped_per_datagram() -> None:
    segs = udp_stream(pb.Shape(), [1400] * 7)
    hdr, sp = super_packet(segs, False)
    layout = Layout(vnet_hdr_size=10, offloads=OFFLOADS, mtu=1000)
    path = PacketPath(layout)
    out: list[Buffer] = []
    assert path.decode(read_buffer(layout, hdr, sp), out) == 0 and out == []
    assert counts(path).read == 7 and counts(path).dropped == {DropReason.TOO_BIG: 7}


def test_plain_packet_over_the_mtu_is_too_big() -> None:
    pkt = udp_stream(pb.Shape(tap=True, vlans=1), [1000])[0]  # 1028-byte IP packet, 1046 frame
    out: list[Buffer] = []
    PacketPath(Layout(tap=True, mtu=1028)).decode(pkt, out)
    assert len(out) == 1
    path = PacketPath(Layout(tap=True, mtu=1027))
    path.decode(pkt, out)
    assert len(out) == 1 and counts(path).dropped == {DropReason.TOO_BIG: 1}


def test_a_malformed_super_packet_counts_every_wire_packet_it_held() -> None:
    segs = tcp_stream(pb.Shape(), [1000] * 10)
    hdr, sp = super_packet(segs, False)
    broken = bytearray(sp)
    broken[0] = 0x75  # IP version 7
    layout = Layout(vnet_hdr_size=10, offloads=OFFLOADS)
    path = PacketPath(layout)
    out: list[Buffer] = []
    assert path.decode(read_buffer(layout, hdr, bytes(broken)), out) == 0
    assert counts(path).read == 10
    assert counts(path).dropped == {DropReason.MALFORMED: 10}


@pytest.mark.parametrize(
    ("layout", "buf"),
    [
        (Layout(vnet_hdr_size=10), b"\0" * 10),  # the header and nothing after it
        (Layout(vnet_hdr_size=12), b"\0" * 5),  # shorter than the header (a read(2))
        (Layout(packet_info=True), struct.pack("=H2s", TUN_PKT_STRIP, b"\x08\x00") + b"E" * 30),
        (Layout(), b""),
    ],
)
def test_short_and_truncated_reads_are_malformed(layout: Layout, buf: bytes) -> None:
    path = PacketPath(layout)
    out: list[Buffer] = []
    assert path.decode(buf, out) == 0 and out == []
    assert counts(path).dropped == {DropReason.MALFORMED: 1}


# ---- the handler's answers --------------------------------------------------------------------
class Faults:
    def __init__(self) -> None:
        self.bad: list[object] = []
        self.raised: list[BaseException] = []

    def exception(self, exc: BaseException) -> None:
        self.raised.append(exc)

    def bad_result(self, handler: object, value: object) -> None:
        self.bad.append(value)


def test_answers_that_are_not_packets_are_counted_drops() -> None:
    ip = udp_stream(pb.Shape(), [10])[0]
    frame = udp_stream(pb.Shape(tap=True), [10])[0]
    path = PacketPath(Layout())
    out: list[Packet] = []
    faults = Faults()

    def gen() -> object:
        yield ip
        raise RuntimeError("half-way")

    results: list[tuple[object, int, dict[DropReason, int]]] = [
        (ip, 1, {}), (bytearray(ip), 1, {}), (memoryview(ip), 1, {}), ([ip, ip], 2, {}),
        ((ip,), 1, {}), (iter([ip]), 1, {}), (memoryview(ip).cast("H"), 1, {}),
        (None, 0, {DropReason.FILTERED: 1}), ([], 0, {DropReason.FILTERED: 1}),
        ("a str", 0, {DropReason.BAD_RESULT: 1}), (42, 0, {DropReason.BAD_RESULT: 1}),
        ([ip, None, "x", 3], 1, {DropReason.BAD_RESULT: 3}),
        (b"\x00" * 40, 0, {DropReason.BAD_RESULT: 1}),  # not IPv4 or IPv6
        (b"\x45", 0, {DropReason.BAD_RESULT: 1}),  # too short
        (frame, 0, {DropReason.BAD_RESULT: 1}),  # an Ethernet frame on a TUN path
        (memoryview(bytes(80))[::2], 0, {DropReason.BAD_RESULT: 1}),  # not contiguous
        ({ip: 1}, 0, {DropReason.BAD_RESULT: 1}),
        (SuperPacket(ip, ZERO_HEADER, 1), 0, {DropReason.BAD_RESULT: 1}),  # not in this mode
        (gen(), 0, {DropReason.HANDLER_ERROR: 1}),  # what a raising generator gave is lost
    ]  # fmt: skip
    for result, taken, drops in results:
        before = dict(counts(path).dropped)
        assert path.accept(result, out, faults=faults) == taken, result
        after = {r: v - before.get(r, 0) for r, v in counts(path).dropped.items()}
        assert {r: v for r, v in after.items() if v} == drops, result
    assert len(out) == 9 and all(bytes(p) == ip for p in out)  # type: ignore[arg-type]
    assert len(faults.bad) == 9 and faults.bad[2] is None  # the first bad item of the list
    assert [type(e) for e in faults.raised] == [RuntimeError]
    tap = PacketPath(Layout(tap=True))
    assert tap.accept(frame, out) == 1 and tap.accept(b"\x00" * 13, out) == 0


# ---- write side -------------------------------------------------------------------------------
@given(st.booleans(), st.booleans(), st.integers(1, 40), st.integers(1, 1448), st.data())
def test_split_then_coalesce_gives_the_same_stream(
    tap: bool, v6: bool, count: int, mss: int, data: st.DataObject
) -> None:
    """Wire packets read from a TSO/USO device, coalesced for another, come out the same."""
    shape = pb.Shape(v6=v6, tap=tap)
    udp = data.draw(st.booleans())
    last = data.draw(st.integers(1, mss))
    sizes = [mss] * (count - 1) + [last]
    segs = udp_stream(shape, sizes) if udp else tcp_stream(shape, sizes)
    src = Layout(tap=tap, vnet_hdr_size=10, offloads=OFFLOADS, mtu=9000)
    dst = Layout(tap=tap, packet_info=data.draw(st.booleans()),
                 vnet_hdr_size=data.draw(st.sampled_from([10, 12, 24])),
                 vnet_le=data.draw(st.sampled_from([None, True, False])), offloads=OFFLOADS,
                 mtu=9000)  # fmt: skip
    path = PacketPath(src, dst)
    wire: list[Buffer] = []
    if count > 1:
        hdr, sp = super_packet(segs, tap)
        path.decode(read_buffer(src, hdr, sp), wire)
    else:
        path.decode(read_buffer(src, ZERO_HEADER, segs[0]), wire)
    answers: list[Packet] = []
    for p in wire:
        path.accept(p, answers)
    items = path.encode(answers)
    assert len(items) == 1 and items[0].packets == count
    assert written(dst, items) == segs


def test_coalescing_keeps_flow_order_and_only_where_the_destination_takes_it() -> None:
    shape = pb.Shape()
    a = tcp_stream(shape, [1000] * 6, sport=1)
    b = udp_stream(shape, [500] * 6, sport=2)
    c = tcp_stream(shape, [800] * 3, sport=3)
    mixed = [p for trio in zip(a, b, c + [b""] * 3, strict=True) for p in trio if p]
    src = Layout(mtu=9000)
    for offloads, expect in (
        (OFFLOADS, 3),  # three flows, three super-packets
        (TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO6, 2 + 6),  # no USO: the datagrams pass one by one
        (0, len(mixed)),  # no offloads: nothing is joined
    ):
        dst = Layout(vnet_hdr_size=10, offloads=offloads, mtu=9000)
        path = PacketPath(src, dst)
        items = path.encode(list(mixed))
        assert len(items) == expect
        out = written(dst, items)
        for flow in (a, b, c):
            assert [p for p in out if p in flow] == flow  # each flow in its own order
        assert sorted(out) == sorted(mixed)
    no = PacketPath(src, Layout(vnet_hdr_size=10, offloads=OFFLOADS), coalesce=False)
    assert len(no.encode(list(mixed))) == len(mixed)


@pytest.mark.parametrize("v6", [False, True], ids=["ipv4", "ipv6"])
@pytest.mark.parametrize("tap", [False, True], ids=["tun", "tap"])
def test_coalescing_tcp_only_joins_the_segments_and_passes_the_datagrams(tap: bool,
                                                                         v6: bool) -> None:
    """coalesce="tcp" (a handler route's default): TCP segments are joined, UDP datagrams
    pass one by one even where the destination takes USO, and `may_join` says which is which."""
    shape = pb.Shape(tap=tap, v6=v6)
    a = tcp_stream(shape, [1000] * 6, sport=1)
    b = udp_stream(shape, [500] * 6, sport=2)
    mixed = [p for pair in zip(a, b, strict=True) for p in pair]
    src = Layout(tap=tap, mtu=9000)
    dst = Layout(tap=tap, vnet_hdr_size=10, offloads=OFFLOADS, mtu=9000)
    path = PacketPath(src, dst, coalesce="tcp")
    assert path.coalesces
    assert all(path.may_join(p) for p in a) and not any(path.may_join(p) for p in b)
    small = tcp_stream(shape, [100, 0])  # a request/response segment, an ACK
    assert not any(path.may_join(p) for p in small), "small segments are written as read"
    items = path.encode(list(mixed))
    assert len(items) == 1 + len(b)  # one TSO packet, each datagram on its own
    out = written(dst, items)
    assert [p for p in out if p in a] == a and [p for p in out if p in b] == b
    both = PacketPath(src, dst, coalesce=True)
    assert all(both.may_join(p) for p in mixed)
    assert len(both.encode(list(mixed))) == 2
    neither = PacketPath(src, dst, coalesce=False)
    assert not neither.coalesces and not any(neither.may_join(p) for p in mixed)


def test_sent_and_failed_count_every_wire_packet() -> None:
    segs = tcp_stream(pb.Shape(), [1000] * 5)
    path = PacketPath(Layout(), Layout(vnet_hdr_size=10, offloads=OFFLOADS))
    (item,) = path.encode(list(segs))
    path.sent(item)
    path.failed(item, DropReason.REFUSED)
    assert counts(path).written == 5
    assert counts(path).dropped == {DropReason.REFUSED: 5}


# ---- between layouts --------------------------------------------------------------------------
def test_tun_to_tap_needs_the_ethernet_addresses() -> None:
    with pytest.raises(InvalidArgumentError, match="ethernet="):
        PacketPath(Layout(), Layout(tap=True))
    with pytest.raises(InvalidArgumentError):
        PacketPath(Layout(), Layout(tap=True), ethernet=(b"short", MAC_B))
    with pytest.raises(InvalidArgumentError, match="virtio-net header"):
        Layout(offloads=TUN_F_CSUM)
    with pytest.raises(InvalidArgumentError):
        Layout(vnet_hdr_size=4)


@pytest.mark.parametrize("v6", [False, True])
@pytest.mark.parametrize("dst_vnet", [0, 10])
def test_tun_to_tap_and_back(v6: bool, dst_vnet: int) -> None:
    tun_shape, tap_shape = pb.Shape(v6=v6), pb.Shape(v6=v6, tap=True)
    segs = tcp_stream(tun_shape, [1200] * 8) + udp_stream(tun_shape, [300] * 4)
    offloads = OFFLOADS if dst_vnet else 0
    tap = Layout(tap=True, packet_info=True, vnet_hdr_size=dst_vnet, offloads=offloads)
    path = PacketPath(Layout(), tap, ethernet=(MAC_A, MAC_B))
    frames = written(tap, path.encode(list(segs)))
    assert len(frames) == len(segs)
    for f, s in zip(frames, segs, strict=True):
        eth = pb.Ether(f)
        assert (eth.src, eth.dst) == (pb.MAC_A, pb.MAC_B) and f[14:] == s
        pb.assert_checksums(f, tap_shape)
    arp = bytes.fromhex("ffffffffffff02000000000a0806") + bytes(28)
    back = PacketPath(tap, Layout(vnet_hdr_size=10, offloads=OFFLOADS))
    items = back.encode([*frames, arp])
    assert counts(back).dropped == {DropReason.REFUSED: 1}
    assert written(Layout(vnet_hdr_size=10), items) == segs


# ---- super-packet mode ------------------------------------------------------------------------
@pytest.mark.parametrize("tap", [False, True])
def test_super_packet_mode_passes_them_whole_or_splits_for_a_plain_device(tap: bool) -> None:
    shape = pb.Shape(tap=tap)
    segs = tcp_stream(shape, [1448] * 20)
    hdr, sp = super_packet(segs, tap)
    src = Layout(tap=tap, vnet_hdr_size=12, vnet_le=True, offloads=OFFLOADS)
    to_vnet = Layout(tap=tap, vnet_hdr_size=10, vnet_le=False, offloads=OFFLOADS)
    path = PacketPath(src, to_vnet, super_packets=True)
    got = path.decode_super(read_buffer(src, hdr, sp))
    assert got is not None and isinstance(got, SuperPacket)
    assert got.offload == hdr and got.segments == 20 and bytes(got.data) == sp
    assert got.offload.gso_type == VIRTIO_NET_HDR_GSO_TCPV4
    answers: list[Packet] = []
    assert path.accept(got, answers) == 1
    (item,) = path.encode(answers)
    assert item.packets == 20 and item.parts[0] == encode(hdr, 10, little_endian=False)
    assert written(to_vnet, [item]) == segs
    plain = Layout(tap=tap)
    items = PacketPath(src, plain, super_packets=True).encode([got])
    assert [i.packets for i in items] == [1] * 20 and written(plain, items) == segs
    no_uso = Layout(tap=tap, vnet_hdr_size=10, offloads=TUN_F_CSUM | TUN_F_TSO4)
    usegs = udp_stream(shape, [1000] * 4)
    uhdr, usp = super_packet(usegs, tap)
    assert uhdr.gso_type == VIRTIO_NET_HDR_GSO_UDP_L4
    items = PacketPath(src, no_uso, super_packets=True).encode([SuperPacket(usp, uhdr, 4)])
    assert len(items) == 4 and written(no_uso, items) == usegs


def test_super_packet_mode_from_tap_to_tun() -> None:
    segs = tcp_stream(pb.Shape(tap=True, vlans=1), [1000] * 5)
    hdr, sp = super_packet(segs, True)
    src = Layout(tap=True, vnet_hdr_size=10, offloads=OFFLOADS)
    dst = Layout(vnet_hdr_size=10, offloads=OFFLOADS)
    path = PacketPath(src, dst, super_packets=True)
    got = path.decode_super(read_buffer(src, hdr, sp))
    assert got is not None
    (item,) = path.encode([got])
    assert written(dst, [item]) == [s[18:] for s in segs]


def test_an_offload_that_cannot_be_carried_out_is_counted_per_wire_packet() -> None:
    segs = udp_stream(pb.Shape(), [1000] * 6)
    hdr, sp = super_packet(segs, False)
    ufo = hdr._replace(gso_type=3)  # VIRTIO_NET_HDR_GSO_UDP: IP fragmentation, never split here
    layout = Layout(vnet_hdr_size=10, offloads=OFFLOADS)
    path = PacketPath(layout)
    out: list[Buffer] = []
    assert path.decode(read_buffer(layout, ufo, sp), out) == 0
    assert counts(path).read == 6 and counts(path).dropped == {DropReason.OFFLOAD: 6}


# ---- a plain forwarder's drain joined in C (PacketPath.reads_joiner) -------------------------
DATA_VALID = VnetHeader(VIRTIO_NET_HDR_F_DATA_VALID)


def _wire_of(layout: Layout, buf: bytes) -> list[bytes]:
    """The wire packets a buffer of `layout` holds, as a reader of it sees them (checksums
    complete, super-packets split)."""
    got: list[Buffer] = []
    PacketPath(layout, Layout(tap=layout.tap), views=False).decode(buf, got)
    return [bytes(g) for g in got]


def _one_zero(raw: bytes, tap: bool) -> bytes:
    """`raw` with a TCP checksum of 0xFFFF written 0x0000: the two one's-complement zeros are
    the same checksum, and which one a packet carries depends on where it was finished (the
    kernel's skb_checksum_help, like a NEEDS_CSUM completion here, stores 0xFFFF; a segment
    summed whole stores 0x0000). UDP keeps 0xFFFF: its 0x0000 means "no checksum"."""
    try:
        p = parse(raw, tap=tap)
    except MalformedPacket:
        return raw
    at = p.l4_off + 16
    if p.proto != 6 or p.fragment or raw[at : at + 2] != b"\xff\xff":
        return raw
    return raw[:at] + b"\x00\x00" + raw[at + 2 :]


def _flow(raw: bytes, tap: bool) -> object:
    try:
        p = parse(raw, tap=tap)
    except MalformedPacket:
        return raw
    return (p.src, p.dst, p.proto, p.sport, p.dport)


def _drain(shape: pb.Shape, rng: random.Random, layout: Layout) -> list[bytes]:
    """Reads as a device gives them: flows of TCP segments and UDP datagrams interleaved, each
    with a partial checksum (NEEDS_CSUM) or a complete one, a super-packet, a short read."""
    flows: list[list[bytes]] = []
    for k in range(rng.randint(1, 5)):
        n, mss = rng.randint(1, 6), rng.randint(1, 700)
        sizes = [mss] * (n - 1) + [rng.randint(1, mss)]
        flows.append(udp_stream(shape, sizes, sport=41000 + k) if rng.random() < 0.5
                     else tcp_stream(shape, sizes, sport=42000 + k,
                                     psh_last=rng.random() < 0.3))  # fmt: skip
    hdr, sp = super_packet(tcp_stream(shape, [500] * 3, sport=43000), shape.tap)
    queues = [list(f) for f in flows] + [[("super", hdr, sp)], [("short",)]]
    reads = []
    while any(queues):
        q = rng.choice([q for q in queues if q])
        item = q.pop(0)
        if isinstance(item, tuple):
            short = bytes((4 if layout.packet_info else 0) + layout.vnet_hdr_size - 1)
            reads.append(read_buffer(layout, item[1], item[2]) if item[0] == "super" else short)
        elif rng.random() < 0.5:
            reads.append(read_buffer(layout, *offload_checksum(item, tap=shape.tap)))
        else:  # complete, said valid (the kernel's CHECKSUM_UNNECESSARY) or not
            reads.append(read_buffer(layout, DATA_VALID if rng.random() < 0.3 else ZERO_HEADER,
                                     item))  # fmt: skip
    return reads


@given(layouts.filter(lambda la: la.vnet_hdr_size > 0), st.integers(0, 2**32 - 1),
       st.booleans(), st.integers(0, 2))  # fmt: skip
def test_a_drain_joined_in_c_holds_the_wire_packets_of_its_reads(
    layout: Layout, seed: int, verify: bool, vlans: int
) -> None:
    """The writes of a plain forwarder's drain joined by `reads_joiner` carry exactly the wire
    packets of its reads, each flow in order; the joined ones say how many reads they hold."""
    layout = Layout(tap=layout.tap, packet_info=layout.packet_info,
                    vnet_hdr_size=layout.vnet_hdr_size, vnet_le=layout.vnet_le,
                    offloads=OFFLOADS)  # fmt: skip
    join = PacketPath(layout, layout, verify=verify).reads_joiner()
    if join is None:  # the "numpy" and "python" rounds: no C loop
        assert not accel.ACCELERATE or not accel.available()
        return
    shape = pb.Shape(tap=layout.tap, vlans=vlans if layout.tap else 0)
    reads = _drain(shape, random.Random(seed), layout)
    bufs, counts = join(reads)
    joined = [0] * len(reads) if counts is None else counts  # None: nothing joined
    assert bufs is reads if counts is None else len(bufs) == len(joined)
    assert sum(max(j, 1) for j in joined) == len(reads)
    wire_in = [_one_zero(w, layout.tap) for r in reads for w in _wire_of(layout, r)]
    wire_out: list[bytes] = []
    for b, j in zip(bufs, joined, strict=True):
        got = [_one_zero(w, layout.tap) for w in _wire_of(layout, bytes(b))]
        if j:
            assert len(got) == j  # a joined buffer holds its reads' packets
        else:
            assert b in reads  # the read itself, as it came
        wire_out.extend(got)
    assert sorted(wire_out) == sorted(wire_in)
    for flow in {_flow(w, layout.tap) for w in wire_in}:
        assert [w for w in wire_out if _flow(w, layout.tap) == flow] == [
            w for w in wire_in if _flow(w, layout.tap) == flow]  # fmt: skip


def _c_joiner(layout: Layout, both_sums: str) -> (
        Callable[[list[bytes]], tuple[list[Buffer], list[int] | None]] | None):  # fmt: skip
    """`reads_joiner` of a path of `layout`: there in the "c" round only (None in the others)."""
    join = PacketPath(layout, layout).reads_joiner()
    assert (join is not None) == (both_sums == "c")
    return join


def test_partial_checksum_datagrams_of_a_drain_are_joined_in_c(both_sums: str) -> None:
    layout = Layout(vnet_hdr_size=12, offloads=OFFLOADS)
    join = _c_joiner(layout, both_sums)
    if join is None:
        return
    shape = pb.Shape()
    flows = [udp_stream(shape, [64] * 4, sport=41000 + k) for k in range(3)]
    reads = [read_buffer(layout, *offload_checksum(f[i])) for i in range(4) for f in flows]
    valid = udp_stream(shape, [64] * 3, sport=41009)  # complete, flagged DATA_VALID
    reads += [read_buffer(layout, DATA_VALID, d) for d in valid]
    bad = offload_checksum(flows[0][0])
    reads.append(read_buffer(layout, bad[0]._replace(csum_offset=4), bad[1]))  # not UDP's field
    bufs, joined = join(reads)
    assert joined == [4, 4, 4, 3, 0] and bufs[4] is reads[-1]
    assert [_wire_of(layout, bytes(b)) for b in bufs[:4]] == [*flows, valid]


def _with_zero_tcp_checksum(segment: bytes) -> bytes:
    """`segment` (a TUN TCP/IPv4 packet) with two payload bytes changed so that its complete TCP
    checksum is 0x0000 (scapy's computation, checked)."""
    field = pb.IP(segment)[pb.TCP].chksum  # the checksum of the payload as it is
    at = 20 + 32  # the first payload word (IPv4 header, TCP header with timestamps)
    word = int.from_bytes(segment[at : at + 2], "big") + field  # one's-complement add
    word = (word & 0xFFFF) + (word >> 16)
    fixed = pb.recomputed(pb.IP(segment[:at] + word.to_bytes(2, "big") + segment[at + 2 :]))
    assert fixed[pb.TCP].chksum == 0
    return bytes(fixed)


def test_a_segment_whose_checksum_is_zero_is_joined_and_split_to_the_same_checksum(
    both_sums: str,
) -> None:
    """A NEEDS_CSUM segment whose sum is zero is finished to 0xFFFF (as skb_checksum_help
    does); once joined and split it comes out 0x0000, the same checksum, which a receiver
    verifies alike. Every other byte comes back as read."""
    layout = Layout(vnet_hdr_size=12, offloads=OFFLOADS)
    join = _c_joiner(layout, both_sums)
    if join is None:
        return
    segs = tcp_stream(pb.Shape(), [600] * 3, sport=42000)
    segs[1] = _with_zero_tcp_checksum(segs[1])
    reads = [read_buffer(layout, *offload_checksum(s)) for s in segs]
    assert _wire_of(layout, reads[1])[0][36:38] == b"\xff\xff"
    bufs, joined = join(reads)
    assert joined == [3]
    assert _wire_of(layout, bytes(bufs[0])) == segs  # scapy's checksums: 0x0000 for segs[1]


# ---- a handler's drain of plain reads decoded in C (PacketPath.plain_decoder) ---------------
@given(layouts, st.integers(0, 2**32 - 1), st.booleans(), st.integers(0, 2), st.booleans())
def test_a_drain_of_plain_reads_decoded_in_c_is_what_decode_gives(
    layout: Layout, seed: int, views: bool, vlans: int, with_super: bool
) -> None:
    """`plain_decoder` gives, for a drain whose every read is one plain packet, the packets
    `decode` gives (the same bytes and type, checksums finished) and counts them the same; for
    any other drain (a super-packet, a short read) it gives None and counts nothing."""
    layout = Layout(tap=layout.tap, packet_info=layout.packet_info,
                    vnet_hdr_size=layout.vnet_hdr_size, vnet_le=layout.vnet_le,
                    offloads=OFFLOADS if layout.vnet_hdr_size else 0)  # fmt: skip
    fast = PacketPath(layout, layout, views=views)
    decode_plain = fast.plain_decoder()
    if decode_plain is None:  # the "numpy" and "python" rounds: no C loop
        assert not accel.ACCELERATE or not accel.available()
        return
    shape = pb.Shape(tap=layout.tap, vlans=vlans if layout.tap else 0)
    rng = random.Random(seed)
    mixed = with_super and layout.vnet_hdr_size > 0  # a super-packet and a short read too
    reads = _drain(shape, rng, layout) if mixed else [
        read_buffer(layout, *offload_checksum(s, tap=shape.tap)) if layout.vnet_hdr_size and
        rng.random() < 0.5 else read_buffer(layout, ZERO_HEADER, s)
        for s in (udp_stream(shape, [rng.randint(0, 1400)])[0] if rng.random() < 0.5 else
                  tcp_stream(shape, [rng.randint(0, 1400)])[0] for _ in range(rng.randint(1, 9)))
    ]  # fmt: skip
    reference = PacketPath(layout, layout, views=views)
    want: list[Buffer] = []
    for r in reads:
        reference.decode(r, want)
    got = decode_plain(reads)
    if mixed:  # not for C: `decode` reads them all
        assert got is None and counts(fast) == WireCounts()
        return
    assert got is not None
    assert [type(g) for g in got] == [type(w) for w in want]
    assert [bytes(g) for g in got] == [bytes(w) for w in want]
    assert all(g.readonly for g in got if isinstance(g, memoryview))
    assert counts(fast) == counts(reference)


def test_a_read_the_kernel_truncated_or_too_long_is_left_to_decode(both_sums: str) -> None:
    layout = Layout(packet_info=True, vnet_hdr_size=10, offloads=OFFLOADS, mtu=1000)
    decode_plain = PacketPath(layout, layout).plain_decoder()
    if both_sums != "c":
        assert decode_plain is None
        return
    assert decode_plain is not None
    ok = read_buffer(layout, ZERO_HEADER, udp_stream(pb.Shape(), [100])[0])
    assert decode_plain([ok]) is not None
    stripped = read_buffer(layout, ZERO_HEADER, udp_stream(pb.Shape(), [100])[0],
                           pi_flags=TUN_PKT_STRIP)  # fmt: skip
    too_long = read_buffer(layout, ZERO_HEADER, udp_stream(pb.Shape(), [1000])[0])
    hdr, partial = offload_checksum(udp_stream(pb.Shape(), [100])[0])
    bad_offset = read_buffer(layout, hdr._replace(csum_offset=200), partial)
    for bad in (stripped, too_long, bad_offset, b"\0" * 14, bytearray(ok)):
        assert decode_plain([ok, bad]) is None  # decode counts and drops it, with its reason
