"""packet.vxlan against scapy's VXLAN layer (an independent encoder/decoder), no device, no root
needed: the header, every drop reason, the source-port mapping, coalesced reads and the
virtio-net header a decapsulated frame is written with."""

from __future__ import annotations

import struct
import warnings

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mqtun import _uapi
from mqtun.errors import InvalidArgumentError
from mqtun.packet import ZERO_HEADER, MalformedPacket, split
from mqtun.packet import vxlan as vx

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    from scapy.layers.inet import IP, TCP, UDP
    from scapy.layers.inet6 import IPv6
    from scapy.layers.l2 import ARP, Ether
    from scapy.layers.vxlan import VXLAN
    from scapy.packet import Raw

MAC_A, MAC_B = "02:00:00:00:00:0a", "02:00:00:00:00:0b"


def _inner(payload: bytes = b"hello", sport: int = 1234) -> bytes:
    return bytes(Ether(src=MAC_A, dst=MAC_B) / IP(src="198.19.0.1", dst="198.19.0.2")
                 / UDP(sport=sport, dport=5678) / Raw(payload))


@given(vni=st.integers(0, 0xFFFFFF), payload=st.binary(max_size=64))
def test_encapsulate_matches_scapy(vni: int, payload: bytes) -> None:
    frame = _inner(payload)
    ours = vx.encapsulate(frame, vni)
    theirs = bytes(VXLAN(flags=0x08, vni=vni) / Ether(frame))
    assert ours == theirs
    parsed = VXLAN(ours)
    assert parsed.vni == vni and parsed.flags == 0x08
    assert bytes(vx.decapsulate(ours, vni)) == frame
    assert vx.check(ours, vni) is None


@pytest.mark.parametrize(
    ("datagram", "reason"),
    [
        (b"", "vxlan-short"),
        (b"\x08\0\0\0\0\0\x2a", "vxlan-short"),  # 7 bytes
        (bytes(VXLAN(flags=0x00, vni=42)) + _inner(), "vxlan-bad-flags"),  # no I flag
        (bytes(VXLAN(flags=0x0C, vni=42)) + _inner(), "vxlan-bad-flags"),  # a reserved flag
        (bytes(VXLAN(flags=0x08, vni=42, reserved2=1)) + _inner(), "vxlan-bad-flags"),
        (bytes(VXLAN(flags=0x08, vni=43)) + _inner(), "vxlan-wrong-vni"),
        (bytes(VXLAN(flags=0x08, vni=42)) + _inner()[:13], "vxlan-truncated"),
        (bytes(VXLAN(flags=0x08, vni=42)), "vxlan-truncated"),
    ],
)
def test_check_reasons(datagram: bytes, reason: str) -> None:
    assert reason in vx.VXLAN_REASONS
    assert vx.check(datagram, 42) == reason
    with pytest.raises(MalformedPacket) as info:
        vx.decapsulate(datagram, 42)
    assert info.value.reason == reason


@given(st.binary(max_size=80), st.integers(0, 0xFFFFFF))
def test_check_never_raises(data: bytes, vni: int) -> None:
    reason = vx.check(data, vni)
    assert reason is None or reason in vx.VXLAN_REASONS
    if reason is None:
        assert VXLAN(data[:8]).vni == vni


def test_vni_range() -> None:
    for bad in (-1, 0x1000000):
        with pytest.raises(InvalidArgumentError):
            vx.header(bad)


def _kernel_src_port(h: int, low: int, high: int) -> int:
    """udp_flow_src_port as include/net/udp.h writes it, in C-like 32/64-bit steps."""
    h = h & 0xFFFFFFFF
    h ^= (h << 16) & 0xFFFFFFFF
    return ((h * (high - low)) >> 32) + low


@given(st.integers(0, 0xFFFFFFFF))
def test_source_port_is_the_kernels_mapping(h: int) -> None:
    port = vx.source_port(h)
    assert port == _kernel_src_port(h, 32768, 60999)
    assert 32768 <= port < 60999
    assert vx.source_port(h, 1000, 1010) in range(1000, 1010)


def test_flow_hash_is_per_flow() -> None:
    a1, a2 = _inner(b"one"), _inner(b"two, longer payload")
    b = _inner(b"one", sport=1235)
    assert vx.flow_hash(a1) == vx.flow_hash(a2)
    assert vx.flow_hash(a1) != vx.flow_hash(b)
    arp = bytes(Ether(src=MAC_A, dst="ff:ff:ff:ff:ff:ff") / ARP(psrc="198.19.0.1"))
    assert vx.flow_hash(arp) == vx.flow_hash(arp[:20])  # by MACs: never raises


def test_datagrams_train_and_super_datagram() -> None:
    one = vx.encapsulate(_inner(b"a" * 100), 7)
    train = memoryview(one * 3 + one[:50])
    parts = vx.datagrams(train, len(one))
    assert [bytes(p) for p in parts] == [one, one, one, one[:50]]
    assert [bytes(p) for p in vx.datagrams(memoryview(one), 0)] == [one]
    # a tunnel super-datagram: the inner IP length spans the whole read, the size is the MSS
    big = vx.encapsulate(_inner(b"b" * 3000), 7)
    assert [bytes(p) for p in vx.datagrams(memoryview(big), 1000)] == [big]


def test_receive_header_for_a_super_frame() -> None:
    frame = bytes(Ether(src=MAC_A, dst=MAC_B) / IP(src="198.19.0.1", dst="198.19.0.2")
                  / TCP(sport=1, dport=2, flags="A", seq=1000) / Raw(b"z" * 3000))
    hdr = vx.receive_header(frame, 1000)
    assert hdr.gso_type == _uapi.VIRTIO_NET_HDR_GSO_TCPV4 and hdr.gso_size == 1000
    assert hdr.csum_start == 34 and hdr.csum_offset == 16 and hdr.hdr_len == 54
    # the header describes the frame: splitting by it gives scapy-valid segments
    segments = split(hdr, frame, tap=True)
    assert len(segments) == 3
    for seg in segments:
        claimed = Ether(seg)[TCP].chksum
        again = Ether(seg)
        del again[TCP].chksum
        assert Ether(bytes(again))[TCP].chksum == claimed


def _partial(frame: bytes, l4: int, off: int) -> bytes:
    """The frame with its transport checksum left as a veth sender leaves it: the seed."""
    from mqtun.packet import pseudo_header_sum

    p = Ether(frame)
    ip = p.payload
    if isinstance(ip, IP):
        import socket

        src, dst = socket.inet_aton(ip.src), socket.inet_aton(ip.dst)
        proto = ip.proto
    else:
        import socket

        src, dst = socket.inet_pton(socket.AF_INET6, ip.src), socket.inet_pton(
            socket.AF_INET6, ip.dst)
        proto = ip.nh
    seed = pseudo_header_sum(src, dst, proto, len(frame) - l4)
    return frame[: l4 + off] + struct.pack("!H", seed) + frame[l4 + off + 2 :]


@pytest.mark.parametrize("v6", [False, True])
@pytest.mark.parametrize("proto", ["tcp", "udp"])
def test_receive_header_for_partial_checksums(v6: bool, proto: str) -> None:
    ip = (IPv6(src="fd00:1::1", dst="fd00:1::2") if v6
          else IP(src="198.19.0.1", dst="198.19.0.2"))
    l4 = TCP(sport=1, dport=2, flags="PA") if proto == "tcp" else UDP(sport=1, dport=2)
    frame = bytes(Ether(src=MAC_A, dst=MAC_B) / ip / l4 / Raw(b"data!"))
    assert vx.receive_header(frame) == ZERO_HEADER  # complete: nothing to do
    start = 14 + (40 if v6 else 20)
    off = 16 if proto == "tcp" else 6
    partial = _partial(frame, start, off)
    hdr = vx.receive_header(partial)
    assert hdr.needs_csum and hdr.csum_start == start and hdr.csum_offset == off
    assert not hdr.is_gso
    # completing it as the kernel would gives scapy's checksum back
    completed = split(hdr, partial, tap=True)[0]
    assert completed == frame
    # a corrupted checksum is left alone (the kernel drops it)
    bad = bytearray(frame)
    bad[start + off] ^= 0x55
    assert vx.receive_header(bytes(bad)) == ZERO_HEADER


@given(st.binary(max_size=200), st.integers(0, 2000))
def test_receive_header_never_raises(data: bytes, gso: int) -> None:
    vx.receive_header(data, gso)


def test_too_big_reply_ipv4_matches_scapy() -> None:
    from scapy.layers.inet import ICMP, IPerror

    big = bytes(Ether(src=MAC_A, dst=MAC_B) / IP(src="198.19.0.1", dst="198.19.0.2", flags="DF")
                / TCP(sport=1, dport=2, flags="A") / Raw(b"q" * 1500))
    reply = vx.too_big_reply(big, 1450)
    assert reply is not None
    pkt = Ether(reply)
    assert pkt.src == MAC_B and pkt.dst == MAC_A
    assert pkt[IP].src == "198.19.0.2" and pkt[IP].dst == "198.19.0.1"
    assert pkt[ICMP].type == 3 and pkt[ICMP].code == 4 and pkt[ICMP].nexthopmtu == 1450
    assert pkt[IPerror].dst == "198.19.0.2" and len(pkt[IP]) <= 576
    again = Ether(reply)
    del again[IP].chksum, again[ICMP].chksum
    rebuilt = Ether(bytes(again))
    assert rebuilt[IP].chksum == pkt[IP].chksum and rebuilt[ICMP].chksum == pkt[ICMP].chksum
    no_df = bytes(Ether() / IP(src="198.19.0.1", dst="198.19.0.2") / Raw(b"q" * 1500))
    assert vx.too_big_reply(no_df, 1450) is None
    error = bytes(Ether() / IP(flags="DF", src="198.19.0.1", dst="198.19.0.2")
                  / ICMP(type=3, code=1) / Raw(b"q" * 1500))
    assert vx.too_big_reply(error, 1450) is None
    assert vx.too_big_reply(b"\x00" * 20, 1450) is None


def test_too_big_reply_ipv6_matches_scapy() -> None:
    from scapy.layers.inet6 import ICMPv6PacketTooBig

    big = bytes(Ether(src=MAC_A, dst=MAC_B) / IPv6(src="fd00:1::1", dst="fd00:1::2")
                / UDP(sport=1, dport=2) / Raw(b"q" * 1500))
    reply = vx.too_big_reply(big, 1430)
    assert reply is not None
    pkt = Ether(reply)
    assert pkt[IPv6].src == "fd00:1::2" and pkt[IPv6].dst == "fd00:1::1"
    ptb = pkt[ICMPv6PacketTooBig]
    assert ptb.mtu == 1430 and len(pkt[IPv6]) <= 1280
    claimed = ptb.cksum
    again = Ether(reply)
    del again[ICMPv6PacketTooBig].cksum
    assert Ether(bytes(again))[ICMPv6PacketTooBig].cksum == claimed


def test_receive_header_for_a_super_frame_without_segment_size() -> None:
    """A super-datagram that came without a segment size: longer than the TAP's MTU, its MSS
    is what the MTU leaves after the headers."""
    frame = bytes(Ether(src=MAC_A, dst=MAC_B) / IPv6(src="fd00:1::1", dst="fd00:1::2")
                  / TCP(sport=1, dport=2, flags="A") / Raw(b"z" * 5000))
    hdr = vx.receive_header(frame, 0, mtu=1430)
    assert hdr.gso_type == _uapi.VIRTIO_NET_HDR_GSO_TCPV6 and hdr.gso_size == 1430 - 60
    assert vx.receive_header(frame[:14 + 40 + 20 + 1000], 0, mtu=1430) == ZERO_HEADER


@given(st.binary(max_size=300), st.integers(0, 400))
def test_datagrams_never_raise_and_cover_the_read(data: bytes, seg: int) -> None:
    parts = vx.datagrams(memoryview(data), seg)
    assert b"".join(bytes(p) for p in parts) == data
    assert all(len(p) for p in parts) or data == b""


@given(st.binary(max_size=1600), st.integers(576, 9000))
def test_too_big_reply_never_raises(data: bytes, mtu: int) -> None:
    reply = vx.too_big_reply(data, mtu)
    assert reply is None or len(reply) <= 14 + 8 + 1280
