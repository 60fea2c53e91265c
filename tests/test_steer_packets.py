"""Packet generators for the steering tests (hypothesis strategies and a seeded fuzzer).

They build raw bytes directly, covering what the programs must get right: IPv4 with options,
a bad header length and fragments; IPv6 with chains of extension headers (more than the
programs walk) and fragment headers; TCP, UDP and other protocols; 0-3 VLAN tags of both TPIDs
on TAP; non-IP frames; and every packet cut short at a random length. The tests at the end
check the generators against scapy, an independent decoder.
"""

from __future__ import annotations

import random
import socket
import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mqtun import _uapi as u
from mqtun.steer.model import parse_flow

pytestmark = pytest.mark.sans_io  # pure: runs as any user, no namespace

EXT_TYPES = (u.IPPROTO_HOPOPTS, u.IPPROTO_ROUTING, u.IPPROTO_DSTOPTS, u.IPPROTO_FRAGMENT)
L4_TYPES = (u.IPPROTO_TCP, u.IPPROTO_UDP, u.IPPROTO_ICMP, u.IPPROTO_ICMPV6, 132, 50)


def ipv4(src: bytes, dst: bytes, proto: int, l4: bytes, *, ihl: int = 5, frag: int = 0) -> bytes:
    options = bytes(max(ihl - 5, 0) * 4)
    total = 20 + len(options) + len(l4)
    head = struct.pack("!BBHHHBBH4s4s", 0x40 | (ihl & 0x0F), 0, total & 0xFFFF, 1, frag, 64,
                       proto, 0, src, dst)
    return head + options + l4


def ipv6(src: bytes, dst: bytes, chain: list[int], proto: int, l4: bytes,
         ext_lens: list[int] | None = None) -> bytes:
    """`chain`: extension header types in order, then `proto`."""
    ext_lens = ext_lens or [0] * len(chain)
    body = b""
    types = [*chain, proto]
    for i, _ext in enumerate(chain):
        hdrlen = ext_lens[i]
        body += bytes([types[i + 1], hdrlen]) + bytes(6 + 8 * hdrlen)
    body += l4
    first = chain[0] if chain else proto
    return struct.pack("!IHBB16s16s", 0x60000000, len(body), first, 64, src, dst) + body


def l4_header(proto: int, sport: int, dport: int, payload: bytes = b"") -> bytes:
    if proto == u.IPPROTO_TCP:
        return struct.pack("!HHIIBBHHH", sport, dport, 1, 0, 0x50, 0x02, 8192, 0, 0) + payload
    if proto == u.IPPROTO_UDP:
        return struct.pack("!HHHH", sport, dport, 8 + len(payload), 0) + payload
    return struct.pack("!HH", sport, dport) + bytes(4) + payload


def ether(payload: bytes, ethertype: int, tags: list[tuple[int, int]] = ()) -> bytes:  # type: ignore[assignment]
    frame = bytes.fromhex("02006d710002" "02006d710001")
    for tpid, vid in tags:
        frame += struct.pack("!HH", tpid, vid)
    return frame + struct.pack("!H", ethertype) + payload


# ---- hypothesis ------------------------------------------------------------------------------

addr4 = st.binary(min_size=4, max_size=4)
addr6 = st.binary(min_size=16, max_size=16)
port = st.integers(0, 0xFFFF)


@st.composite
def ip_packets(draw: st.DrawFn) -> bytes:
    kind = draw(st.sampled_from(["v4", "v4", "v6", "v6", "garbage"]))
    proto = draw(st.sampled_from(L4_TYPES))
    l4 = l4_header(proto, draw(port), draw(port), draw(st.binary(max_size=8)))
    if kind == "v4":
        ihl = draw(st.sampled_from([5, 5, 5, 6, 15, 4, 0]))
        frag = draw(st.sampled_from([0, 0, 0, 0x4000, 0x2000, 0x0001, 0x1FFF, 0x6000]))
        pkt = ipv4(draw(addr4), draw(addr4), proto, l4, ihl=ihl, frag=frag)
    elif kind == "v6":
        chain = draw(st.lists(st.sampled_from(EXT_TYPES), max_size=8))
        lens = draw(st.lists(st.integers(0, 3), min_size=len(chain), max_size=len(chain)))
        pkt = ipv6(draw(addr6), draw(addr6), chain, proto, l4, lens)
    else:
        pkt = draw(st.binary(min_size=1, max_size=80))
    if draw(st.integers(0, 9)) == 0:  # cut short
        pkt = pkt[: draw(st.integers(1, max(len(pkt), 1)))]
    return pkt


@st.composite
def tap_frames(draw: st.DrawFn) -> bytes:
    pkt = draw(ip_packets())
    ethertype = {4: u.ETH_P_IP, 6: u.ETH_P_IPV6}.get(pkt[0] >> 4, u.ETH_P_ARP)
    if draw(st.integers(0, 9)) == 0:
        ethertype = draw(st.sampled_from([u.ETH_P_ARP, u.ETH_P_IP, u.ETH_P_IPV6, 0x88CC]))
    tags = draw(st.lists(st.tuples(st.sampled_from([u.ETH_P_8021Q, u.ETH_P_8021AD]),
                                   st.integers(0, 0xFFFF)), max_size=3))
    frame = ether(pkt, ethertype, tags)
    if draw(st.integers(0, 14)) == 0:
        frame = frame[: draw(st.integers(1, len(frame)))]
    return frame


def packets(tap: bool) -> st.SearchStrategy[bytes]:
    return tap_frames() if tap else ip_packets()


# ---- a seeded fuzzer (cheaper than hypothesis, for thousands of packets) ---------------------


def random_packet(rnd: random.Random, tap: bool) -> bytes:
    proto = rnd.choice((u.IPPROTO_TCP, u.IPPROTO_UDP, u.IPPROTO_TCP, u.IPPROTO_UDP, 1, 58, 47))
    l4 = l4_header(proto, rnd.randrange(0x10000), rnd.randrange(0x10000), b"p" * rnd.randrange(8))
    if rnd.random() < 0.5:
        src = socket.inet_pton(socket.AF_INET, f"198.18.{rnd.randrange(256)}.{rnd.randrange(256)}")
        dst = socket.inet_pton(socket.AF_INET, f"198.19.{rnd.randrange(256)}.{rnd.randrange(256)}")
        frag = rnd.choice([0] * 8 + [0x2000, 0x0010, 0x4000])
        pkt = ipv4(src, dst, proto, l4, ihl=rnd.choice([5] * 6 + [6, 8]), frag=frag)
    else:
        src = socket.inet_pton(socket.AF_INET6, f"fd00:6d71::{rnd.randrange(1, 0x10000):x}")
        dst = socket.inet_pton(socket.AF_INET6, f"fd00:6d71::{rnd.randrange(1, 0x10000):x}")
        chain = [rnd.choice(EXT_TYPES) for _ in range(rnd.choice([0] * 6 + [1, 2, 7]))]
        pkt = ipv6(src, dst, chain, proto, l4, [rnd.randrange(3) for _ in chain])
    if tap:
        ethertype = u.ETH_P_IP if pkt[0] >> 4 == 4 else u.ETH_P_IPV6
        tags = [(rnd.choice([u.ETH_P_8021Q, u.ETH_P_8021AD]), rnd.randrange(4096))
                for _ in range(rnd.choice([0] * 5 + [1, 2, 3]))]
        pkt = ether(pkt, ethertype, tags)
    if rnd.random() < 0.05:
        pkt = pkt[: rnd.randrange(1, len(pkt))]
    return pkt


# ---- the generators against scapy ------------------------------------------------------------


def test_generated_headers_decode_alike_in_scapy() -> None:
    from scapy.layers.inet import IP, TCP, UDP
    from scapy.layers.inet6 import IPv6
    from scapy.layers.l2 import Dot1Q, Ether

    src, dst = socket.inet_aton("198.18.0.1"), socket.inet_aton("198.18.0.2")
    p = IP(ipv4(src, dst, u.IPPROTO_UDP, l4_header(u.IPPROTO_UDP, 1234, 53, b"hi")))
    assert (p.src, p.dst, p[UDP].sport, p[UDP].dport) == ("198.18.0.1", "198.18.0.2", 1234, 53)
    s6 = socket.inet_pton(socket.AF_INET6, "fd00:6d71::1")
    d6 = socket.inet_pton(socket.AF_INET6, "fd00:6d71::2")
    p6 = IPv6(ipv6(s6, d6, [0, 60], u.IPPROTO_TCP, l4_header(u.IPPROTO_TCP, 80, 443), [1, 0]))
    assert p6[TCP].sport == 80 and p6[TCP].dport == 443
    f = Ether(ether(b"\x45" + bytes(19), u.ETH_P_IP, [(u.ETH_P_8021Q, 5)]))
    assert f[Dot1Q].vlan == 5 and f[Dot1Q].type == u.ETH_P_IP


@given(frame=tap_frames())
def test_the_tap_parser_agrees_with_scapy_on_addresses_and_ports(frame: bytes) -> None:
    from scapy.layers.inet import IP, TCP, UDP
    from scapy.layers.inet6 import IPv6
    from scapy.layers.l2 import Ether

    flow = parse_flow(frame, tap=True)
    if flow is None or flow.ports is None:
        return
    p = Ether(frame)
    layer = p.getlayer(IP) if flow.family == 4 else p.getlayer(IPv6)
    assert layer is not None
    family = socket.AF_INET if flow.family == 4 else socket.AF_INET6
    assert socket.inet_ntop(family, flow.src) == layer.src
    l4 = p.getlayer(TCP) or p.getlayer(UDP)
    if l4 is not None and flow.family == 4:
        assert (l4.sport, l4.dport) == flow.ports
