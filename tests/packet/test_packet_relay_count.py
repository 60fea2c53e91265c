"""RelayDrain's segment count (mqtun._reads.count_segments in C, queue.count_segments_python)
held to the one parser's answer, gso.segment_count, on packets scapy builds: a count is that
answer or -1 (the read is left to Python, which counts it itself), never another number."""

from __future__ import annotations

import sys

import packet_builders as pb
import pytest
from hypothesis import given
from hypothesis import strategies as st

from mqtun import queue
from mqtun._uapi import (
    VIRTIO_NET_HDR_F_NEEDS_CSUM,
    VIRTIO_NET_HDR_GSO_ECN,
    VIRTIO_NET_HDR_GSO_TCPV4,
    VIRTIO_NET_HDR_GSO_TCPV6,
    VIRTIO_NET_HDR_GSO_UDP_L4,
    VIRTIO_NET_HDR_GSO_UDP_TUNNEL_IPV4,
)
from mqtun.packet.gso import segment_count
from mqtun.packet.vnet import VnetHeader
from mqtun.packet.vnet import encode as encode_vnet

_C = getattr(queue, "_count_segments_c", None)
COUNTS = [queue.count_segments_python] + ([_C] if _C is not None else [])
VNET = 12  # a virtio-net header of 12 bytes before each packet (the kernel's v1 layout)

shapes = st.builds(pb.Shape, v6=st.booleans(), ip_options=st.booleans(),
                   routing=st.booleans(), tap=st.booleans(), vlans=st.integers(0, 2))


def read_of(hdr: VnetHeader, packet: bytes, *, little: bool, pi: int = 0) -> bytes:
    return bytes(pi) + encode_vnet(hdr, VNET, little_endian=little) + packet


def common(shape: pb.Shape) -> bool:
    """The shape C counts itself: no VLAN tag, no IPv6 extension header."""
    return not shape.vlans and not (shape.v6 and (shape.ip_options or shape.routing))


@given(shapes, st.booleans(), st.integers(0, 9000), st.integers(0, 2000), st.booleans(),
       st.booleans(), st.integers(0, 3), st.data())
def test_a_super_packets_count_is_segment_counts_or_left_to_python(
    shape: pb.Shape, is_udp: bool, plen: int, size: int, little: bool, ecn: bool,
    mutations: int, data: st.DataObject,
) -> None:
    packet = bytearray(pb.udp(shape, bytes(plen)) if is_udp else pb.tcp(shape, bytes(plen)))
    base = VIRTIO_NET_HDR_GSO_UDP_L4 if is_udp else (
        VIRTIO_NET_HDR_GSO_TCPV6 if shape.v6 else VIRTIO_NET_HDR_GSO_TCPV4)
    gso_type = base | (VIRTIO_NET_HDR_GSO_ECN if ecn and not is_udp else 0)
    hdr = VnetHeader(VIRTIO_NET_HDR_F_NEEDS_CSUM, gso_type, data.draw(st.integers(0, 200)),
                     size, 0, 0)
    for _ in range(mutations):  # a header byte (or any) changed, the packet cut short
        packet[data.draw(st.integers(0, len(packet) - 1))] = data.draw(st.integers(0, 255))
    cut = len(packet) if not mutations else data.draw(st.integers(0, len(packet)))
    raw = bytes(packet[:cut])
    pi = data.draw(st.sampled_from([0, 4]))
    supers = queue.relay_supers(pi + VNET, pi, tap=shape.tap, little_endian=little)
    want = segment_count(hdr, raw, tap=shape.tap)
    for count in COUNTS:
        got = count(read_of(hdr, raw, little=little, pi=pi), pi + 1, supers)
        assert got in (-1, want), count
        if not mutations and common(shape) and count is _C:
            assert got == want  # the shape a TCP stream's reads have is counted in C
        if not mutations and count is queue.count_segments_python:
            assert got == want  # what parses is counted (only a guess would be left)
    assert all(count(read_of(hdr, raw, little=not little, pi=pi), pi + 1, supers) in (
        -1, segment_count(hdr._replace(gso_size=int.from_bytes(
            size.to_bytes(2, "little"), "big")), raw, tap=shape.tap))
        for count in COUNTS)  # the header read in the byte order it was given  # fmt: skip


@pytest.mark.parametrize("count", COUNTS, ids=lambda f: f.__module__)
def test_plain_reads_count_one_and_short_or_tunnel_reads_are_left_to_python(count: object) -> None:
    assert callable(count)
    little = sys.byteorder == "little"
    supers = queue.relay_supers(VNET, 0, tap=False, little_endian=little)
    packet = pb.tcp(pb.Shape(), bytes(3000))
    tso = VnetHeader(VIRTIO_NET_HDR_F_NEEDS_CSUM, VIRTIO_NET_HDR_GSO_TCPV4, 0, 1000, 20, 16)
    assert count(read_of(tso, packet, little=little), 1, supers) == 3
    assert count(read_of(tso, packet, little=little), 1, None) == -1  # supers not relayed
    assert count(read_of(VnetHeader(), packet, little=little), 1, supers) == 1  # plain
    assert count(read_of(VnetHeader(), packet, little=little), 1, None) == 1
    assert count(b"\0", 1, supers) == -1  # shorter than the header: not known plain
    assert count(packet, -1, None) == 1  # no header at all: every read is one packet
    assert count(read_of(tso._replace(gso_size=0), packet, little=little), 1, supers) == 1
    assert count(read_of(tso, b"", little=little), 1, supers) == -1  # nothing after it
    tunnel = tso._replace(gso_type=VIRTIO_NET_HDR_GSO_UDP_TUNNEL_IPV4 | VIRTIO_NET_HDR_GSO_UDP_L4)
    assert count(read_of(tunnel, packet, little=little), 1, supers) == -1


@pytest.mark.skipif(_C is None, reason="mqtun._reads is not built here")
@pytest.mark.parametrize("vlans", [0, 1, 2])
def test_a_joined_buffer_is_counted_by_the_one_parser_when_c_leaves_it(vlans: int) -> None:
    """A RelayDrain's failed write after a join hands the joined buffers to the route's
    `rest`, which counts each by its segments. The join may build a shape C's count leaves to
    Python (a VLAN-tagged frame: -1), so `rest` counts with count_segments_python, which
    counts every joined buffer by the reads it holds."""
    from mqtun import _uapi
    from mqtun.packet import accel
    from mqtun.runtime.path import Layout, PacketPath

    if not accel.available():
        pytest.skip("mqtun.packet._accel is not built here")
    offloads = _uapi.TUN_F_CSUM | _uapi.TUN_F_TSO4 | _uapi.TUN_F_TSO6 | (
        _uapi.TUN_F_USO4 | _uapi.TUN_F_USO6)  # fmt: skip
    layout = Layout(tap=True, vnet_hdr_size=VNET, offloads=offloads)
    join = PacketPath(layout, layout).reads_joiner()
    assert join is not None
    shape = pb.Shape(tap=True, vlans=vlans)
    little = sys.byteorder == "little"
    reads = [read_of(VnetHeader(), pb.udp(shape, bytes([i]) * 100), little=little)
             for i in range(6)]
    out, counts = join(reads)
    assert counts == [6]
    supers = queue.relay_supers(VNET, 0, tap=True, little_endian=little)
    assert _C(out[0], 1, supers) in (-1, 6)
    assert (_C(out[0], 1, supers) == -1) == bool(vlans)
    assert queue.count_segments_python(out[0], 1, supers) == 6
