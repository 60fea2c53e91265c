"""The pure models: the parser, the symmetric hash, Toeplitz (against the published vectors),
the queue arithmetic and the kernel default's predictable part. No kernel."""

from __future__ import annotations

import socket
import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st
from test_steer_packets import ether, ip_packets, ipv4, ipv6, l4_header

from mqtun import _uapi as u
from mqtun.errors import InvalidArgumentError
from mqtun.steer.model import (
    RSS_DEFAULT_KEY,
    ByCpuModel,
    FixedModel,
    KernelDefault,
    RssModel,
    SymmetricModel,
    kernel_queue,
    parse_flow,
    reciprocal_scale,
    rss_input,
    symmetric_hash,
    toeplitz_hash,
    toeplitz_table,
)

pytestmark = pytest.mark.sans_io  # pure: runs as any user, no namespace

A4, B4 = socket.inet_aton("198.18.0.1"), socket.inet_aton("198.18.0.2")
A6 = socket.inet_pton(socket.AF_INET6, "fd00:6d71::1")
B6 = socket.inet_pton(socket.AF_INET6, "fd00:6d71::2")

# Microsoft's RSS verification suite ("Verifying the RSS hash calculation"), default key:
# (source, source port, destination, destination port, IP-only hash, IP+TCP hash)
RSS_VECTORS = [
    ("66.9.149.187", 2794, "161.142.100.80", 1766, 0x323E8FC2, 0x51CCC178),
    ("199.92.111.2", 14230, "65.69.140.83", 4739, 0xD718262A, 0xC626B0EA),
    ("24.19.198.95", 12898, "12.22.207.184", 38024, 0xD2D0A5DE, 0x5C2B394A),
    ("38.27.205.30", 48228, "209.142.163.6", 2217, 0x82989176, 0xAFC7327F),
    ("153.39.163.191", 44251, "202.188.127.2", 1303, 0x5D1809C5, 0x10E828A2),
    ("3ffe:2501:200:1fff::7", 2794, "3ffe:2501:200:3::1", 1766, 0x2CC18CD5, 0x40207D3D),
    ("3ffe:501:8::260:97ff:fe40:efab", 14230, "ff02::1", 4739, 0x0F0C461C, 0xDDE51BBF),
    ("3ffe:1900:4545:3:200:f8ff:fe21:67cf", 44251, "fe80::200:f8ff:fe21:67cf", 38024,
     0x4B61E985, 0x02D1FEEF),
]


def _addr(text: str) -> bytes:
    return socket.inet_pton(socket.AF_INET6 if ":" in text else socket.AF_INET, text)


@pytest.mark.parametrize(("src", "sport", "dst", "dport", "ip_hash", "tcp_hash"), RSS_VECTORS)
def test_toeplitz_matches_the_published_vectors(src, sport, dst, dport, ip_hash, tcp_hash):  # type: ignore[no-untyped-def]
    data = _addr(src) + _addr(dst)
    assert toeplitz_hash(RSS_DEFAULT_KEY, data) == ip_hash
    assert toeplitz_hash(RSS_DEFAULT_KEY, data + struct.pack("!HH", sport, dport)) == tcp_hash
    # and through the packet parser + the per-byte table the program uses
    if ":" in src:
        pkt = ipv6(_addr(src), _addr(dst), [], u.IPPROTO_TCP, l4_header(6, sport, dport))
    else:
        pkt = ipv4(_addr(src), _addr(dst), u.IPPROTO_TCP, l4_header(6, sport, dport))
    assert RssModel(table=[0]).hash(pkt) == tcp_hash
    assert RssModel(table=[0], l4=False).hash(pkt) == ip_hash


@given(key=st.binary(min_size=40, max_size=40), data=st.binary(max_size=36))
def test_the_per_byte_table_is_the_bitwise_hash(key: bytes, data: bytes) -> None:
    rows = toeplitz_table(key)
    h = 0
    for p, b in enumerate(data):
        h ^= rows[p][b]
    assert h == toeplitz_hash(key, data)


def test_toeplitz_key_length_is_checked() -> None:
    with pytest.raises(InvalidArgumentError):
        toeplitz_hash(bytes(10), bytes(8))
    with pytest.raises(InvalidArgumentError):
        RssModel(bytes(39), [0])
    with pytest.raises(InvalidArgumentError, match="power of two"):
        RssModel(RSS_DEFAULT_KEY, [0, 1, 2])


def test_parse_tun_and_tap_views_of_the_same_packet() -> None:
    pkt = ipv4(A4, B4, u.IPPROTO_UDP, l4_header(17, 4000, 53))
    flow = parse_flow(pkt)
    assert flow is not None and (flow.family, flow.src, flow.dst, flow.ports) == (4, A4, B4,
                                                                                (4000, 53))
    for tags in ([], [(u.ETH_P_8021Q, 5)], [(u.ETH_P_8021AD, 1), (u.ETH_P_8021Q, 2)]):
        assert parse_flow(ether(pkt, u.ETH_P_IP, tags), tap=True) == flow
    # three tags are more than the programs look through
    three = [(u.ETH_P_8021Q, 1)] * 3
    assert parse_flow(ether(pkt, u.ETH_P_IP, three), tap=True) is None
    assert parse_flow(ether(b"\0" * 28, u.ETH_P_ARP), tap=True) is None
    assert parse_flow(b"\x10" + bytes(40)) is None


@pytest.mark.parametrize(
    ("pkt", "ports"),
    [
        (ipv4(A4, B4, 6, l4_header(6, 1, 2)), (1, 2)),
        (ipv4(A4, B4, 6, l4_header(6, 1, 2), ihl=6), (1, 2)),
        (ipv4(A4, B4, 6, l4_header(6, 1, 2), ihl=4), None),
        (ipv4(A4, B4, 6, l4_header(6, 1, 2), frag=0x2000), None),  # first fragment
        (ipv4(A4, B4, 6, l4_header(6, 1, 2), frag=0x0005), None),  # later fragment
        (ipv4(A4, B4, 6, l4_header(6, 1, 2), frag=0x4000), (1, 2)),  # DF is not a fragment
        (ipv4(A4, B4, 1, l4_header(1, 1, 2)), None),  # ICMP: addresses only
        (ipv4(A4, B4, 17, l4_header(17, 1, 2))[:22], None),  # ports cut off
        (ipv6(A6, B6, [], 17, l4_header(17, 7, 8)), (7, 8)),
        (ipv6(A6, B6, [0, 43, 60], 17, l4_header(17, 7, 8), [0, 1, 2]), (7, 8)),
        (ipv6(A6, B6, [60] * 6, 6, l4_header(6, 7, 8)), (7, 8)),
        (ipv6(A6, B6, [60] * 7, 6, l4_header(6, 7, 8)), None),  # more than 6 headers
        (ipv6(A6, B6, [44], 6, l4_header(6, 7, 8)), None),  # fragment header
        (ipv6(A6, B6, [0], 6, l4_header(6, 7, 8))[:41], None),  # extension header cut
    ],
)
def test_parse_ports_rules(pkt: bytes, ports: tuple[int, int] | None) -> None:
    flow = parse_flow(pkt)
    assert flow is not None and flow.ports == ports


@given(pkt=ip_packets())
def test_the_symmetric_hash_is_symmetric(pkt: bytes) -> None:
    flow = parse_flow(pkt)
    if flow is None:
        assert symmetric_hash(pkt) == 0
        return
    rev = flow.reversed()
    sp, dp = rev.ports or (0, 0)
    l4 = l4_header(flow.proto, sp, dp) if rev.ports else b""
    if flow.family == 4:
        back = ipv4(rev.src, rev.dst, flow.proto if rev.ports else 1, l4)
    else:
        back = ipv6(rev.src, rev.dst, [], flow.proto if rev.ports else 59, l4)
    assert symmetric_hash(back) == symmetric_hash(pkt)
    assert symmetric_hash(ether(pkt, u.ETH_P_IP if flow.family == 4 else u.ETH_P_IPV6),
                          tap=True) == symmetric_hash(pkt)


def test_the_symmetric_hash_separates_flows() -> None:
    values = {symmetric_hash(ipv4(A4, B4, 17, l4_header(17, sp, 53))) for sp in range(2000)}
    assert len(values) == 2000
    spread = [0] * 4
    for sp in range(4000):
        spread[SymmetricModel().queue_for(ipv4(A4, B4, 6, l4_header(6, sp, 80)), 4)] += 1
    assert max(spread) / min(spread) < 1.15


def test_queue_arithmetic_is_the_kernels() -> None:
    assert kernel_queue(0x12345, 4) == 0x2345 % 4  # (u16) first, then modulo
    assert kernel_queue(0xFFFFFFFF, 3) == 0xFFFF % 3
    assert reciprocal_scale(0xFFFFFFFF, 4) == 3 and reciprocal_scale(0x40000000, 4) == 1
    assert FixedModel(5).queue_for(b"", 4) == 1
    assert ByCpuModel().queue_for(b"", 4, cpu=6) == 2
    assert ByCpuModel([3, 1]).queue_for(b"", 4, cpu=3) == 1
    with pytest.raises(InvalidArgumentError):
        ByCpuModel().ret(b"")
    with pytest.raises(InvalidArgumentError):
        kernel_queue(1, 0)


def test_rss_model_indexes_the_table_by_the_low_bits() -> None:
    pkt = ipv4(A4, B4, 6, l4_header(6, 2794, 1766))
    model = RssModel(RSS_DEFAULT_KEY, list(range(8)))
    h = model.hash(pkt)
    assert h is not None and model.ret(pkt) == h & 7
    assert rss_input(parse_flow(pkt), l4=True)[-4:] == struct.pack("!HH", 2794, 1766)  # type: ignore[arg-type]
    assert RssModel(table=[9]).ret(b"\x20" + bytes(30)) == 0  # not a flow


def test_kernel_default_classes_are_direction_free_and_tcp_udp_only() -> None:
    kd = KernelDefault()
    there = ipv4(A4, B4, 17, l4_header(17, 1000, 53))
    back = ipv4(B4, A4, 17, l4_header(17, 53, 1000))
    other = ipv4(A4, B4, 6, l4_header(6, 1000, 53))
    assert kd.flow_class(there) == kd.flow_class(back) != kd.flow_class(other)
    assert kd.flow_class(ipv4(A4, B4, 1, b"\x08" + bytes(7))) is None
    assert kd.queue_for_hash(0x80000000, 2) == 1


@given(st.binary(max_size=200), st.booleans(), st.integers(1, 256), st.integers(0, 1023),
       st.lists(st.integers(0, 0xFFFF), min_size=1, max_size=8))
def test_fuzz_models_take_any_bytes(raw: bytes, tap: bool, numqueues: int, cpu: int,
                                    table: list[int]) -> None:
    """Every model answers a queue in range for any packet, well-formed or not; none raises."""
    size = 1 << (len(table).bit_length() - 1)
    models = [SymmetricModel(tap), RssModel(RSS_DEFAULT_KEY, table[:size], tap=tap),
              RssModel(RSS_DEFAULT_KEY, table[:size], l4=False, tap=tap),
              ByCpuModel(), ByCpuModel(table), FixedModel(table[0])]
    for m in models:
        assert 0 <= m.queue_for(raw, numqueues, cpu) < numqueues
    flow = parse_flow(raw, tap)
    if flow is not None:
        assert flow.reversed().reversed() == flow
        assert symmetric_hash(raw, tap) == SymmetricModel(tap).ret(raw)
    cls = KernelDefault(tap).flow_class(raw)
    assert cls is None or flow is not None
