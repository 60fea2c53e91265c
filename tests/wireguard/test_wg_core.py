"""Two WireguardCores wired back to back in memory: the interface-level rules."""

from __future__ import annotations

import itertools
from collections.abc import Callable

import pytest
from hypothesis import given
from hypothesis import strategies as st
from scapy.layers.inet import IP, UDP

from mqtun.wireguard import messages as m
from mqtun.wireguard.core import Output, WireguardCore
from mqtun.wireguard.crypto import public_key
from mqtun.wireguard.timers import REKEY_AFTER_TIME

pytestmark = pytest.mark.sans_io  # pure: no device, no namespace

A_KEY = bytes.fromhex("a8" * 31 + "40")
B_KEY = bytes.fromhex("b0" * 31 + "50")
A_ADDR, B_ADDR = ("198.18.0.1", 1000), ("198.18.0.2", 2000)


def _wall_clock() -> Callable[[], int]:
    """A wall clock a second further on at every reading (TAI64N stamps are 16 ms coarse)."""
    ticks = itertools.count(1_764_584_000)
    return lambda: next(ticks) * 1_000_000_000


def _cores() -> tuple[WireguardCore, WireguardCore]:
    a = WireguardCore(A_KEY, wall_clock_ns=_wall_clock())
    b = WireguardCore(B_KEY, wall_clock_ns=_wall_clock())
    a.add_peer(public_key(B_KEY), allowed_ips=("198.19.0.2/32",), endpoint=B_ADDR)
    b.add_peer(public_key(A_KEY), allowed_ips=("198.19.0.1/32", "fd00::1/128"))
    return a, b


def _deliver(out: Output, cores: dict[tuple[str, int], WireguardCore],
             sender: tuple[str, int], now: float) -> list[bytes]:
    """Carry datagrams (the first ones sent from `sender`) until none are left; return the
    packets that reached any TUN."""
    packets = list(out.packets)
    queue = [(d, sender) for d in out.datagrams]
    hops = 0
    while queue and hops < 50:
        hops += 1
        datagram, src = queue.pop(0)
        core = cores[datagram.to]
        for piece in datagram.pieces():  # (a GSO train: each of its datagrams)
            result = core.receive(piece, src, now)
            packets += result.packets
            queue += [(d, datagram.to) for d in result.datagrams]
    return packets


def _udp(src: str, dst: str, payload: bytes = b"data") -> bytes:
    return bytes(IP(src=src, dst=dst) / UDP(sport=1, dport=2) / payload)


def test_first_packet_handshakes_then_arrives() -> None:
    a, b = _cores()
    cores = {A_ADDR: a, B_ADDR: b}
    packet = _udp("198.19.0.1", "198.19.0.2")
    out = a.send(packet, 0.0)
    assert [d.data[0] for d in out.datagrams] == [m.INITIATION]
    got = _deliver(out, cores, A_ADDR, 0.0)
    assert got == [packet]                       # staged, then sent after the response
    back = _udp("198.19.0.2", "198.19.0.1", b"answer")
    assert _deliver(b.send(back, 0.1), cores, B_ADDR, 0.1) == [back]
    pa, pb = a.peers[public_key(B_KEY)], b.peers[public_key(A_KEY)]
    assert pb.endpoint == A_ADDR and pa.tx_bytes == pb.rx_bytes and pb.tx_bytes == pa.rx_bytes
    assert not a.drops and not b.drops


def test_allowed_ips_both_ways() -> None:
    a, b = _cores()
    cores = {A_ADDR: a, B_ADDR: b}
    _deliver(a.send(_udp("198.19.0.1", "198.19.0.2"), 0.0), cores, A_ADDR, 0.0)
    assert a.send(_udp("198.19.0.1", "198.19.0.99"), 0.0).datagrams == []
    assert a.drops["no_peer_for_destination"] == 1
    # a is allowed 198.19.0.1 only: a spoofed inner source never reaches b's TUN
    peer_b = a.peers[public_key(B_KEY)]
    spoofed = a.send_to(peer_b, _udp("198.19.0.77", "198.19.0.2"), 0.1)
    assert _deliver(spoofed, cores, A_ADDR, 0.1) == []
    assert b.drops["source_not_allowed"] == 1
    assert _deliver(a.send_to(peer_b, b"\x45garbage", 0.1), cores, A_ADDR, 0.1) == []
    assert b.drops["bad_length"] == 1


def test_roaming_follows_the_last_authenticated_source() -> None:
    a, b = _cores()
    cores = {A_ADDR: a, B_ADDR: b, ("198.18.0.9", 3000): a}
    _deliver(a.send(_udp("198.19.0.1", "198.19.0.2"), 0.0), cores, A_ADDR, 0.0)
    peer_a = b.peers[public_key(A_KEY)]
    moved = ("198.18.0.9", 3000)
    _deliver(a.send(_udp("198.19.0.1", "198.19.0.2"), 1.0), cores, moved, 1.0)
    assert peer_a.endpoint == moved
    keys = peer_a.session.current
    assert keys is not None   # a forgery under the real index does not move it either
    forged = m.Transport.header(keys.keypair.local_index, 500) + bytes(32)
    b.receive(forged, ("198.18.0.66", 1), 2.0)
    assert peer_a.endpoint == moved and b.drops["decrypt_failed"] == 1


def test_rekey_after_time_and_keepalive_timer() -> None:
    a, b = _cores()
    cores = {A_ADDR: a, B_ADDR: b}
    _deliver(a.send(_udp("198.19.0.1", "198.19.0.2"), 0.0), cores, A_ADDR, 0.0)
    first = a.peers[public_key(B_KEY)].session.current
    # b received data and sent nothing: its keepalive timer fires after 10 s
    keepalive = b.tick(10.0)
    assert [len(d.data) for d in keepalive.datagrams] == [m.KEEPALIVE_SIZE]
    out = a.send(_udp("198.19.0.1", "198.19.0.2"), REKEY_AFTER_TIME + 1)
    assert [d.data[0] for d in out.datagrams] == [m.TRANSPORT, m.INITIATION]
    _deliver(out, cores, A_ADDR, REKEY_AFTER_TIME + 1)
    second = a.peers[public_key(B_KEY)].session.current
    assert second is not None and second is not first
    assert a.peers[public_key(B_KEY)].session.previous is first
    assert not a.drops and not b.drops


def test_cookie_under_load() -> None:
    a, b = _cores()
    b.under_load = True
    cores = {A_ADDR: a, B_ADDR: b}
    b.peers[public_key(A_KEY)].endpoint = A_ADDR
    a.peers[public_key(B_KEY)].endpoint = B_ADDR
    first = a.initiate(a.peers[public_key(B_KEY)], 0.0)
    reply = b.receive(bytes(first.datagrams[0].data), A_ADDR, 0.0)
    assert [d.data[0] for d in reply.datagrams] == [m.COOKIE_REPLY]
    assert b.drops["under_load_no_cookie"] == 1
    assert a.receive(bytes(reply.datagrams[0].data), B_ADDR, 0.0).datagrams == []
    retry = a.initiate(a.peers[public_key(B_KEY)], 6.0)  # after REKEY_TIMEOUT
    got = _deliver(retry, cores, A_ADDR, 6.0)
    assert got == [] and a.peers[public_key(B_KEY)].session.current is not None
    assert b.drops["under_load_no_cookie"] == 1   # the retry carried a valid mac2


def test_a_handshake_flood_turns_cookies_on_by_itself() -> None:
    a, b = _cores()
    b.peers[public_key(A_KEY)].endpoint = A_ADDR
    flood = bytes(a.initiate(a.peers[public_key(B_KEY)], 0.0).datagrams[0].data)
    kinds = [d.data[0] for i in range(200)
             for d in b.receive(flood, A_ADDR, 0.001 * i).datagrams]
    assert kinds[0] == m.RESPONSE                       # the first one is served
    assert kinds[-1] == m.COOKIE_REPLY                  # the flood gets cookies
    assert b.drops["replayed_timestamp"] > 0 and b.drops["under_load_no_cookie"] > 0
    assert b.is_under_load(0.5) and not b.is_under_load(2.0)


def test_under_load_a_cookie_does_not_buy_unlimited_handshakes() -> None:
    a, b = _cores()
    b.under_load = True
    peer = a.peers[public_key(B_KEY)]
    first = a.initiate(peer, 0.0)
    reply = b.receive(bytes(first.datagrams[0].data), A_ADDR, 0.0)
    assert a.receive(bytes(reply.datagrams[0].data), B_ADDR, 0.0).datagrams == []
    answered = 0
    for i in range(20):  # 20 fresh initiations with a valid mac2 within 50 ms
        data = bytes(a.initiate(peer, 6.0 + i * 0.0025, force=True).datagrams[0].data)
        out = b.receive(data, A_ADDR, 6.0 + i * 0.0025)
        answered += sum(d.data[0] == m.RESPONSE for d in out.datagrams)
    assert b.drops["handshake_rate_limited"] >= 14 and answered <= 6
    assert b.drops["under_load_no_cookie"] == 1


def _typed(kind_and_size: tuple[int, int]) -> st.SearchStrategy[bytes]:
    kind, size = kind_and_size
    return st.binary(min_size=size - 4, max_size=size - 4).map(
        lambda body: bytes([kind, 0, 0, 0]) + body)


_datagrams = st.one_of(
    st.binary(max_size=200),
    st.tuples(st.sampled_from([1, 2, 3, 4]),
              st.sampled_from([148, 92, 64, 32, 48, 100])).flatmap(_typed))


@given(_datagrams)
def test_no_datagram_raises_or_reaches_the_tun(data: bytes) -> None:
    a, b = _cores()
    _deliver(a.send(_udp("198.19.0.1", "198.19.0.2"), 0.0), {A_ADDR: a, B_ADDR: b},
             A_ADDR, 0.0)
    assert b.receive(data, A_ADDR, 1.0).packets == []
    assert sum(b.drops.values()) >= 1
    out = b.send(data, 1.0)  # nor does any TUN packet crash the send side
    assert all(isinstance(p, bytes) for d in out.datagrams for p in d.pieces())


def test_a_batch_is_sent_and_opened_like_its_packets_one_by_one() -> None:
    """send_batch (a super-packet's segments) and receive_batch (a GRO train): the same
    packets arrive in order, consecutive counters, byte counters that reconcile; a replay, a
    forgery, a foreign source and a handshake inside the train are each handled on their own."""
    a, b = _cores()
    cores = {A_ADDR: a, B_ADDR: b}
    assert _deliver(a.send(_udp("198.19.0.1", "198.19.0.2"), 0.0), cores, A_ADDR, 0.0)
    segments = [_udp("198.19.0.1", "198.19.0.2", b"seg%02d" % i * 50) for i in range(45)]
    out = a.send_batch(segments, 0.5)
    # one GSO train: 45 datagrams of one size in one buffer
    assert [(d.to, d.segment) for d in out.datagrams] == [(B_ADDR, 320)]
    wire = out.datagrams[0].pieces()
    assert len(wire) == 45 and b"".join(wire) == bytes(out.datagrams[0].data)
    counters = [m.parse(d).counter for d in wire]  # type: ignore[union-attr]
    assert counters == list(range(counters[0], counters[0] + 45))
    train = [(d, A_ADDR) for d in wire]
    forged = bytearray(train[3][0])
    forged[-1] ^= 1
    spoofed = a.send_to(a.peers[public_key(B_KEY)], _udp("198.19.0.9", "198.19.0.2"), 0.5)
    batch = [*train[:3], (bytes(forged), A_ADDR), train[1], *train[3:],
             (bytes(spoofed.datagrams[0].data), A_ADDR), (b"\x01" + bytes(147), A_ADDR)]
    got = b.receive_batch(batch, 0.6)
    assert got.packets == segments
    assert b.drops == {"decrypt_failed": 1, "replay": 1, "source_not_allowed": 1,
                       "bad_mac1": 1}
    pa, pb = a.peers[public_key(B_KEY)], b.peers[public_key(A_KEY)]
    assert pa.tx_bytes == pb.rx_bytes  # (the forgery, the replay and the junk not counted)
    assert _deliver(b.send_batch([_udp("198.19.0.2", "198.19.0.1")] * 3, 0.7), cores, B_ADDR,
                    0.7) == [_udp("198.19.0.2", "198.19.0.1")] * 3
    assert pb.tx_bytes == pa.rx_bytes
