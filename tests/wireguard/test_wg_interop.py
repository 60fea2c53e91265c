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
from scapy.layers.inet import ICMP, IP
from wg_peer import WireguardGo, need_wireguard_go

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
            self.sock.sendto(d.data, d.to)
            self.sent.append(d.data)
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
    subprocess.run(["ip", "link", "add", "wgu0", "type", "veth", "peer", "name", "wgu1",
                    "netns", theirs_ns.name], check=True, timeout=10)
    subprocess.run(["ip", "address", "add", f"{OUR_UNDERLAY}/24", "dev", "wgu0"], check=True)
    subprocess.run(["ip", "link", "set", "wgu0", "up"], check=True)
    theirs_ns.run(["ip", "address", "add", f"{THEIR_UNDERLAY}/24", "dev", "wgu1"])
    theirs_ns.run(["ip", "link", "set", "wgu1", "up"])
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
