"""The runtime's data plane against the real kernel: WorkerPool.forward as a middlebox.

Topology (two namespaces): sockets here -> A (virtio-net header, offloads or none) == a
forked worker running a handler on the packet path == B (plain, or PI, in ns2) -> sockets.
The handler runs in the worker and writes every packet it should never have seen (over the
MTU, a checksum that is not complete: checked with scapy) to a file the test reads. The pool's
counters reconcile with the kernel's: read/written packets with IFLA_STATS64 (a super-packet
once), wire packets read with wire packets written plus drops.
"""

from __future__ import annotations

import contextlib
import os
import socket
import struct
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import nettools
import pytest

from mqtun import Device
from mqtun._uapi import SO_RCVBUFFORCE, SOL_UDP, UDP_SEGMENT, VIRTIO_NET_HDR_GSO_TCPV4
from mqtun.errors import InvalidArgumentError
from mqtun.netns import NetNamespace
from mqtun.offload import Offloads, enable_offloads
from mqtun.packet import accel
from mqtun.packet.vnet import VnetHeader
from mqtun.runtime import LoopConfig, WorkerPool
from mqtun.runtime.path import SuperPacket
from mqtun.stats import QueueStats

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    from scapy.layers.inet import IP, TCP, UDP
    from scapy.layers.inet6 import IPv6
    from scapy.layers.l2 import Ether

A4, B4 = "198.18.0.1", "198.18.0.2"
A6, B6 = "fd00:6d72::1", "fd00:6d72::2"
TIMEOUT = 20.0
OFFLOADS = Offloads.CSUM | Offloads.TSO | Offloads.USO
Handler = Callable[[Any], object]


def note(where: Path, text: str) -> None:
    """Append one line to a file: how a handler in a forked worker tells the test something."""
    fd = os.open(where, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    try:
        os.write(fd, text.encode() + b"\n")
    finally:
        os.close(fd)


def problems(pkt: bytes, tap: bool, mtu: int) -> list[str]:
    """What is wrong with a wire packet: longer than the MTU, a checksum not complete."""
    l3 = Ether(pkt).payload if tap else (IPv6(pkt) if pkt[0] >> 4 == 6 else IP(pkt))
    if not isinstance(l3, (IP, IPv6)):
        return []  # ARP
    out = []
    if len(bytes(l3)) > mtu:
        out.append(f"{len(bytes(l3))} bytes over MTU {mtu}")
    for layer in (IP, TCP, UDP):
        if layer in l3:
            got = l3[layer].chksum
            clone = l3.copy()
            del clone[layer].chksum
            want = type(clone)(bytes(clone))[layer].chksum
            if got != want and {got, want} != {0, 0xFFFF}:
                out.append(f"{layer.__name__} checksum {got:#x}, should be {want:#x}")
    return out


def checking(where: Path, tap: bool, mtu: int = 1500) -> Handler:
    """A pass-through handler that notes every packet it should not have been given."""

    def handler(pkt: Any) -> object:
        raw = bytes(pkt)
        for p in problems(raw, tap, mtu):
            note(where, p)
        note(where.with_suffix(".count"), "")
        return pkt

    return handler


def seen(where: Path) -> list[str]:
    return where.read_text().splitlines() if where.exists() else []


@contextlib.contextmanager
def middlebox(make_netns: Callable[[], NetNamespace], *, tap: bool, offloads: int,
              hdr_size: int = 10, b_pi: bool = False, b_offloads: int = 0,
              **pool: Any) -> Iterator[tuple[Device, Device, NetNamespace, WorkerPool]]:
    ns2 = make_netns()
    a = Device.create("dpa%d", tap=tap, vnet_hdr=True)
    with ns2.enter():
        b = Device.create("dpb%d", tap=tap, packet_info=b_pi, vnet_hdr=bool(b_offloads))
    with a, b:
        if hdr_size != 10:
            a.set_vnet_hdr_size(hdr_size)
        enable_offloads(a, offloads)
        if b_offloads:
            enable_offloads(b, b_offloads)
        for dev, addr4, addr6, where in ((a, A4, A6, None), (b, B4, B6, ns2)):
            with ns2.enter() if where else contextlib.nullcontext():
                dev.link.add_address(f"{addr4}/24")
                dev.link.add_address(f"{addr6}/64")
                dev.link.up()
        wait_dad(ns2)
        wp = WorkerPool.forward(a, b, loop=LoopConfig(mode="epoll"), name="dataplane", **pool)
        wp.start()
        try:
            yield a, b, ns2, wp
        finally:
            wp.stop()


def wait_dad(ns2: NetNamespace) -> None:
    deadline = time.monotonic() + 5
    for where in (None, ns2):
        while time.monotonic() < deadline:
            with ns2.enter() if where else contextlib.nullcontext():
                out = os.popen("ip -6 addr show tentative").read()
            if "fd00:6d72" not in out:
                break
            time.sleep(0.05)


def tcp_exchange(ns2: NetNamespace, v6: bool, up: bytes, down: bytes) -> tuple[bytes, bytes]:
    return nettools.tcp_exchange(ns2, B6 if v6 else B4, up, down, TIMEOUT)


def udp_pair(ns2: NetNamespace, v6: bool) -> tuple[socket.socket, socket.socket]:
    """(client here, server in ns2), connected both ways, big receive buffers."""
    family = socket.AF_INET6 if v6 else socket.AF_INET
    with ns2.enter():
        server = socket.socket(family, socket.SOCK_DGRAM)
    client = socket.socket(family, socket.SOCK_DGRAM)
    for s in (server, client):
        s.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, 16 << 20)
        s.settimeout(TIMEOUT)
    server.bind((B6 if v6 else B4, 0))
    client.bind((A6 if v6 else A4, 0))
    client.connect(server.getsockname()[:2])
    server.connect(client.getsockname()[:2])
    return client, server


def settled(a: Device, b: Device, ns2: NetNamespace, pool: WorkerPool) -> tuple[
        dict[str, int], dict[str, int], QueueStats, QueueStats]:
    """The kernel's counters of A and B and the pool's, once they agree on what was read
    (the stacks may still send a neighbour solicitation or an ACK: wait for it to be
    counted on both sides; bounded)."""
    deadline = time.monotonic() + 5
    while True:
        ka = a.link.stats()
        with ns2.enter():
            kb = b.link.stats()
        qa, qb = pool.workers[0].stats
        if ((ka["tx_packets"], kb["tx_packets"]) == (qa.read_packets, qb.read_packets)
                and (ka["rx_packets"], kb["rx_packets"])
                == (qa.written_packets, qb.written_packets)) or time.monotonic() > deadline:
            return ka, kb, qa, qb
        time.sleep(0.05)


def reconcile(a: Device, b: Device, ns2: NetNamespace, pool: WorkerPool) -> tuple[
        QueueStats, QueueStats]:
    """Every read and write the kernel counted, the pool counted (a super-packet once), and
    every wire packet read was written or dropped with a reason."""
    ka, kb, qa, qb = settled(a, b, ns2, pool)
    assert ka["tx_packets"] == qa.read_packets and kb["tx_packets"] == qb.read_packets
    assert ka["rx_packets"] == qa.written_packets and kb["rx_packets"] == qb.written_packets
    assert ka["rx_frame_errors"] == 0 and kb["rx_frame_errors"] == 0
    wire_read = qa.read_wire_packets + qb.read_wire_packets
    wire_written = qa.written_wire_packets + qb.written_wire_packets
    assert wire_read == wire_written + qa.dropped_total + qb.dropped_total, (qa, qb)
    return qa, qb


@pytest.mark.parametrize("v6", [False, True], ids=["ipv4", "ipv6"])
@pytest.mark.parametrize("offloads", [0, OFFLOADS], ids=["plain", "offloads"])
@pytest.mark.parametrize("tap", [False, True], ids=["tun", "tap"])
def test_tcp_through_a_middlebox_handler(make_netns: Callable[[], NetNamespace], tmp_path: Path,
                                         tap: bool, offloads: int, v6: bool) -> None:
    log = tmp_path / "seen"
    up, down = os.urandom(1 << 20), os.urandom(1 << 20)
    with middlebox(make_netns, tap=tap, offloads=offloads, hdr_size=12 if tap else 10,
                   handler=checking(log, tap)) as (a, b, ns2, pool):
        assert tcp_exchange(ns2, v6, up, down) == (up, down)
        time.sleep(0.2)  # the last ACKs
        qa, _qb = reconcile(a, b, ns2, pool)
    assert not seen(log), seen(log)[:5]
    handled = len(seen(log.with_suffix(".count")))
    assert handled >= (2 << 20) // 1500  # every wire packet went through the handler
    if offloads:
        assert qa.read_wire_packets > qa.read_packets  # A handed out super-packets, split here
        assert qa.written_wire_packets > qa.written_packets  # B's segments joined for A


@pytest.mark.parametrize("unchanged", [True, False], ids=["unchanged", "copied"])
def test_super_packets_a_handler_returns_unchanged_are_written_whole(
        make_netns: Callable[[], NetNamespace], unchanged: bool) -> None:  # fmt: skip
    """A handler that returns every segment of a TSO read as it got them (the same objects):
    the read is written whole, as the kernel made it; copies of them are new packets,
    written as wire packets (coalescing is off here, so nothing else could join them)."""
    up, down = os.urandom(1 << 20), os.urandom(1 << 20)

    def handler(pkt: Any) -> object:
        return pkt if unchanged else bytearray(pkt)  # (bytes(b) of a bytes is b itself)

    with middlebox(make_netns, tap=False, offloads=OFFLOADS, b_offloads=OFFLOADS,
                   handler=handler, coalesce=False) as (a, b, ns2, pool):
        assert tcp_exchange(ns2, False, up, down) == (up, down)
        time.sleep(0.2)  # the last ACKs
        qa, qb = reconcile(a, b, ns2, pool)
    assert qa.read_wire_packets > qa.read_packets  # A handed out super-packets
    if unchanged:
        assert qb.written_wire_packets > qb.written_packets  # ... written to B whole
    else:
        assert qb.written_wire_packets == qb.written_packets


@pytest.mark.parametrize("v6", [False, True], ids=["ipv4", "ipv6"])
@pytest.mark.parametrize("b_pi", [False, True], ids=["b-plain", "b-pi"])
def test_udp_through_a_middlebox_keeps_every_datagram(make_netns: Callable[[], NetNamespace],
                                                       tmp_path: Path, v6: bool,
                                                       b_pi: bool) -> None:
    """USO super-packets from A are split for B (PI on one side only, virtio-net header on
    the other); datagrams from B are coalesced into USO writes for A."""
    log = tmp_path / "seen"
    count, size = 200, 1000
    sent = [i.to_bytes(4, "big") + os.urandom(size - 4) for i in range(count)]
    with middlebox(make_netns, tap=False, offloads=OFFLOADS, b_pi=b_pi,
                   handler=checking(log, False)) as (a, b, ns2, pool):
        client, server = udp_pair(ns2, v6)
        with client, server:
            client.setsockopt(SOL_UDP, UDP_SEGMENT, size)  # USO super-packets out of A
            for i in range(0, count, 20):
                client.send(b"".join(sent[i: i + 20]))
                time.sleep(0.002)
            assert [server.recv(65536) for _ in range(count)] == sent
            for d in sent:
                server.send(d)
            assert [client.recv(65536) for _ in range(count)] == sent
        time.sleep(0.1)
        qa, _qb = reconcile(a, b, ns2, pool)
    assert not seen(log), seen(log)[:5]
    assert qa.read_wire_packets >= qa.read_packets + count // 2  # USO split


@pytest.mark.parametrize("v6", [False, True], ids=["ipv4", "ipv6"])
@pytest.mark.parametrize("tap", [False, True], ids=["tun", "tap"])
def test_datagrams_a_handler_returns_unchanged_are_joined_as_plain_forward_joins_them(
        make_netns: Callable[[], NetNamespace], tmp_path: Path, tap: bool,
        v6: bool) -> None:  # fmt: skip
    """Devices of one layout, both with offloads: a drain of single datagrams (decoded in C
    where it is built) goes through the handler as complete wire packets; what comes back
    unchanged is written as the reads, joined into USO writes by the C loop, and B's socket
    gets every datagram in order."""
    log = tmp_path / "seen"
    count, size = 300, 200
    sent = [i.to_bytes(4, "big") + os.urandom(size - 4) for i in range(count)]
    with middlebox(make_netns, tap=tap, offloads=OFFLOADS, b_offloads=OFFLOADS,
                   hdr_size=12 if tap else 10, handler=checking(log, tap)) as (
            a, b, ns2, pool):  # fmt: skip
        client, server = udp_pair(ns2, v6)
        with client, server:
            client.send(b"hello")  # the neighbours resolved first (TAP): packets the kernel
            assert server.recv(65536) == b"hello"  # holds for ARP can go out of order
            for i in range(0, count, 50):  # bursts: the (slow, checking) handler drains many
                for d in sent[i: i + 50]:
                    client.send(d)
                time.sleep(0.002)
            got = [server.recv(65536) for _ in range(count)]
            order = [int.from_bytes(g[:4], "big") for g in got]
            assert order == list(range(count)), str(order)
            assert got == sent
        time.sleep(0.1)
        _qa, qb = reconcile(a, b, ns2, pool)
    assert not seen(log), seen(log)[:5]
    assert len(seen(log.with_suffix(".count"))) >= count  # the handler saw every datagram
    if accel.coalesce_reads() is not None:  # the C loop: drains of datagrams joined
        assert qb.written_wire_packets > qb.written_packets
    assert qb.written_wire_packets >= count


def test_a_plain_forward_drain_written_in_c_counts_every_refused_write_once(
        make_netns: Callable[[], NetNamespace]) -> None:
    """No handler, one layout: a drain of a few plain reads is written in the call that read
    it (`RelayDrain`, in C where built). While B is down every write fails (EIO): the rest of the
    drain goes the Python way, and each datagram is one write error and one link-down drop,
    never two; once B is up again every datagram arrives. The counters reconcile throughout."""
    with middlebox(make_netns, tap=False, offloads=OFFLOADS, b_offloads=OFFLOADS) as (
            a, b, ns2, pool):  # fmt: skip
        client, server = udp_pair(ns2, False)
        with client, server:
            def send_spaced(payloads: list[bytes]) -> None:
                for p in payloads:  # one datagram a drain: small enough to be relayed
                    client.send(p)
                    time.sleep(0.02)

            send_spaced([b"before %d" % i for i in range(3)])
            assert [server.recv(100) for _ in range(3)] == [b"before %d" % i for i in range(3)]
            _qa, qb = reconcile(a, b, ns2, pool)
            assert qb.write_errors == 0 and qb.written_wire_packets >= 3
            with ns2.enter():
                b.link.down()
            send_spaced([b"lost %d" % i for i in range(5)])
            time.sleep(0.1)
            _qa, down = reconcile(a, b, ns2, pool)
            assert down.write_errors - qb.write_errors >= 5
            assert down.dropped.get("link-down", 0) == down.write_errors  # each counted once
            with ns2.enter():
                b.link.up()
            time.sleep(0.1)
            send_spaced([b"after %d" % i for i in range(3)])
            assert [server.recv(100) for _ in range(3)] == [b"after %d" % i for i in range(3)]
            reconcile(a, b, ns2, pool)


@pytest.mark.parametrize("tap", [False, True], ids=["tun", "tap"])
def test_a_handler_that_drops_one_udp_port_drops_exactly_that_flow(
        make_netns: Callable[[], NetNamespace], tap: bool) -> None:
    blocked = 5999

    def drop_port(pkt: Any) -> object:
        raw = bytes(pkt)
        ip = raw[14:] if tap else raw
        if tap and raw[12:14] != b"\x08\x00":
            return pkt
        if ip[0] >> 4 == 4 and ip[9] == 17:
            ports = struct.unpack_from("!HH", ip, (ip[0] & 15) * 4)
            if blocked in ports:
                return None
        return pkt

    with middlebox(make_netns, tap=tap, offloads=OFFLOADS,
                   handler=drop_port) as (a, b, ns2, pool):
        with ns2.enter():
            srv_ok = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            srv_blocked = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        cli = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        back = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        with srv_ok, srv_blocked, cli, back:
            srv_ok.bind((B4, 5000))
            srv_blocked.bind((B4, blocked))
            back.bind((A4, blocked))
            for s in (srv_ok, srv_blocked, back):
                s.settimeout(0.5)
            for i in range(20):
                cli.sendto(b"ok%d" % i, (B4, 5000))
                cli.sendto(b"no%d" % i, (B4, blocked))
                srv_ok.sendto(b"back%d" % i, (A4, blocked))  # the other way
            got: list[bytes] = []
            with contextlib.suppress(TimeoutError):
                while len(got) < 20:
                    got.append(srv_ok.recv(100))
            assert got == [b"ok%d" % i for i in range(20)]
            with pytest.raises(TimeoutError):
                srv_blocked.recv(100)
            with pytest.raises(TimeoutError):
                back.recv(100)
        time.sleep(0.1)
        qa, qb = reconcile(a, b, ns2, pool)
        assert qa.dropped.get("filtered") == 20 and qb.dropped.get("filtered") == 20


def test_super_packet_mode_sees_the_offload_metadata(make_netns: Callable[[], NetNamespace],
                                                      tmp_path: Path) -> None:
    log = tmp_path / "meta"

    def record(sp: SuperPacket) -> object:
        assert isinstance(sp, SuperPacket) and isinstance(sp.offload, VnetHeader)
        if sp.offload.gso_type:
            note(log, f"{sp.offload.gso_type} {sp.offload.gso_size} {sp.segments}")
        return sp

    up = os.urandom(1 << 20)
    with middlebox(make_netns, tap=False, offloads=OFFLOADS, super_packets=True,
                   handler_ab=record) as (a, b, ns2, pool):
        assert tcp_exchange(ns2, False, up, b"")[0] == up
        time.sleep(0.2)
        reconcile(a, b, ns2, pool)
    lines = [tuple(map(int, line.split())) for line in seen(log)]
    assert lines, "no super-packet reached the handler"
    assert all(t == VIRTIO_NET_HDR_GSO_TCPV4 and 0 < size <= 1460 and n > 1
               for t, size, n in lines), lines[:5]


def test_batch_mode_hands_a_drain_to_the_handler(make_netns: Callable[[], NetNamespace],
                                                 tmp_path: Path) -> None:
    log = tmp_path / "batches"

    def batch(pkts: list[Any]) -> object:
        assert isinstance(pkts, list)
        note(log, str(len(pkts)))
        return [p for p in pkts if b"drop-me" not in bytes(p)]

    with middlebox(make_netns, tap=False, offloads=OFFLOADS, batch=True,
                   handler=batch) as (a, b, ns2, pool):
        client, server = udp_pair(ns2, False)
        with client, server:
            for i in range(60):
                client.send(b"drop-me" if i % 3 == 0 else b"keep %d" % i)
            want = [b"keep %d" % i for i in range(60) if i % 3]
            got = [server.recv(100) for _ in want]
            assert got == want
        time.sleep(0.1)
        qa, _qb = reconcile(a, b, ns2, pool)
        assert qa.dropped.get("filtered", 0) >= 20  # what a batch handler leaves out
    assert sum(map(int, seen(log))) >= 60


def test_a_malformed_super_packet_counts_every_wire_packet(
        make_netns: Callable[[], NetNamespace], tmp_path: Path) -> None:
    """A super-packet B cannot take (plain B: split fails) and one the kernel refuses (B with
    offloads: EINVAL) each count the wire packets they said they held, with a reason; the
    pool's figures still reconcile with the kernel's."""
    bad_header = VnetHeader(flags=1, gso_type=VIRTIO_NET_HDR_GSO_TCPV4, hdr_len=54,
                            gso_size=100, csum_start=4000, csum_offset=16)

    log = tmp_path / "spoiled"

    def spoil(sp: SuperPacket) -> object:
        if sp.offload.gso_type:
            note(log, str(sp.segments))
            return SuperPacket(sp.data[:40], bad_header, sp.segments)  # hdr_len past its end
        return sp

    for b_offloads, reason in ((0, "malformed"), (OFFLOADS, "refused")):
        log.unlink(missing_ok=True)
        with middlebox(make_netns, tap=False, offloads=OFFLOADS, b_offloads=b_offloads,
                       super_packets=True, handler_ab=spoil) as (a, b, ns2, pool):
            with contextlib.suppress(OSError):  # the stream cannot get through
                family = socket.AF_INET
                with ns2.enter():
                    listener = socket.socket(family, socket.SOCK_STREAM)
                with listener:
                    listener.bind((B4, 0))
                    listener.listen(1)
                    with socket.create_connection(listener.getsockname()[:2],
                                                  timeout=2) as c:
                        c.settimeout(2)
                        c.sendall(os.urandom(200_000))
            time.sleep(0.3)
            _qa, qb = reconcile(a, b, ns2, pool)
            drops = qb.dropped.get(reason, 0) + _qa.dropped.get(reason, 0)
            spoiled = [int(n) for n in seen(log)]
            assert spoiled and drops == sum(spoiled) > len(spoiled), (spoiled, _qa, qb)


@pytest.mark.parametrize("b_pi", [False, True], ids=["b-plain", "b-pi"])
@pytest.mark.parametrize("offloads", [0, OFFLOADS], ids=["plain", "offloads"])
def test_forward_between_devices_whose_headers_differ(make_netns: Callable[[], NetNamespace],
                                                      offloads: int, b_pi: bool) -> None:
    """A virtio-net header on A only, PI on B or not, no handler: the headers are converted
    (on 0.1 A's header bytes went to B as packet data and every packet was refused)."""
    up, down = os.urandom(300_000), os.urandom(300_000)
    with middlebox(make_netns, tap=False, offloads=offloads, b_pi=b_pi) as (a, b, ns2, pool):
        assert tcp_exchange(ns2, False, up, down) == (up, down)
        time.sleep(0.2)
        qa, qb = reconcile(a, b, ns2, pool)
    assert not qa.dropped.get("refused") and not qb.dropped.get("refused")


def test_tun_to_tap_is_converted_both_ways(make_netns: Callable[[], NetNamespace]) -> None:
    """A TUN here, a TAP in ns2: IP packets get the Ethernet header `ethernet=` gives on the
    way to the TAP, frames lose theirs on the way back (ARP is refused: a static neighbour
    stands for it)."""
    import json
    import subprocess

    ns2 = make_netns()
    mac = b"\x02\x00\x00\x00\x00\x01"
    a = Device.create("dpu%d")
    with ns2.enter():
        b = Device.create("dpv%d", tap=True)
    with a, b:
        a.link.add_address(f"{A4}/24")
        a.link.up()
        with ns2.enter():
            b.link.add_address(f"{B4}/24")
            b.link.up()
        info = json.loads(subprocess.run(ns2.command(["ip", "-j", "link", "show", b.name]),
                                         capture_output=True, check=True, text=True).stdout)
        b_mac = bytes.fromhex(info[0]["address"].replace(":", ""))
        ns2.run(["ip", "neigh", "add", A4, "lladdr", "02:00:00:00:00:01", "dev", b.name])
        with WorkerPool.forward(a, b, ethernet=(mac, b_mac), loop=LoopConfig(mode="epoll")):
            up, down = os.urandom(200_000), os.urandom(200_000)
            assert tcp_exchange(ns2, False, up, down) == (up, down)


def test_routes_between_tun_and_tap_are_converted_or_refused_when_built() -> None:
    with Device.create("dpt%d") as tun, Device.create("dpp%d", tap=True) as tap:
        with pytest.raises(InvalidArgumentError, match="ethernet"):
            WorkerPool.forward(tun, tap)
        WorkerPool.forward(tun, tap, ethernet=(b"\x02" + bytes(5), b"\x02" + bytes(4) + b"\x01"))


def swapped(pkt: Any) -> bytes:
    """An IPv4 UDP packet back to its sender: addresses and ports swapped (the checksums,
    sums of the same words, stay right)."""
    b = bytearray(pkt)
    ihl = (b[0] & 15) * 4
    b[12:16], b[16:20] = b[16:20], b[12:16]
    b[ihl: ihl + 2], b[ihl + 2: ihl + 4] = b[ihl + 2: ihl + 4], b[ihl: ihl + 2]
    return bytes(b)


def test_asyncio_batches_of_wire_packets_and_coalesced_sends() -> None:
    """AsyncQueue on a virtio-net device with offloads: USO super-packets come out as wire
    packets (within the MTU, checksums complete), a batch sent back is coalesced into USO
    writes, and the sender gets exactly its datagrams, in order."""
    import asyncio

    from mqtun.runtime.aio import AsyncQueue

    count, size = 40, 1000
    sent = [i.to_bytes(4, "big") + os.urandom(size - 4) for i in range(count)]
    with Device.create("dpq%d", vnet_hdr=True) as dev:
        enable_offloads(dev, OFFLOADS)
        dev.link.add_address(f"{A4}/24")
        dev.link.up()
        queue = dev.queues[0]  # closed with the device, a queue leaves dev.queues
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, 16 << 20)
            s.bind((A4, 0))
            s.settimeout(TIMEOUT)
            s.setsockopt(SOL_UDP, UDP_SEGMENT, size)
            bad: list[str] = []
            batches: list[int] = []

            async def main() -> None:
                aq = AsyncQueue(queue, max_buffered=256, batch=64)
                s.sendto(b"".join(sent[:20]), (B4, 7))
                s.sendto(b"".join(sent[20:]), (B4, 7))
                got = 0
                while got < count:
                    pkts = await asyncio.wait_for(aq.recv_batch(), TIMEOUT)
                    batches.append(len(pkts))
                    udp = [p for p in pkts if p[0] >> 4 == 4 and p[9] == 17]
                    for p in udp:
                        bad.extend(problems(p, False, 1500))
                    got += len(udp)
                    assert await aq.send_batch(swapped(p) for p in udp) == len(udp)
                aq.close()

            before = dev.link.stats()["rx_packets"]
            asyncio.run(main())
            back = [s.recv(65536) for _ in range(count)]
            writes = dev.link.stats()["rx_packets"] - before
    assert not bad, bad[:5]
    assert back == sent
    assert max(batches) > 1  # a super-packet's segments came as one batch
    assert writes < count  # the kernel took USO super-packets
    st = queue.stats
    assert st.written_wire_packets >= count and st.written_packets < st.written_wire_packets


def test_packet_io_uses_the_devices_own_header_size_and_byte_order() -> None:
    """PacketIO on a device with a 12-byte little-endian virtio-net header: USO from a socket
    comes out as wire packets, and what is written back is coalesced with the header the
    device expects (the kernel takes the USO writes: rx_frame_errors stays 0)."""
    from mqtun.runtime import PacketIO

    count, size = 30, 900
    sent = [i.to_bytes(4, "big") + os.urandom(size - 4) for i in range(count)]
    with Device.create("dpi%d", vnet_hdr=True) as dev:
        dev.set_vnet_hdr_size(12)
        dev.set_vnet_le(True)
        enable_offloads(dev, OFFLOADS)
        dev.link.add_address(f"{A4}/24")
        dev.link.up()
        io = PacketIO(dev.queues[0])
        assert io.path.source.vnet_hdr_size == 12 and io.path.source.vnet_le is True
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, 16 << 20)
            s.bind((A4, 0))
            s.settimeout(TIMEOUT)
            s.setsockopt(SOL_UDP, UDP_SEGMENT, size)
            s.sendto(b"".join(sent), (B4, 7))
            got: list[bytes] = []
            deadline = time.monotonic() + TIMEOUT
            while len(got) < count and time.monotonic() < deadline:
                got += [p for p in io.read(64, 0.5) if p[0] >> 4 == 4 and p[9] == 17]
            assert len(got) == count and all(len(p) == 28 + size for p in got)
            assert not [x for p in got for x in problems(p, False, 1500)]
            before = dev.link.stats()
            assert io.write([swapped(p) for p in got]) == count
            back = [s.recv(65536) for _ in range(count)]
            after = dev.link.stats()
    assert back == sent
    assert after["rx_frame_errors"] == before["rx_frame_errors"] == 0
    assert after["rx_packets"] - before["rx_packets"] < count  # USO writes
