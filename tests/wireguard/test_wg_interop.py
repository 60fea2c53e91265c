"""Interop with Debian's wireguard-go: our sans-IO core over a plain UDP socket, a real peer.

Topology: the test's own namespace (our side, 198.18.77.1 on a veth, a Python UDP socket and
`WireguardCore`) and a second namespace (198.18.77.2) running wireguard-go with interface
address 198.19.77.2/24. Our tunnel address is 198.19.77.1. Every wait is bounded.
"""

from __future__ import annotations

import os
import select
import socket
import subprocess
import time
from collections.abc import Callable, Iterator

import pytest
from scapy.layers.inet import ICMP, IP, UDP
from scapy.layers.inet6 import ICMPv6EchoReply, ICMPv6EchoRequest, IPv6
from wg_peer import WireguardGo, need_wireguard_go, underlay

from mqtun.netns import NetNamespace
from mqtun.wireguard import messages
from mqtun.wireguard.core import Output, WireguardCore
from mqtun.wireguard.crypto import public_key

OUR_UNDERLAY, THEIR_UNDERLAY = "198.18.77.1", "198.18.77.2"
OUR_TUNNEL, THEIR_TUNNEL = "198.19.77.1", "198.19.77.2"
THEIR_PORT, OUR_PORT = 51820, 51821
OUR_KEY = bytes.fromhex("a8" * 31 + "40")
THEIR_KEY = bytes.fromhex("b0" * 31 + "50")
PSK = bytes(range(32))


class Ours:
    """Our side: one UDP socket driving a WireguardCore, with bounded receive loops."""

    def __init__(self, core: WireguardCore, sock: socket.socket) -> None:
        self.core = core
        self.sock = sock
        self.sent: list[bytes] = []
        self.received: list[bytes] = []

    def emit(self, out: Output) -> list[bytes]:
        for d in out.datagrams:
            for piece in d.pieces():  # (a GSO train: each of its datagrams)
                self.sock.sendto(piece, d.to)
                self.sent.append(piece)
        return out.packets

    def pump(self, until: Callable[[list[bytes]], bool], timeout: float = 10.0) -> list[bytes]:
        """Receive and process datagrams until `until(packets so far)` or the timeout."""
        packets: list[bytes] = []
        deadline = time.monotonic() + timeout
        while not until(packets):
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"timed out; drops={dict(self.core.drops)}")
            if not select.select([self.sock], [], [], min(left, 0.1))[0]:
                self.emit(self.core.tick(time.monotonic()))
                continue
            data, src = self.sock.recvfrom(65536)
            self.received.append(data)
            packets += self.emit(self.core.receive(data, src[:2], time.monotonic()))
        return packets


def _echo_replies(packets: list[bytes]) -> list[IP]:
    return [IP(p) for p in packets if IP(p).haslayer(ICMP) and IP(p)[ICMP].type == 0]


@pytest.fixture
def lab(netns: NetNamespace, make_netns: Callable[[], NetNamespace]) -> Iterator[
        tuple[Ours, WireguardGo]]:
    need_wireguard_go()
    theirs_ns = make_netns()
    underlay(theirs_ns, "wgu0", "wgu1", OUR_UNDERLAY, THEIR_UNDERLAY)
    with WireguardGo(theirs_ns, THEIR_KEY, THEIR_PORT) as wg, \
            socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        wg.address(f"{THEIR_TUNNEL}/24")
        sock.bind((OUR_UNDERLAY, OUR_PORT))
        core = WireguardCore(OUR_KEY)
        yield Ours(core, sock), wg


def _configure(ours: Ours, wg: WireguardGo, *, psk: bytes | None = None,
               their_endpoint: bool = True) -> None:
    wg.add_peer(public_key(OUR_KEY), allowed_ips=f"{OUR_TUNNEL}/32", preshared_key=psk,
                endpoint=f"{OUR_UNDERLAY}:{OUR_PORT}" if their_endpoint else None)
    ours.core.add_peer(public_key(THEIR_KEY), preshared_key=psk or bytes(32),
                       allowed_ips=(f"{THEIR_TUNNEL}/32",),
                       endpoint=(THEIR_UNDERLAY, THEIR_PORT))


def _ping_through(ours: Ours, seq: int = 1) -> IP:
    request = bytes(IP(src=OUR_TUNNEL, dst=THEIR_TUNNEL) / ICMP(id=0x4d51, seq=seq) / b"mqtun-wg")
    ours.emit(ours.core.send(request, time.monotonic()))
    replies = ours.pump(lambda ps: bool(_echo_replies(ps)))
    reply = _echo_replies(replies)[0]
    assert reply.src == THEIR_TUNNEL and reply[ICMP].seq == seq
    assert bytes(reply[ICMP].payload) == b"mqtun-wg"
    return reply


def test_we_initiate_and_ping(lab: tuple[Ours, WireguardGo]) -> None:
    ours, wg = lab
    _configure(ours, wg)
    _ping_through(ours)  # the first send stages the packet and starts the handshake
    peer = next(iter(ours.core.peers.values()))
    assert peer.session.current is not None and peer.session.current.keypair.is_initiator
    assert messages.parse(ours.received[0]).__class__ is messages.Response
    stats = wg.peer_stats(public_key(OUR_KEY))
    assert abs(stats.latest_handshake - time.time()) < 30
    assert stats.rx_bytes > 0 and stats.tx_bytes > 0


def test_wireguard_go_initiates_and_we_answer(lab: tuple[Ours, WireguardGo]) -> None:
    """A UDP datagram from their side starts their handshake; our UDP answer reaches them."""
    ours, wg = lab
    _configure(ours, wg)
    with wg.ns.enter():
        theirs = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    with theirs:
        theirs.bind((THEIR_TUNNEL, 0))
        theirs.settimeout(10)
        theirs.sendto(b"hello from wireguard-go", (OUR_TUNNEL, 4242))
        packets = ours.pump(lambda ps: any(IP(p).haslayer(UDP) for p in ps))
        request = next(IP(p) for p in packets if IP(p).haslayer(UDP))
        assert bytes(request[UDP].payload) == b"hello from wireguard-go"
        answer = IP(src=OUR_TUNNEL, dst=request.src) / UDP(sport=4242, dport=request[UDP].sport) \
            / b"hello from mqtun"
        ours.emit(ours.core.send(bytes(answer), time.monotonic()))
        assert theirs.recvfrom(2048) == (b"hello from mqtun", (OUR_TUNNEL, 4242))
    assert messages.parse(ours.received[0]).__class__ is messages.Initiation
    peer = next(iter(ours.core.peers.values()))
    current = peer.session.current
    assert current is not None and not current.keypair.is_initiator  # confirmed by their data
    assert peer.endpoint == (THEIR_UNDERLAY, THEIR_PORT)


def test_preshared_key(lab: tuple[Ours, WireguardGo]) -> None:
    ours, wg = lab
    _configure(ours, wg, psk=PSK)
    _ping_through(ours)
    assert wg.wg("show", wg.name, "preshared-keys").split()[1] != "(none)"


def test_mismatched_preshared_key_fails_the_handshake(lab: tuple[Ours, WireguardGo]) -> None:
    ours, wg = lab
    _configure(ours, wg, psk=PSK)
    peer = next(iter(ours.core.peers.values()))
    peer.handshake.preshared_key = bytes(32)
    ours.emit(ours.core.initiate(peer, time.monotonic()))
    ours.pump(lambda _: ours.core.drops["decrypt_failed"] > 0)  # their response does not open
    assert peer.session.current is None


def _drain(ours: Ours, quiet: float = 0.3) -> None:
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and select.select([ours.sock], [], [], quiet)[0]:
        data, src = ours.sock.recvfrom(65536)
        ours.received.append(data)
        ours.emit(ours.core.receive(data, src[:2], time.monotonic()))


def test_wg_show_figures_match_ours(lab: tuple[Ours, WireguardGo]) -> None:
    ours, wg = lab
    _configure(ours, wg)
    for seq in range(1, 4):
        _ping_through(ours, seq)
    _drain(ours)
    peer = next(iter(ours.core.peers.values()))
    stats = wg.peer_stats(public_key(OUR_KEY))
    # both sides count whole datagrams of authenticated messages
    assert (stats.rx_bytes, stats.tx_bytes) == (peer.tx_bytes, peer.rx_bytes)
    assert stats.endpoint == f"{OUR_UNDERLAY}:{OUR_PORT}"
    assert abs(stats.latest_handshake - peer.last_handshake_ns // 1_000_000_000) <= 1


def test_replays_and_forgeries_change_nothing(lab: tuple[Ours, WireguardGo]) -> None:
    ours, wg = lab
    _configure(ours, wg)
    _ping_through(ours)
    _drain(ours)
    before = wg.peer_stats(public_key(OUR_KEY))
    initiation = next(d for d in ours.sent if d[0] == messages.INITIATION)
    transport = [d for d in ours.sent if d[0] == messages.TRANSPORT][-1]
    forged_transport = transport[:-1] + bytes([transport[-1] ^ 1])
    forged_initiation = initiation[:40] + os.urandom(76) + initiation[116:]
    for attack in (initiation, transport, forged_transport, forged_initiation,
                   b"\x04\x00\x00\x00" + transport[4:20]):
        ours.sock.sendto(attack, (THEIR_UNDERLAY, THEIR_PORT))
    time.sleep(0.3)
    after = wg.peer_stats(public_key(OUR_KEY))
    assert (after.rx_bytes, after.latest_handshake) == (before.rx_bytes, before.latest_handshake)
    _ping_through(ours, seq=2)  # the session survived

    # our side: their replayed and forged messages are counted drops, never packets
    core = ours.core
    theirs = [d for d in ours.received if d[0] == messages.TRANSPORT]
    response = next(d for d in ours.received if d[0] == messages.RESPONSE)
    src = (THEIR_UNDERLAY, THEIR_PORT)
    now = time.monotonic()
    assert core.receive(theirs[0], src, now).packets == []
    assert core.drops["replay"] == 1
    assert core.receive(theirs[-1], src, now).packets == []
    assert core.drops["replay"] == 2
    # a counter never used, under a tag that cannot verify: refused, and the window stays put
    keys = next(iter(core.peers.values())).session.current
    assert keys is not None
    last = keys.window.last
    forged = theirs[-1][:8] + (last + 1000).to_bytes(8, "little") + theirs[-1][16:]
    assert core.receive(forged, src, now).packets == []
    assert core.drops["decrypt_failed"] == 1 and keys.window.last == last
    assert core.receive(response, src, now).datagrams == []
    assert core.drops["unknown_index"] + core.drops["bad_state"] == 1
    assert core.receive(theirs[-1][:20], src, now).packets == []
    assert core.drops["short"] == 1


def test_forced_rekey(lab: tuple[Ours, WireguardGo]) -> None:
    ours, wg = lab
    _configure(ours, wg)
    _ping_through(ours)
    peer = next(iter(ours.core.peers.values()))
    first = peer.session.current
    ours.emit(ours.core.initiate(peer, time.monotonic(), force=True))
    ours.pump(lambda _: peer.session.current is not first)
    _ping_through(ours, seq=2)
    assert peer.session.previous is first and peer.session.current is not None
    assert wg.peer_stats(public_key(OUR_KEY)).latest_handshake > 0


def test_roaming_to_a_new_source_port(lab: tuple[Ours, WireguardGo]) -> None:
    ours, wg = lab
    _configure(ours, wg)
    _ping_through(ours)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as moved:
        moved.bind((OUR_UNDERLAY, OUR_PORT + 7))
        ours.sock, old = moved, ours.sock
        try:
            _ping_through(ours, seq=2)  # their reply comes to the new port: they followed us
        finally:
            ours.sock = old
    assert wg.peer_stats(public_key(OUR_KEY)).endpoint == f"{OUR_UNDERLAY}:{OUR_PORT + 7}"


def test_wireguard_go_under_load_sends_cookies_and_our_retry_passes(
        lab: tuple[Ours, WireguardGo]) -> None:
    """A burst of valid-mac1 initiations puts wireguard-go under load (its handshake queue
    passes 1/8 full); it then answers with cookie replies, which our core takes, and our next
    initiation carries a mac2 it accepts. Skipped when this machine drains the queue too fast
    for a burst from Python to fill it."""
    ours, wg = lab
    _configure(ours, wg)
    peer = next(iter(ours.core.peers.values()))
    burst = ours.core.initiate(peer, time.monotonic()).datagrams[0].data
    cookies = 0
    for _ in range(5):
        for _ in range(4000):
            ours.sock.sendto(burst, (THEIR_UNDERLAY, THEIR_PORT))
        deadline = time.monotonic() + 1
        while time.monotonic() < deadline and select.select([ours.sock], [], [], 0.2)[0]:
            data, src = ours.sock.recvfrom(2048)
            if data[0] == messages.COOKIE_REPLY:
                cookies += 1
                ours.core.receive(data, src[:2], time.monotonic())
        if cookies:
            break
    if not cookies:
        pytest.skip("wireguard-go never came under load from this burst")
    assert peer.handshake.cookies.has_cookie
    # at once, while it is still under load (it stays so for a second): a fresh initiation
    # with the cookie's mac2 is answered with a response, not with another cookie
    retry = ours.core.initiate(peer, time.monotonic(), force=True)
    assert retry.datagrams[0].data[-16:] != bytes(16)
    ours.emit(retry)
    ours.pump(lambda _: peer.session.current is not None, timeout=5)


def test_allowed_ips_enforced_both_ways(lab: tuple[Ours, WireguardGo]) -> None:
    ours, wg = lab
    _configure(ours, wg)
    _ping_through(ours)
    # their side sends from an address our peer config does not allow: decrypted, then dropped
    wg.ns.run(["ip", "address", "add", "198.19.77.3/24", "dev", wg.name])
    with wg.ns.enter():
        theirs = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    with theirs:
        theirs.bind(("198.19.77.3", 0))
        theirs.sendto(b"spoofed", (OUR_TUNNEL, 4242))
        ours.pump(lambda _: ours.core.drops["source_not_allowed"] == 1)
        # and we send from an address they do not allow for us: their socket never sees it
        theirs.settimeout(0.5)
        port = theirs.getsockname()[1]
        for src in ("198.19.77.9", OUR_TUNNEL):
            packet = IP(src=src, dst="198.19.77.3") / UDP(sport=4242, dport=port) / src.encode()
            ours.emit(ours.core.send_to(next(iter(ours.core.peers.values())), bytes(packet),
                                        time.monotonic()))
        data, addr = theirs.recvfrom(2048)
        assert (data, addr[0]) == (OUR_TUNNEL.encode(), OUR_TUNNEL)  # only the allowed one
        with pytest.raises(TimeoutError):
            theirs.recvfrom(2048)


def test_ipv6_underlay_and_inner_packets(lab: tuple[Ours, WireguardGo]) -> None:
    ours, wg = lab
    subprocess.run(["ip", "address", "add", "fd00:77::1/64", "dev", "wgu0", "nodad"], check=True)
    wg.ns.run(["ip", "address", "add", "fd00:77::2/64", "dev", "wgu1", "nodad"])
    wg.ns.run(["ip", "address", "add", "fd00:78::2/64", "dev", wg.name, "nodad"])
    wg.add_peer(public_key(OUR_KEY), allowed_ips="fd00:78::1/128")
    core_peer = ours.core.add_peer(public_key(THEIR_KEY), allowed_ips=("fd00:78::2/128",),
                                   endpoint=("fd00:77::2", THEIR_PORT))
    with socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as sock6:
        sock6.bind(("fd00:77::1", OUR_PORT))
        ours.sock = sock6
        request = IPv6(src="fd00:78::1", dst="fd00:78::2") / ICMPv6EchoRequest(id=7, seq=1)
        ours.emit(ours.core.send(bytes(request), time.monotonic()))
        replies = ours.pump(lambda ps: any(IPv6(p).haslayer(ICMPv6EchoReply) for p in ps))
    reply = next(IPv6(p) for p in replies if IPv6(p).haslayer(ICMPv6EchoReply))
    assert reply.src == "fd00:78::2" and reply[ICMPv6EchoReply].id == 7
    assert core_peer.endpoint is not None and core_peer.endpoint[0] == "fd00:77::2"
    assert wg.peer_stats(public_key(OUR_KEY)).endpoint == f"[fd00:77::1]:{OUR_PORT}"


def test_our_retransmission_completes_a_late_handshake(lab: tuple[Ours, WireguardGo]) -> None:
    """wireguard-go does not know us yet: our first initiation is ignored. Once it is
    configured, our retransmit timer (REKEY_TIMEOUT plus jitter) sends a fresh initiation that
    completes, and the staged packet is delivered."""
    ours, wg = lab
    ours.core.add_peer(public_key(THEIR_KEY), allowed_ips=(f"{THEIR_TUNNEL}/32",),
                       endpoint=(THEIR_UNDERLAY, THEIR_PORT))
    request = bytes(IP(src=OUR_TUNNEL, dst=THEIR_TUNNEL) / ICMP(id=9, seq=1) / b"late")
    start = time.monotonic()
    ours.emit(ours.core.send(request, start))
    time.sleep(0.3)
    assert not select.select([ours.sock], [], [], 0)[0]  # ignored: an unknown peer
    wg.add_peer(public_key(OUR_KEY), allowed_ips=f"{OUR_TUNNEL}/32")
    replies = ours.pump(lambda ps: bool(_echo_replies(ps)), timeout=10)
    assert _echo_replies(replies)[0][ICMP].id == 9
    assert time.monotonic() - start >= 5.0  # it took the retransmission
    initiations = [d for d in ours.sent if d[0] == messages.INITIATION]
    assert len(initiations) == 2 and initiations[0] != initiations[1]
