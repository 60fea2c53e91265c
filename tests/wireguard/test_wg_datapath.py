"""The data-path I/O of `mqtun wg` (mqtun.wireguard.datapath) on real sockets in the test's
namespace: a train of equal datagrams goes out in one UDP GSO send and comes back from a
UDP_GRO socket as one read, cut into the same datagrams, in order."""

from __future__ import annotations

import select
import socket
import subprocess

from mqtun.runtime.sockets import UdpEndpoint
from mqtun.wireguard.core import Datagram
from mqtun.wireguard.datapath import (
    plain_address,
    receive_datagrams,
    send_datagrams,
    tune_socket,
    wire_address,
)


def _socket(gro: bool) -> UdpEndpoint:
    sock = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
    sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
    tune_socket(sock, gro=gro)
    sock.bind(("::", 0))
    sock.setblocking(False)
    return UdpEndpoint(sock, gro=gro)


def test_addresses() -> None:
    assert wire_address(("198.18.0.1", 5)) == ("::ffff:198.18.0.1", 5)
    assert wire_address(("fd00::1", 5)) == ("fd00::1", 5)
    assert plain_address(("::ffff:198.18.0.1", 5)) == ("198.18.0.1", 5)
    assert plain_address(("fd00::1", 5)) == ("fd00::1", 5)


def test_a_train_goes_out_in_one_gso_send_and_comes_back_cut() -> None:
    subprocess.run(["ip", "link", "set", "lo", "up"], check=True, timeout=10)
    sender, receiver = _socket(gro=False), _socket(gro=True)
    try:
        to = ("127.0.0.1", receiver.port)
        train = [bytes([i]) * 1452 for i in range(40)] + [b"\xff" * 300]
        send_datagrams(sender, [Datagram(d, to) for d in train], {})
        assert select.select([receiver.sock], [], [], 5)[0]
        got = receiver.recv()
        assert got is not None
        data, segment, _ = got
        assert segment == 1452 and data == b"".join(train)  # one read: sent as one GSO train
        send_datagrams(sender, [Datagram(d, to) for d in train], {})
        assert select.select([receiver.sock], [], [], 5)[0]
        out = receive_datagrams(receiver, 64)
        assert [d for d, _ in out] == train
        assert {src for _, src in out} == {("127.0.0.1", sender.port)}
        # the sealer's form: the datagrams in one buffer (Datagram.segment), one send
        send_datagrams(sender, [Datagram(memoryview(b"".join(train)), to, 1452)], {})
        assert select.select([receiver.sock], [], [], 5)[0]
        got = receiver.recv()
        assert got is not None and got[1] == 1452 and got[0] == b"".join(train)
    finally:
        sender.close()
        receiver.close()
