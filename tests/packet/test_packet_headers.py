"""Header parsing: offsets and flow keys against scapy's dissection; every refusal has a reason."""

from __future__ import annotations

import socket

import packet_builders as pb
import pytest
from hypothesis import given
from hypothesis import strategies as st
from scapy.layers.inet6 import IPv6ExtHdrFragment

from mqtun.packet import REASONS, MalformedPacket, coalesce, flow_key, parse, parse_ethernet

shapes = st.builds(
    pb.Shape,
    v6=st.booleans(),
    ip_options=st.booleans(),
    routing=st.booleans(),
    tap=st.booleans(),
    vlans=st.integers(0, 2),
)


@given(shapes, st.binary(max_size=300), st.booleans())
def test_offsets_match_scapy(shape: pb.Shape, payload: bytes, is_udp: bool) -> None:
    raw = pb.udp(shape, payload) if is_udp else pb.tcp(shape, payload)
    p = parse(raw, tap=shape.tap)
    pkt = pb.dissect(raw, shape)
    ip_layer = pkt[pb.IPv6] if shape.v6 else pkt[pb.IP]
    l4_layer = pkt[pb.UDP] if is_udp else pkt[pb.TCP]
    assert p.l3_off == len(raw) - len(ip_layer)
    assert p.l4_off == len(raw) - len(l4_layer)
    assert p.payload_off == len(raw) - len(payload)
    assert p.end == len(raw) and p.payload_len == len(payload)
    assert p.version == (6 if shape.v6 else 4)
    assert p.proto == (17 if is_udp else 6)
    assert (p.sport, p.dport) == (l4_layer.sport, l4_layer.dport)
    assert not p.fragment
    src, dst = (pb.SRC6, pb.DST6) if shape.v6 else (pb.SRC4, pb.DST4)
    key = flow_key(p)
    assert key[0] == p.version and key[3:] == (p.proto, p.sport, p.dport)
    assert key[1:3] == (p.src, p.dst)
    assert p.src == _addr(src, shape.v6) and p.dst == _addr(dst, shape.v6)
    if shape.v6 and shape.routing:
        assert p.pseudo_dst == _addr("fd00:6d71::99", True)
    else:
        assert p.pseudo_dst == p.dst


def _addr(text: str, v6: bool) -> bytes:
    return socket.inet_pton(socket.AF_INET6 if v6 else socket.AF_INET, text)


def test_tap_padding_is_outside_the_packet() -> None:
    shape = pb.Shape(tap=True)
    raw = pb.tcp(shape, b"", timestamps=False) + bytes(6)  # padded to the 60-byte minimum
    p = parse(raw, tap=True)
    assert p.end == len(raw) - 6
    assert parse(raw, tap=True, use_ip_length=False).end == len(raw)


def test_fragments_have_ports_only_in_the_first() -> None:
    first = bytes(pb.IP(src=pb.SRC4, dst=pb.DST4, flags="MF") / pb.UDP() / pb.Raw(b"x" * 16))
    later = bytes(pb.IP(src=pb.SRC4, dst=pb.DST4, frag=3, proto=17) / pb.Raw(b"y" * 16))
    p1, p2 = parse(first), parse(later)
    assert p1.fragment and p1.l4_len == 8
    assert p2.fragment and p2.l4_len == 0 and p2.sport == 0
    six = bytes(
        pb.IPv6(src=pb.SRC6, dst=pb.DST6) / IPv6ExtHdrFragment(offset=5, m=1) / pb.Raw(b"z" * 8)
    )
    p6 = parse(six)
    assert p6.fragment and p6.l4_len == 0 and p6.l4_off == 48


def test_ethernet_tags() -> None:
    raw = pb.tcp(pb.Shape(tap=True, vlans=2), b"data")
    assert parse_ethernet(raw) == (0x0800, 22)
    with pytest.raises(MalformedPacket) as info:
        parse(bytes(12), tap=True)
    assert info.value.reason == "truncated-ethernet"
    arp = bytes.fromhex("ffffffffffff020000000001" "0806") + bytes(28)
    with pytest.raises(MalformedPacket) as info:
        parse(arp, tap=True)
    assert info.value.reason == "not-ip"


@given(shapes, st.binary(max_size=64), st.booleans(), st.data())
def test_every_truncation_is_refused_with_a_reason(
    shape: pb.Shape, payload: bytes, is_udp: bool, data: st.DataObject
) -> None:
    raw = pb.udp(shape, payload) if is_udp else pb.tcp(shape, payload)
    cut = data.draw(st.integers(0, len(raw) - 1))
    with pytest.raises(MalformedPacket) as info:
        parse(raw[:cut], tap=shape.tap)
    assert info.value.reason in REASONS


@given(st.binary(max_size=200), st.booleans(), st.booleans())
def test_random_bytes_only_raise_malformed_packet(raw: bytes, tap: bool, use_len: bool) -> None:
    try:
        p = parse(raw, tap=tap, use_ip_length=use_len)
    except MalformedPacket as err:
        assert err.reason in REASONS
    else:
        assert p.l3_off <= p.l4_off <= p.payload_off <= p.end <= len(raw)


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        (b"", "bad-ip-version"),
        (b"\x45" + bytes(10), "truncated-ipv4"),
        (b"\x44" + bytes(19), "bad-ipv4-header-length"),
        (b"\x45\x00\x00\x05" + bytes(16), "bad-ipv4-length"),
        (b"\x60" + bytes(20), "truncated-ipv6"),
        (b"\x70" + bytes(40), "bad-ip-version"),
    ],
)
def test_reasons(raw: bytes, reason: str) -> None:
    with pytest.raises(MalformedPacket) as info:
        parse(raw)
    assert info.value.reason == reason


@pytest.mark.parametrize(
    "tpids",
    [(), (0x8100,), (0x88A8,), (0x9100,), (0x8100, 0x8100), (0x88A8, 0x8100), (0x8100, 0x88A8),
     (0x88A8, 0x88A8), (0x9100, 0x8100), (0x8100, 0x8100, 0x8100)],
)
def test_one_vlan_rule_for_parse_and_coalesce(tpids: tuple[int, ...]) -> None:
    """0x8100 and 0x88a8 in any order, at most two tags: parse() and coalesce() agree (each
    used to have its own rule: 0x9100 parsed as a tag, 0x88a8 inside a tag did not coalesce)."""
    segs = []
    for i in range(3):
        ip = bytes(pb.IP(src=pb.SRC4, dst=pb.DST4, id=10 + i, flags="DF")
                   / pb.TCP(sport=1, dport=2, seq=1000 + 100 * i, ack=5, flags="A")
                   / pb.Raw(bytes([i]) * 100))  # fmt: skip
        tags = b"".join(t.to_bytes(2, "big") + (7 + j).to_bytes(2, "big")
                        for j, t in enumerate(tpids))  # fmt: skip
        segs.append(bytes.fromhex("02000000000b02000000000a") + tags + b"\x08\x00" + ip)
    expected_ip = all(t in (0x8100, 0x88A8) for t in tpids) and len(tpids) <= 2
    try:
        p = parse(segs[0], tap=True)
    except MalformedPacket as err:
        assert not expected_ip and err.reason == "not-ip"
    else:
        assert expected_ip and p.l3_off == 14 + 4 * len(tpids)
    joined = coalesce(segs, tap=True)
    assert len(joined) == (1 if expected_ip else 3)
