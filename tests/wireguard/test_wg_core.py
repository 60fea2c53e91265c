"""Two WireguardCores wired back to back in memory: the interface-level rules."""

from __future__ import annotations

import itertools
from collections.abc import Callable

from scapy.layers.inet import IP, UDP

from mqtun.wireguard import messages as m
from mqtun.wireguard.core import Output, WireguardCore
from mqtun.wireguard.crypto import public_key
from mqtun.wireguard.timers import REKEY_AFTER_TIME

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
             src_of: dict[int, tuple[str, int]], now: float) -> list[bytes]:
    """Carry datagrams until none are left; return the packets that reached any TUN."""
    packets = list(out.packets)
    queue = [(d, src_of[id(None)]) for d in out.datagrams]
    hops = 0
    while queue and hops < 50:
        hops += 1
        datagram, src = queue.pop(0)
        core = cores[datagram.to]
        result = core.receive(datagram.data, src, now)
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
    got = _deliver(out, cores, {id(None): A_ADDR}, 0.0)
    assert got == [packet]                       # staged, then sent after the response
    back = _udp("198.19.0.2", "198.19.0.1", b"answer")
    assert _deliver(b.send(back, 0.1), cores, {id(None): B_ADDR}, 0.1) == [back]
    pa, pb = a.peers[public_key(B_KEY)], b.peers[public_key(A_KEY)]
    assert pb.endpoint == A_ADDR and pa.tx_bytes == pb.rx_bytes and pb.tx_bytes == pa.rx_bytes
    assert not a.drops and not b.drops


def test_allowed_ips_both_ways() -> None:
    a, b = _cores()
    cores = {A_ADDR: a, B_ADDR: b}
    _deliver(a.send(_udp("198.19.0.1", "198.19.0.2"), 0.0), cores, {id(None): A_ADDR}, 0.0)
    assert a.send(_udp("198.19.0.1", "198.19.0.99"), 0.0).datagrams == []
    assert a.drops["no_peer_for_destination"] == 1
    # a is allowed 198.19.0.1 only: a spoofed inner source never reaches b's TUN
    peer_b = a.peers[public_key(B_KEY)]
    spoofed = a.send_to(peer_b, _udp("198.19.0.77", "198.19.0.2"), 0.1)
    assert _deliver(spoofed, cores, {id(None): A_ADDR}, 0.1) == []
    assert b.drops["source_not_allowed"] == 1
    assert _deliver(a.send_to(peer_b, b"\x45garbage", 0.1), cores, {id(None): A_ADDR}, 0.1) == []
    assert b.drops["bad_length"] == 1


def test_roaming_follows_the_last_authenticated_source() -> None:
    a, b = _cores()
    cores = {A_ADDR: a, B_ADDR: b, ("198.18.0.9", 3000): a}
    _deliver(a.send(_udp("198.19.0.1", "198.19.0.2"), 0.0), cores, {id(None): A_ADDR}, 0.0)
    peer_a = b.peers[public_key(A_KEY)]
    moved = ("198.18.0.9", 3000)
    _deliver(a.send(_udp("198.19.0.1", "198.19.0.2"), 1.0), cores, {id(None): moved}, 1.0)
    assert peer_a.endpoint == moved
    keys = peer_a.session.current
    assert keys is not None   # a forgery under the real index does not move it either
    forged = m.Transport.header(keys.keypair.local_index, 500) + bytes(32)
    b.receive(forged, ("198.18.0.66", 1), 2.0)
    assert peer_a.endpoint == moved and b.drops["decrypt_failed"] == 1


def test_rekey_after_time_and_keepalive_timer() -> None:
    a, b = _cores()
    cores = {A_ADDR: a, B_ADDR: b}
    src = {id(None): A_ADDR}
    _deliver(a.send(_udp("198.19.0.1", "198.19.0.2"), 0.0), cores, src, 0.0)
    first = a.peers[public_key(B_KEY)].session.current
    # b received data and sent nothing: its keepalive timer fires after 10 s
    keepalive = b.tick(10.0)
    assert [len(d.data) for d in keepalive.datagrams] == [m.KEEPALIVE_SIZE]
    out = a.send(_udp("198.19.0.1", "198.19.0.2"), REKEY_AFTER_TIME + 1)
    assert [d.data[0] for d in out.datagrams] == [m.TRANSPORT, m.INITIATION]
    _deliver(out, cores, src, REKEY_AFTER_TIME + 1)
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
    reply = b.receive(first.datagrams[0].data, A_ADDR, 0.0)
    assert [d.data[0] for d in reply.datagrams] == [m.COOKIE_REPLY]
    assert b.drops["under_load_no_cookie"] == 1
    assert a.receive(reply.datagrams[0].data, B_ADDR, 0.0).datagrams == []
    retry = a.initiate(a.peers[public_key(B_KEY)], 6.0)  # after REKEY_TIMEOUT
    got = _deliver(retry, cores, {id(None): A_ADDR}, 6.0)
    assert got == [] and a.peers[public_key(B_KEY)].session.current is not None
    assert b.drops["under_load_no_cookie"] == 1   # the retry carried a valid mac2
