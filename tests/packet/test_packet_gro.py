"""GRO coalesce: round trips through split, the kernel's joining rules, order, and fuzzing."""

from __future__ import annotations

import os
import random
from collections.abc import Sequence
from typing import Any

import packet_builders as pb
import pytest
from hypothesis import given
from hypothesis import strategies as st

from mqtun._uapi import (
    VIRTIO_NET_HDR_F_NEEDS_CSUM,
    VIRTIO_NET_HDR_GSO_ECN,
    VIRTIO_NET_HDR_GSO_TCPV4,
    VIRTIO_NET_HDR_GSO_TCPV6,
    VIRTIO_NET_HDR_GSO_UDP_L4,
)
from mqtun.packet import (
    ZERO_HEADER,
    Buffer,
    VnetHeader,
    coalesce,
    complete_checksum,
    offload_checksum,
    parse,
    split,
)
from mqtun.packet import gro as gro_module

pytestmark = pytest.mark.usefixtures("both_sums")  # numpy and pure-Python sums

plain_shapes = st.builds(pb.Shape, v6=st.booleans(), tap=st.booleans(), vlans=st.integers(0, 2))


def tcp_stream(
    shape: pb.Shape,
    sizes: Sequence[int],
    *,
    seq0: int = 5000,
    id0: int = 100,
    flags: Sequence[str] | None = None,
    **kw: Any,
) -> list[bytes]:
    """Consecutive segments of one TCP flow, each built by scapy."""
    out, seq = [], seq0
    for i, size in enumerate(sizes):
        f = flags[i] if flags else "A"
        out.append(pb.tcp(shape, os.urandom(size), seq=seq % 2**32, ip_id=(id0 + i) % 0x10000,
                          flags=f, **kw))  # fmt: skip
        seq += size
    return out


def udp_stream(shape: pb.Shape, sizes: Sequence[int], *, id0: int = 7) -> list[bytes]:
    return [pb.udp(shape, os.urandom(s), ip_id=(id0 + i) % 0x10000) for i, s in enumerate(sizes)]


def expand(items: Sequence[tuple[VnetHeader, Buffer]], tap: bool) -> list[bytes]:
    """What the kernel would put on the wire for coalesce's output: split what was joined."""
    wire: list[bytes] = []
    for hdr, data in items:
        wire.extend(split(hdr, data, tap=tap) if hdr.is_gso else [bytes(data)])
    return wire


def assert_as_general_path(out: object, packets: Sequence[Buffer], **kw: Any) -> None:
    """The fast paths (per packet, numpy runs, the C coalesce) join exactly what the general
    path joins: the same headers, bytes, and pass-through objects."""
    saved = gro_module._FAST_PATH
    try:
        gro_module._FAST_PATH = False
        assert coalesce(packets, **kw) == out
    finally:
        gro_module._FAST_PATH = saved


def sizes_for(count: int, mss: int, last: int) -> list[int]:
    return [mss] * (count - 1) + [last]


@given(plain_shapes, st.integers(2, 30), st.integers(1, 1448), st.data(), st.booleans())
def test_tcp_round_trip(
    shape: pb.Shape, count: int, mss: int, data: st.DataObject, psh: bool
) -> None:
    last = data.draw(st.integers(1, mss), label="last")
    cwr = data.draw(st.booleans(), label="cwr")
    flags = ["A"] * count
    if cwr:
        flags[0] = "AC"
    if psh:
        flags[-1] += "P"
    segs = tcp_stream(shape, sizes_for(count, mss, last), flags=flags,
                      seq0=data.draw(st.integers(0, 2**32 - 1)))  # fmt: skip
    out = coalesce(segs, tap=shape.tap)
    assert len(out) == 1
    hdr, super_packet = out[0]
    p = parse(segs[0], tap=shape.tap)
    kind = VIRTIO_NET_HDR_GSO_TCPV6 if shape.v6 else VIRTIO_NET_HDR_GSO_TCPV4
    if cwr:
        kind |= VIRTIO_NET_HDR_GSO_ECN
    assert hdr == VnetHeader(VIRTIO_NET_HDR_F_NEEDS_CSUM, kind, p.payload_off, mss, p.l4_off, 16)
    assert len(super_packet) == p.payload_off + (count - 1) * mss + last
    assert split(hdr, super_packet, tap=shape.tap) == segs
    # the checksum field holds the pseudo-header sum: completing it gives scapy's checksum
    done = bytearray(super_packet)
    complete_checksum(done, hdr.csum_start, hdr.csum_offset)
    pb.assert_checksums(bytes(done), shape)


@given(plain_shapes, st.integers(2, 30), st.integers(1, 1400), st.data())
def test_udp_round_trip(shape: pb.Shape, count: int, mss: int, data: st.DataObject) -> None:
    last = data.draw(st.integers(1, mss), label="last")
    segs = udp_stream(shape, sizes_for(count, mss, last))
    (hdr, super_packet), = coalesce(segs, tap=shape.tap)  # fmt: skip
    assert hdr.gso_type == VIRTIO_NET_HDR_GSO_UDP_L4 and hdr.gso_size == mss
    assert hdr.csum_offset == 6 and hdr.flags == VIRTIO_NET_HDR_F_NEEDS_CSUM
    assert split(hdr, super_packet, tap=shape.tap) == segs
    done = bytearray(super_packet)
    complete_checksum(done, hdr.csum_start, hdr.csum_offset)
    pb.assert_checksums(bytes(done), shape)
    assert coalesce(segs, tap=shape.tap, udp=False) == [(ZERO_HEADER, s) for s in segs]


def test_max_size_cuts_groups() -> None:
    segs = tcp_stream(pb.Shape(), [1000] * 50)
    out = coalesce(segs, max_size=20 + 32 + 10 * 1000)
    assert [h.is_gso for h, _ in out] == [True] * 5
    assert expand(out, False) == segs
    big = tcp_stream(pb.Shape(), [1448] * 50)
    out = coalesce(big)
    assert [len(d) for _, d in out] == [20 + 32 + 45 * 1448, 20 + 32 + 5 * 1448]
    assert expand(out, False) == big


def _join_count(segs: list[bytes], **kw: object) -> list[int]:
    """How many input packets each output item holds."""
    counts = []
    for hdr, data in coalesce(segs, **kw):  # type: ignore[arg-type]
        counts.append(len(split(hdr, data, tap=bool(kw.get("tap")))) if hdr.is_gso else 1)
    return counts


@pytest.mark.parametrize(
    ("flags", "sizes", "want"),
    [
        (["A", "AP", "A"], [100, 100, 100], [2, 1]),  # PSH ends a group
        (["A", "A", "A"], [100, 50, 100], [2, 1]),  # a short segment ends a group
        (["A", "A", "A"], [50, 100, 100], [1, 2]),  # no larger segment after a smaller one
        (["AC", "A", "A"], [100, 100, 100], [3]),  # CWR on the first only is fine
        (["A", "AC", "A"], [100, 100, 100], [1, 2]),  # CWR later starts over
        (["A", "AF", "A"], [100, 100, 100], [1, 1, 1]),  # FIN never joins
        (["A", "AU", "A"], [100, 100, 100], [1, 1, 1]),  # URG never joins
        (["A", "R", "A"], [100, 100, 100], [1, 1, 1]),  # RST never joins
        (["S", "A", "A"], [100, 100, 100], [1, 2]),  # SYN never joins
        (["", "", ""], [100, 100, 100], [1, 1, 1]),  # no ACK: not a GRO candidate
        (["AE", "AE", "AE"], [100, 100, 100], [3]),  # ECE is just another equal flag
        (["AE", "A", "A"], [100, 100, 100], [1, 2]),
    ],
)
def test_tcp_flag_rules(flags: list[str], sizes: list[int], want: list[int]) -> None:
    segs = tcp_stream(pb.Shape(), sizes, flags=flags)
    assert _join_count(segs) == want
    assert expand(coalesce(segs), False) == segs


def test_tcp_field_rules() -> None:
    base = tcp_stream(pb.Shape(), [100] * 3)
    assert _join_count(base) == [3]
    variants = {
        "ack": tcp_stream(pb.Shape(), [100], seq0=5100, id0=101, ack=8),
        "window": tcp_stream(pb.Shape(), [100], seq0=5100, id0=101, window=501),
        "options": tcp_stream(pb.Shape(), [100], seq0=5100, id0=101, timestamps=False),
        "tos": tcp_stream(pb.Shape(), [100], seq0=5100, id0=101, tos=4),
        "seq gap": tcp_stream(pb.Shape(), [100], seq0=5101, id0=101),
        "id jump": tcp_stream(pb.Shape(), [100], seq0=5100, id0=105),
    }
    for what, (pkt,) in variants.items():
        segs = [base[0], pkt, base[2]]
        assert _join_count(segs)[0] == 1, what
        assert expand(coalesce(segs), False) == segs


def test_fixed_ip_id_with_df_joins() -> None:
    segs = [pb.tcp(pb.Shape(), b"x" * 100, seq=5000 + 100 * i, ip_id=7) for i in range(4)]
    (hdr, data), = coalesce(segs)  # fmt: skip
    assert hdr.is_gso
    resplit = split(hdr, data)
    assert [pb.IP(s).id for s in resplit] == [7, 8, 9, 10]  # the kernel counts them up again
    nodf = [pb.tcp(pb.Shape(), b"x" * 100, seq=5000 + 100 * i, ip_id=7, df=False)
            for i in range(4)]  # fmt: skip
    assert _join_count(nodf) == [1, 1, 1, 1]


def test_udp_datagrams_with_df_join_whatever_their_ids() -> None:
    """Unconnected sockets number datagrams from one counter per destination host: 16 flows
    give each flow ids 16 apart. With DF set the id means nothing (RFC 6864) and they join;
    the kernel's segmentation then numbers them up from the first, all else as sent."""
    tap_shapes = [pb.Shape(), pb.Shape(tap=True, vlans=1)]
    for shape in tap_shapes:
        sent = [pb.udp(shape, os.urandom(36), ip_id=(0xFFE0 + 16 * i) % 0x10000)
                for i in range(5)]  # fmt: skip
        (hdr, data), = coalesce(sent, tap=shape.tap)  # fmt: skip
        assert hdr.gso_type == VIRTIO_NET_HDR_GSO_UDP_L4
        got = split(hdr, data, tap=shape.tap)
        assert [pb.dissect(g, shape)[pb.IP].id for g in got] == [
            (0xFFE0 + i) % 0x10000 for i in range(5)]  # fmt: skip
        for g, s_ in zip(got, sent, strict=True):
            pb.assert_checksums(g, shape)
            a, b = pb.dissect(g, shape), pb.dissect(s_, shape)
            b[pb.IP].id, b[pb.IP].chksum = a[pb.IP].id, a[pb.IP].chksum
            assert bytes(a) == bytes(b)
        nodf = [pb.udp(shape, os.urandom(36), ip_id=16 * i, df=False) for i in range(3)]
        assert _join_count(nodf, tap=shape.tap) == [1, 1, 1]  # may be fragmented: ids matter
        counting = [pb.udp(shape, os.urandom(36), ip_id=9 + i, df=False) for i in range(3)]
        assert _join_count(counting, tap=shape.tap) == [3]
        assert_as_general_path(coalesce(sent, tap=shape.tap), sent, tap=shape.tap)


def test_bad_checksum_is_not_laundered() -> None:
    segs = tcp_stream(pb.Shape(), [200] * 5)
    bad = bytearray(segs[2])
    bad[-1] ^= 0x40
    segs[2] = bytes(bad)
    out = coalesce(segs)
    assert [len(split(h, d)) if h.is_gso else 1 for h, d in out] == [2, 1, 2]
    assert out[1] == (ZERO_HEADER, segs[2])  # passed through, untouched
    assert _join_count(segs, verify=False) == [5]
    first_bad = [bytes(bad), *tcp_stream(pb.Shape(), [200] * 3, seq0=5200, id0=101)]
    assert _join_count(first_bad) == [1, 3]


def test_ip_checksum_is_verified_too() -> None:
    segs = tcp_stream(pb.Shape(), [200] * 3)
    bad = bytearray(segs[1])
    bad[8] -= 1  # TTL changed, IPv4 header checksum now wrong
    segs[1] = bytes(bad)
    assert _join_count(segs) == [1, 1, 1]


def test_not_candidates_pass_through() -> None:
    opts = [pb.tcp(pb.Shape(ip_options=True), b"x" * 100, seq=5000 + 100 * i) for i in range(3)]
    ext = [pb.tcp(pb.Shape(v6=True, ip_options=True), b"x" * 100, seq=5000 + 100 * i)
           for i in range(3)]  # fmt: skip
    zero_csum = []
    for i in range(3):
        p = pb.IP(src=pb.SRC4, dst=pb.DST4, id=i) / pb.UDP(sport=1, dport=2, chksum=0)
        zero_csum.append(bytes(p / pb.Raw(b"y" * 100)))
    empty = tcp_stream(pb.Shape(), [0, 0, 0])
    for batch in (opts, ext, zero_csum, empty):
        assert coalesce(batch) == [(ZERO_HEADER, p) for p in batch]
    arp = bytes.fromhex("ffffffffffff020000000001" "0806") + bytes(28)
    odd = [arp, b"", b"\x45"]
    assert coalesce(odd, tap=True) == [(ZERO_HEADER, p) for p in odd]


def test_tap_frames_of_other_macs_stay_apart() -> None:
    shape = pb.Shape(tap=True)
    segs = tcp_stream(shape, [100] * 4)
    other = bytearray(segs[2])
    other[0:6] = bytes.fromhex("020000000099")
    segs[2] = bytes(other)
    assert _join_count(segs, tap=True) == [2, 1, 1]


def test_inputs_may_be_views() -> None:
    segs = tcp_stream(pb.Shape(), [300] * 4)
    views = [memoryview(bytearray(s)) for s in segs]
    assert coalesce(views) == coalesce(segs)


# --- order: flows interleaved with packets that cannot join ------------------------------------


def test_interleaved_flows_are_each_joined() -> None:
    a = tcp_stream(pb.Shape(), [500] * 3)
    b = [_with_port(s, pb.Shape(), 999) for s in tcp_stream(pb.Shape(v6=False), [400] * 3)]
    batch = [a[0], b[0], a[1], b[1], a[2], b[2]]
    out = coalesce(batch)
    assert [len(split(h, d)) for h, d in out] == [3, 3]
    assert expand(out, False) == a + b


def test_many_flows_in_one_long_batch_are_each_joined() -> None:
    """More flows and packets than a drain usually holds (the C coalesce's flow table grows
    with the batch): 90 UDP flows of 4 datagrams and a TCP run, interleaved."""
    shape = pb.Shape()
    flows = [[_with_udp_port(p, shape, 2000 + k) for p in udp_stream(shape, [60] * 4, id0=k * 9)]
             for k in range(90)]  # fmt: skip
    batch = [f[i] for i in range(4) for f in flows] + tcp_stream(shape, [700] * 20)
    out = coalesce(batch)
    assert [len(split(h, d)) if h.is_gso else 1 for h, d in out] == [4] * 90 + [20]
    assert expand(out, False) == [p for f in flows for p in f] + batch[360:]
    assert_as_general_path(out, batch)


def test_the_c_coalesce_runs_in_the_c_round(
    both_sums: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """In the "c" round gro.coalesce is the C one (the general-path comparisons above then
    test it); in the others, the Python code."""
    from mqtun.packet import accel

    calls: list[int] = []
    real = accel.coalesce

    def counted() -> Any:
        found = real()
        calls.append(found is not None)
        return found

    monkeypatch.setattr(accel, "coalesce", counted)
    coalesce(tcp_stream(pb.Shape(), [300] * 3))
    assert calls == [both_sums == "c"]


def _with_udp_port(raw: bytes, shape: pb.Shape, port: int) -> bytes:
    pkt = pb.dissect(raw, shape)
    pkt[pb.UDP].sport = port
    del pkt[pb.UDP].chksum
    return bytes(pkt)


def _flow_of(raw: bytes, tap: bool) -> object:
    try:
        p = parse(raw, tap=tap)
    except Exception:
        return raw
    return (p.src, p.dst, p.proto, p.sport, p.dport) if p.l4_len else raw


@given(st.booleans(), st.integers(0, 2**32 - 1), st.data())
def test_mixed_batches_keep_every_flows_order(tap: bool, seed: int, data: st.DataObject) -> None:
    rng = random.Random(seed)
    flows: list[list[bytes]] = []
    for k in range(data.draw(st.integers(1, 4), label="flows")):
        shape = pb.Shape(v6=rng.random() < 0.5, tap=tap)
        n = rng.randint(1, 8)
        mss = rng.randint(1, 600)
        if rng.random() < 0.3:
            dgrams = udp_stream(shape, sizes_for(n, mss, rng.randint(1, mss)), id0=k * 50)
            flows.append([_with_udp_port(d, shape, 3000 + k) for d in dgrams])
        else:
            flags = [rng.choice(["A", "A", "A", "AP", "AF", "AC"]) for _ in range(n)]
            segs = tcp_stream(shape, sizes_for(n, mss, rng.randint(1, mss)), flags=flags,
                              id0=k * 50)  # fmt: skip
            flows.append([_with_port(s, shape, 1000 + k) for s in segs])
    junk = [pb.tcp(pb.Shape(tap=tap), b"", flags="S"), b"\x00" * 30, os.urandom(60)]
    batch: list[bytes] = []
    queues = [list(f) for f in flows] + [[j] for j in junk]
    while any(queues):
        q = rng.choice([q for q in queues if q])
        batch.append(q.pop(0))
    out = coalesce(batch, tap=tap)
    assert len(out) <= len(batch)
    for hdr, data_ in out:
        if not hdr.is_gso:
            assert hdr == ZERO_HEADER and data_ in batch
    wire = expand(out, tap)
    assert sorted(wire) == sorted(batch)  # every packet back, byte for byte
    for flow in {_flow_of(p, tap) for p in batch}:
        assert [p for p in wire if _flow_of(p, tap) == flow] == [
            p for p in batch if _flow_of(p, tap) == flow
        ]
    assert_as_general_path(out, batch, tap=tap)


def _with_port(raw: bytes, shape: pb.Shape, port: int) -> bytes:
    """The same TCP segment from another source port (a distinct flow), checksum redone."""
    pkt = pb.dissect(raw, shape)
    pkt[pb.TCP].sport = port
    del pkt[pb.TCP].chksum
    return bytes(pkt)


# --- fuzz --------------------------------------------------------------------------------------


@given(st.lists(st.binary(max_size=200), max_size=12), st.booleans(), st.booleans())
def test_fuzz_random_batches_never_raise(batch: list[bytes], tap: bool, udp: bool) -> None:
    out = coalesce(batch, tap=tap, udp=udp)
    assert sorted(expand(out, tap)) == sorted(batch)
    assert_as_general_path(out, batch, tap=tap, udp=udp)


@given(plain_shapes, st.integers(2, 8), st.integers(1, 300), st.data())
def test_fuzz_mutated_streams_never_raise(
    shape: pb.Shape, count: int, mss: int, data: st.DataObject
) -> None:
    segs = [bytearray(s) for s in tcp_stream(shape, [mss] * count)]
    for _ in range(data.draw(st.integers(1, 6))):
        seg = data.draw(st.sampled_from(segs))
        at = data.draw(st.integers(0, len(seg) - 1))
        seg[at] = data.draw(st.integers(0, 255))
    batch = [bytes(s[: data.draw(st.integers(0, len(s)))]) if data.draw(st.booleans()) else bytes(s)
             for s in segs]  # fmt: skip
    verify = data.draw(st.booleans())
    out = coalesce(batch, tap=shape.tap, verify=verify)
    wire = expand(out, shape.tap)
    assert len(wire) == len(batch)
    assert_as_general_path(out, batch, tap=shape.tap, verify=verify)


@given(plain_shapes, st.binary(max_size=1500), st.booleans())
def test_offload_checksum_is_undone_by_complete(
    shape: pb.Shape, payload: bytes, is_udp: bool
) -> None:
    raw = pb.udp(shape, payload) if is_udp else pb.tcp(shape, payload)
    hdr, partial = offload_checksum(raw, tap=shape.tap)
    assert hdr.needs_csum and not hdr.is_gso
    (completed,) = split(hdr, partial, tap=shape.tap)
    pb.assert_checksums(completed, shape)
    done = bytearray(partial)
    complete_checksum(done, hdr.csum_start, hdr.csum_offset)
    pb.assert_checksums(bytes(done), shape)
    icmp = bytes(pb.IP(src=pb.SRC4, dst=pb.DST4, proto=1) / pb.Raw(b"ping"))
    assert offload_checksum(icmp) == (ZERO_HEADER, icmp)


def _perturb(raw: bytes, shape: pb.Shape, how: str) -> bytes:
    """One packet of a long run changed so that the run must stop there (or, PSH, just after)."""
    pkt = pb.dissect(raw, shape)
    if how == "corrupt":  # a payload byte changed, the checksum left: verification must catch it
        b = bytearray(raw)
        b[-1] ^= 0x5A
        return bytes(b)
    if how == "seq" and pb.TCP in pkt:
        pkt[pb.TCP].seq += 1
    elif how == "psh" and pb.TCP in pkt:
        pkt[pb.TCP].flags = "AP"
    elif how == "window" and pb.TCP in pkt:
        pkt[pb.TCP].window += 1
    elif how == "id" and pb.IP in pkt:
        pkt[pb.IP].id = (pkt[pb.IP].id + 7) % 0x10000
    elif how == "ttl":
        if pb.IP in pkt:
            pkt[pb.IP].ttl -= 1
        else:
            pkt[pb.IPv6].hlim -= 1
    elif how == "zero-udp-csum" and pb.UDP in pkt:
        pkt[pb.UDP].chksum = 0
        return bytes(pkt)
    return bytes(pb.recomputed(pkt))


@pytest.mark.parametrize(
    "how", ["corrupt", "seq", "psh", "window", "id", "ttl", "zero-udp-csum", "none"]
)
@given(st.booleans(), st.booleans(), st.booleans(), st.integers(10, 30), st.data())
def test_long_runs_stop_where_the_general_path_stops(
    how: str, tap: bool, v6: bool, udp: bool, count: int, data: st.DataObject
) -> None:
    """The vectorized run (numpy) and the per-packet fast path join exactly what the general
    path joins, wherever in a long run a packet breaks it."""
    shape = pb.Shape(v6=v6, tap=tap)
    mss = data.draw(st.sampled_from([100, 501, 1000, 1448]), label="mss")
    fixed_ids = data.draw(st.booleans(), label="fixed_ids")  # every id the same
    df = data.draw(st.booleans(), label="df")  # fixed ids join only with DF set
    verify = data.draw(st.booleans(), label="verify")
    if udp:
        segs = [pb.udp(shape, os.urandom(mss), ip_id=7 if fixed_ids else 7 + i, df=df)
                for i in range(count)]  # fmt: skip
    else:
        segs = [pb.tcp(shape, os.urandom(mss), seq=(2**32 - 3000 + i * mss) % 2**32, df=df,
                       ip_id=0xFFF0 if fixed_ids else (0xFFF0 + i) % 0x10000)
                for i in range(count)]  # fmt: skip
    at = data.draw(st.integers(0, count - 1), label="at")
    segs[at] = _perturb(segs[at], shape, how)
    max_size = data.draw(st.sampled_from([0xFFFF, 20 + 40 + 8 + 20 * mss]), label="max_size")
    out = coalesce(segs, tap=tap, max_size=max_size, verify=verify)
    # unverified, a corrupted packet is joined (and re-summed); fixed ids come back counting
    # a UDP datagram with DF joins whatever its id, and comes back numbered on
    any_id = udp and df and not v6
    if (verify or how != "corrupt") and not fixed_ids and not (any_id and how == "id"):
        assert expand(out, tap) == segs  # a packet that is not joined passes as it is
    assert_as_general_path(out, segs, tap=tap, max_size=max_size, verify=verify)
