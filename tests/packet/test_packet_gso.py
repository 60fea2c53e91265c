"""GSO split: every segment checked by scapy (fields and recomputed checksums), payload intact."""

from __future__ import annotations

import os
import shutil

import packet_builders as pb
import pytest
from hypothesis import given
from hypothesis import strategies as st

from mqtun._uapi import (
    VIRTIO_NET_HDR_F_NEEDS_CSUM,
    VIRTIO_NET_HDR_F_UDP_TUNNEL_CSUM,
    VIRTIO_NET_HDR_GSO_ECN,
    VIRTIO_NET_HDR_GSO_TCPV4,
    VIRTIO_NET_HDR_GSO_TCPV6,
    VIRTIO_NET_HDR_GSO_UDP,
    VIRTIO_NET_HDR_GSO_UDP_L4,
    VIRTIO_NET_HDR_GSO_UDP_TUNNEL_IPV4,
    VIRTIO_NET_HDR_GSO_UDP_TUNNEL_IPV6,
)
from mqtun.packet import (
    REASONS,
    MalformedPacket,
    VnetHeader,
    accel,
    parse,
    pseudo_header_sum,
    split,
)
from mqtun.packet.gso import split_train

pytestmark = pytest.mark.usefixtures("both_sums")  # the C loop, numpy and pure-Python sums

CWR, ECE, PSH, FIN = "C", "E", "P", "F"
shapes = st.builds(
    pb.Shape,
    v6=st.booleans(),
    ip_options=st.booleans(),
    routing=st.booleans(),
    tap=st.booleans(),
    vlans=st.integers(0, 2),
)


def seeded(raw: bytes, shape: pb.Shape, csum_offset: int) -> tuple[bytes, int]:
    """The packet as the kernel hands it out with NEEDS_CSUM: checksum field = pseudo sum."""
    p = parse(raw, tap=shape.tap)
    at = p.l4_off + csum_offset
    seed = pseudo_header_sum(p.src, p.pseudo_dst, p.proto, p.end - p.l4_off)
    return raw[:at] + seed.to_bytes(2, "big") + raw[at + 2 :], p.l4_off


@given(
    shapes,
    st.integers(0, 12000),
    st.data(),
    st.sets(st.sampled_from([CWR, ECE, PSH, FIN])),
    st.integers(0, 2**32 - 1),
    st.integers(0, 0xFFFF),
    st.integers(0, 0xFFFF),
)
def test_tcp_split_matches_scapy(
    shape: pb.Shape,
    plen: int,
    data: st.DataObject,
    extra: set[str],
    seq0: int,
    ip_id0: int,
    hint: int,
) -> None:
    mss = data.draw(st.integers(max(1, -(-plen // 48)), 3000), label="mss")
    payload = os.urandom(plen)
    flags = "A" + "".join(sorted(extra))
    raw = pb.tcp(shape, payload, seq=seq0, flags=flags, ip_id=ip_id0)
    super_packet, l4 = seeded(raw, shape, 16)
    gso = VIRTIO_NET_HDR_GSO_TCPV6 if shape.v6 else VIRTIO_NET_HDR_GSO_TCPV4
    if CWR in extra:
        gso |= VIRTIO_NET_HDR_GSO_ECN
    # hdr_len and csum_start are hints only: give nonsense and expect the same result
    hdr = VnetHeader(VIRTIO_NET_HDR_F_NEEDS_CSUM, gso, hint, mss, l4, 16)
    segs = split(hdr, super_packet, tap=shape.tap)

    assert len(segs) == max(1, -(-plen // mss))
    original = pb.dissect(raw, shape)
    got = b""
    last = len(segs) - 1
    for i, seg in enumerate(segs):
        pkt = pb.assert_checksums(seg, shape)
        t = pkt[pb.TCP]
        assert t.seq == (seq0 + i * mss) % 2**32
        want = set(flags)
        if i > 0:
            want.discard(CWR)
        if i < last:
            want -= {PSH, FIN}
        assert set(str(t.flags)) == want
        assert (t.ack, t.window, t.options) == (
            original[pb.TCP].ack,
            original[pb.TCP].window,
            original[pb.TCP].options,
        )
        if shape.v6:
            assert pkt[pb.IPv6].plen == len(pkt[pb.IPv6].payload)
        else:
            assert pkt[pb.IP].id == (ip_id0 + i) % 0x10000
            assert pkt[pb.IP].len == len(pkt[pb.IP])
            assert pkt[pb.IP].options == original[pb.IP].options
        got += bytes(t.payload)
        if i < last:
            assert len(t.payload) == mss
    assert got == payload


@given(shapes, st.integers(0, 9000), st.data(), st.integers(0, 0xFFFF))
def test_udp_split_matches_scapy(
    shape: pb.Shape, plen: int, data: st.DataObject, ip_id0: int
) -> None:
    mss = data.draw(st.integers(max(1, -(-plen // 48)), 2000), label="mss")
    payload = os.urandom(plen)
    raw = pb.udp(shape, payload, ip_id=ip_id0)
    super_packet, l4 = seeded(raw, shape, 6)
    hdr = VnetHeader(VIRTIO_NET_HDR_F_NEEDS_CSUM, VIRTIO_NET_HDR_GSO_UDP_L4, 0, mss, l4, 6)
    segs = split(hdr, super_packet, tap=shape.tap)
    assert len(segs) == max(1, -(-plen // mss))
    got = b""
    for i, seg in enumerate(segs):
        pkt = pb.assert_checksums(seg, shape)
        u = pkt[pb.UDP]
        assert u.len == len(u) and u.chksum != 0
        if not shape.v6:
            assert pkt[pb.IP].id == (ip_id0 + i) % 0x10000
        got += bytes(u.payload)
    assert got == payload


@given(shapes, st.integers(0, 12000), st.data(), st.booleans(), st.binary(max_size=9))
def test_split_train_is_split_behind_a_prefix(
    shape: pb.Shape, plen: int, data: st.DataObject, is_udp: bool, prefix: bytes
) -> None:
    """split_train (one buffer of equal rows and a tail, for UDP GSO) gives split()'s packets,
    each behind the prefix; an odd prefix or size takes the byte-column path."""
    mss = data.draw(st.integers(max(1, -(-plen // 48)), 3000), label="mss")
    payload = os.urandom(plen)
    if is_udp:
        raw = pb.udp(shape, payload)
        super_packet, l4 = seeded(raw, shape, 6)
        hdr = VnetHeader(VIRTIO_NET_HDR_F_NEEDS_CSUM, VIRTIO_NET_HDR_GSO_UDP_L4, 0, mss, l4, 6)
    else:
        raw = pb.tcp(shape, payload, flags="AP")
        super_packet, l4 = seeded(raw, shape, 16)
        gso = VIRTIO_NET_HDR_GSO_TCPV6 if shape.v6 else VIRTIO_NET_HDR_GSO_TCPV4
        hdr = VnetHeader(VIRTIO_NET_HDR_F_NEEDS_CSUM, gso, 0, mss, l4, 16)
    want = [prefix + s for s in split(hdr, super_packet, tap=shape.tap)]
    train = split_train(hdr, super_packet, tap=shape.tap, prefix=prefix)
    assert train.packets() == want and len(train) == len(want)
    assert len(bytes(train.body)) == train.count * train.size
    assert not train.tail or len(train.tail) < train.size
    plain = split_train(VnetHeader(0, 0, 0, 0, 0, 0), raw, tap=shape.tap, prefix=prefix)
    assert plain.packets() == [prefix + raw] and len(plain) == 1


def test_the_c_loop_is_built_where_a_compiler_is() -> None:
    """The package builds mqtun.packet._accel when it can (CI can): so the "c" runs above are
    not all skipped where they should run."""
    if shutil.which("cc") is None and shutil.which("gcc") is None:
        pytest.skip("no C compiler here: the package is built without its C loop")
    assert accel.available()


@given(shapes, st.integers(16, 12000), st.integers(1, 1500), st.binary(max_size=9))
def test_the_c_loop_gives_the_numpy_paths_bytes(
    shape: pb.Shape, plen: int, mss: int, prefix: bytes
) -> None:
    """Differential: the same super-packet cut by the C loop and by numpy, byte for byte."""
    if not accel.available() or mss * 2 > plen:
        return
    raw = pb.tcp(shape, os.urandom(plen), flags="AP")
    super_packet, l4 = seeded(raw, shape, 16)
    gso = VIRTIO_NET_HDR_GSO_TCPV6 if shape.v6 else VIRTIO_NET_HDR_GSO_TCPV4
    hdr = VnetHeader(VIRTIO_NET_HDR_F_NEEDS_CSUM, gso, 0, mss, l4, 16)
    saved = accel.ACCELERATE
    try:
        accel.ACCELERATE = True
        c = split_train(hdr, super_packet, tap=shape.tap, prefix=prefix)
        assert type(c.body) is memoryview  # the C loop did cut it (numpy's is an array)
        accel.ACCELERATE = False
        other = split_train(hdr, super_packet, tap=shape.tap, prefix=prefix)
    finally:
        accel.ACCELERATE = saved
    assert c.packets() == other.packets()


@given(shapes, st.binary(max_size=3000), st.booleans())
def test_needs_csum_without_gso_is_completed(shape: pb.Shape, payload: bytes, is_udp: bool) -> None:
    raw = pb.udp(shape, payload) if is_udp else pb.tcp(shape, payload)
    off = 6 if is_udp else 16
    partial, l4 = seeded(raw, shape, off)
    (out,) = split(VnetHeader(VIRTIO_NET_HDR_F_NEEDS_CSUM, 0, 0, 0, l4, off), partial)
    pb.assert_checksums(out, shape)
    assert out[: l4 + off] == raw[: l4 + off] and out[l4 + off + 2 :] == raw[l4 + off + 2 :]


def test_plain_packets_pass_untouched() -> None:
    raw = pb.tcp(pb.Shape(), b"hello")
    assert split(VnetHeader(), raw)[0] is raw
    assert split(VnetHeader(), bytearray(raw)) == [raw]


def test_single_segment_super_packet_gets_full_checksums() -> None:
    raw = pb.tcp(pb.Shape(), b"x" * 100)
    partial, l4 = seeded(raw, pb.Shape(), 16)
    (seg,) = split(VnetHeader(1, VIRTIO_NET_HDR_GSO_TCPV4, 0, 1448, l4, 16), partial)
    assert seg == raw


def _refused(hdr: VnetHeader, raw: bytes, reason: str, **kw: bool | int) -> None:
    with pytest.raises(MalformedPacket) as info:
        split(hdr, raw, **kw)  # type: ignore[arg-type]
    assert info.value.reason == reason


def test_refusals() -> None:
    v4 = pb.tcp(pb.Shape(), b"x" * 3000)
    v6 = pb.tcp(pb.Shape(v6=True), b"x" * 3000)
    u4 = pb.udp(pb.Shape(), b"x" * 3000)
    _refused(VnetHeader(1, VIRTIO_NET_HDR_GSO_TCPV4, 0, 0, 20, 16), v4, "zero-gso-size")
    _refused(VnetHeader(1, 2, 0, 100, 20, 16), v4, "bad-gso-type")
    _refused(VnetHeader(1, VIRTIO_NET_HDR_GSO_UDP, 0, 100, 20, 6), u4, "bad-gso-type")
    _refused(VnetHeader(1, VIRTIO_NET_HDR_GSO_TCPV4, 0, 100, 40, 16), v6, "gso-proto-mismatch")
    _refused(VnetHeader(1, VIRTIO_NET_HDR_GSO_TCPV6, 0, 100, 20, 16), v4, "gso-proto-mismatch")
    _refused(VnetHeader(1, VIRTIO_NET_HDR_GSO_UDP_L4, 0, 100, 20, 6), v4, "gso-proto-mismatch")
    _refused(VnetHeader(1, VIRTIO_NET_HDR_GSO_TCPV4, 0, 1, 20, 16), v4, "too-many-segments",
             max_segments=100)  # fmt: skip
    _refused(VnetHeader(1, 0, 0, 0, 20, 4000), v4, "bad-csum-offset")
    frag = bytes(pb.IP(src=pb.SRC4, dst=pb.DST4, flags="MF") / pb.UDP() / pb.Raw(b"x" * 300))
    _refused(VnetHeader(1, VIRTIO_NET_HDR_GSO_UDP_L4, 0, 100, 20, 6), frag, "gso-fragment")
    _refused(VnetHeader(1, VIRTIO_NET_HDR_GSO_TCPV4, 0, 100, 20, 16), v4[:30], "truncated-tcp")


vnet_headers = st.builds(
    VnetHeader,
    st.integers(0, 15),
    st.sampled_from([0, 1, 3, 4, 5, 0x81, 0x84, 0x21, 0x41, 0x24, 0x45, 0x61, 0x7, 0xFF]),
    st.integers(0, 0xFFFF),
    st.integers(0, 0xFFFF) | st.integers(1, 64),
    st.integers(0, 0xFFFF) | st.integers(0, 80),
    st.integers(0, 0xFFFF) | st.sampled_from([6, 16]),
    st.just(0),
    st.just(0),
    st.just(0),
    st.integers(0, 0xFFFF) | st.integers(0, 80),
    st.integers(0, 0xFFFF) | st.integers(0, 100),
)


def _only_malformed(hdr: VnetHeader, raw: bytes, tap: bool) -> None:
    try:
        segs = split(hdr, raw, tap=tap, max_segments=4096)
    except MalformedPacket as err:
        assert err.reason in REASONS
    else:
        assert all(type(s) is bytes for s in segs)


@given(vnet_headers, st.binary(max_size=2000), st.booleans())
def test_fuzz_random_bytes_only_raise_malformed_packet(
    hdr: VnetHeader, raw: bytes, tap: bool
) -> None:
    _only_malformed(hdr, raw, tap)


@given(vnet_headers, shapes, st.integers(0, 1500), st.booleans(), st.data())
def test_fuzz_mutated_packets_only_raise_malformed_packet(
    hdr: VnetHeader, shape: pb.Shape, plen: int, is_udp: bool, data: st.DataObject
) -> None:
    raw = bytearray(pb.udp(shape, bytes(plen)) if is_udp else pb.tcp(shape, bytes(plen)))
    for _ in range(data.draw(st.integers(0, 4))):
        at = data.draw(st.integers(0, len(raw) - 1))
        raw[at] = data.draw(st.integers(0, 255))
    cut = data.draw(st.integers(0, len(raw)))
    _only_malformed(hdr, bytes(raw[:cut]), shape.tap)


# --- UDP tunnel (VXLAN) GSO ------------------------------------------------------------------


@given(
    st.booleans(),
    st.booleans(),
    st.booleans(),
    st.booleans(),
    st.integers(1, 6000),
    st.data(),
)
def test_vxlan_split(
    outer_v6: bool,
    inner_v6: bool,
    inner_udp: bool,
    outer_csum: bool,
    plen: int,
    data: st.DataObject,
) -> None:
    mss = data.draw(st.integers(max(64, -(-plen // 48)), 1400), label="mss")
    payload = os.urandom(plen)
    inner_shape = pb.Shape(v6=inner_v6)
    upper = (
        pb.UDP(sport=1, dport=2) / pb.Raw(payload)
        if inner_udp
        else pb.TCP(sport=3, dport=4, seq=99, flags="PA") / pb.Raw(payload)
    )
    inner = pb.vxlan_inner(inner_shape, upper)
    raw, outer_th, inner_nh = pb.vxlan(outer_v6, inner, outer_csum=outer_csum)
    inner_th = inner_nh + (40 if inner_v6 else 20)
    if inner_udp:
        kind, off = VIRTIO_NET_HDR_GSO_UDP_L4, 6
    else:
        kind = VIRTIO_NET_HDR_GSO_TCPV6 if inner_v6 else VIRTIO_NET_HDR_GSO_TCPV4
        off = 16
    kind |= VIRTIO_NET_HDR_GSO_UDP_TUNNEL_IPV6 if outer_v6 else VIRTIO_NET_HDR_GSO_UDP_TUNNEL_IPV4
    flags = VIRTIO_NET_HDR_F_NEEDS_CSUM
    if outer_csum:
        flags |= VIRTIO_NET_HDR_F_UDP_TUNNEL_CSUM
    hdr = VnetHeader(flags, kind, 0, mss, inner_th, off, 0, 0, 0, outer_th, inner_nh)
    segs = split(hdr, raw, tap=True)
    assert len(segs) == max(1, -(-plen // mss))
    got = b""
    for i, seg in enumerate(segs):
        outer = pb.Ether(seg)
        udp_layer = outer[pb.UDP]
        assert udp_layer.dport == 4789 and udp_layer.len == len(udp_layer)
        again = outer.copy()
        del again[pb.UDP].chksum
        if not outer_v6:
            assert outer[pb.IP].id == (300 + i) % 0x10000
            assert outer[pb.IP].len == len(outer[pb.IP])
            del again[pb.IP].chksum
        again = pb.Ether(bytes(again))
        if outer_csum:
            assert pb.same_checksum(udp_layer.chksum, again[pb.UDP].chksum)
        else:
            assert udp_layer.chksum == 0
        if not outer_v6:
            assert outer[pb.IP].chksum == again[pb.IP].chksum
        inner_raw = bytes(outer[pb.VXLAN].payload)
        inner_pkt = pb.assert_checksums(inner_raw, pb.Shape(v6=inner_v6, tap=True))
        l4 = inner_pkt[pb.UDP] if inner_udp else inner_pkt[pb.TCP]
        if not inner_udp:
            assert l4.seq == 99 + i * mss
            assert ("P" in str(l4.flags)) == (i == len(segs) - 1)
        got += bytes(l4.payload)
    assert got == payload


def test_vxlan_refusals() -> None:
    inner = pb.vxlan_inner(pb.Shape(), pb.TCP() / pb.Raw(b"x" * 3000))
    raw, outer_th, inner_nh = pb.vxlan(False, inner)
    ok = VnetHeader(1, 0x21, 0, 1000, inner_nh + 20, 16, 0, 0, 0, outer_th, inner_nh)
    assert len(split(ok, raw, tap=True)) == 3
    assert len(split(ok._replace(outer_th_offset=0, inner_nh_offset=0), raw, tap=True)) == 3
    _refused(ok._replace(gso_type=0x61), raw, "bad-tunnel", tap=True)
    _refused(ok._replace(gso_type=0x41), raw, "gso-proto-mismatch", tap=True)
    _refused(ok._replace(gso_type=0x23), raw, "bad-gso-type", tap=True)
    _refused(ok._replace(outer_th_offset=30), raw, "bad-tunnel-offsets", tap=True)
    _refused(ok._replace(inner_nh_offset=40), raw, "bad-tunnel-offsets", tap=True)
