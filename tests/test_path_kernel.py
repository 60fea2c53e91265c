"""runtime.path against the real kernel: what the path writes, the kernel takes and delivers.

Topology (two namespaces): a client socket here -> A (virtio-net header, offloads) == a bridge
thread built only from PacketPath + os.read/os.writev == B (plain, in ns2) -> a server socket.
A hands out super-packets and partial checksums, the path splits and completes them for B (so
ns2's stack checks every checksum the path made); B's wire packets are coalesced into TSO/USO
super-packets for A, which the kernel accepts only if every header is right (rx_frame_errors
stays 0) and then delivers byte for byte. The handler in the middle checks, with scapy, that it
never sees a packet over the MTU or with a partial checksum. The path's per-wire-packet counts
reconcile with the writes the kernel counted (IFLA_STATS64 counts a super-packet once).
"""

from __future__ import annotations

import contextlib
import errno
import os
import select
import socket
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import nettools
import pytest

from mqtun import Device
from mqtun._uapi import SO_RCVBUFFORCE, SOL_UDP, UDP_SEGMENT, VIRTIO_NET_HDR_GSO_TCPV4
from mqtun.netns import NetNamespace
from mqtun.offload import Offloads, enable_offloads
from mqtun.packet import Buffer
from mqtun.runtime.path import Layout, Packet, PacketPath, SuperPacket, WireCounts
from mqtun.stats import DropReason

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    from scapy.layers.inet import IP, TCP, UDP
    from scapy.layers.inet6 import IPv6
    from scapy.layers.l2 import Ether

A4, B4 = "198.18.0.1", "198.18.0.2"
A6, B6 = "fd00:6d71::1", "fd00:6d71::2"
TIMEOUT = 20.0
OFFLOADS = Offloads.CSUM | Offloads.TSO | Offloads.USO

Handler = Callable[[Any], object]  # a wire packet (Buffer) or, super-packet mode, a SuperPacket


def checked(tap: bool, mtu: int, seen: list[str]) -> Handler:
    """A pass-through handler that records every packet over the MTU or with a bad checksum."""

    def handler(pkt: Buffer) -> object:
        raw = bytes(pkt)
        l3 = Ether(raw).payload if tap else (IPv6(raw) if raw[0] >> 4 == 6 else IP(raw))
        if tap and not isinstance(l3, (IP, IPv6)):
            return pkt  # ARP
        if len(bytes(l3)) > mtu:
            seen.append(f"{len(bytes(l3))} bytes over MTU {mtu}")
        for layer in (IP, TCP, UDP):
            if layer in l3:
                got = l3[layer].chksum
                clone = l3.copy()
                del clone[layer].chksum
                want = type(clone)(bytes(clone))[layer].chksum
                if got != want and {got, want} != {0, 0xFFFF}:
                    seen.append(f"{layer.__name__} checksum {got:#x}, should be {want:#x}")
        return pkt

    return handler


Snapshot = tuple[dict[str, int], dict[str, int], dict[int, int]]


class PathBridge:
    """A <-> B through two PacketPaths, on one thread: the I/O shell a runtime would be."""

    def __init__(self, a: Device, b: Device, handler: Handler | None = None,
                 handler_ba: Handler | None = None, *, super_ab: bool = False) -> None:  # fmt: skip
        la, lb = Layout.of(a), Layout.of(b)
        self.ab = PacketPath(la, lb, counter=WireCounts(), super_packets=super_ab)
        self.ba = PacketPath(lb, la, counter=WireCounts())
        self.fds = {a.queues[0].fd: (self.ab, b.queues[0].fd, handler),
                    b.queues[0].fd: (self.ba, a.queues[0].fd, handler_ba)}  # fmt: skip
        self.reads = {id(self.ab): 0, id(self.ba): 0}  # read(2) calls: what the kernel counts
        self.writes = {id(self.ab): 0, id(self.ba): 0}
        self.joined = 0  # writes that held more than one wire packet
        self.errors: list[BaseException] = []
        self.paused = threading.Event()
        self._idle = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="path-bridge")

    def __enter__(self) -> PathBridge:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)

    def _run(self) -> None:
        try:
            poller = select.poll()
            for fd in self.fds:
                poller.register(fd, select.POLLIN)
            while not self._stop.is_set():
                if self.paused.is_set():
                    self._idle.set()
                    time.sleep(0.005)
                    continue
                self._idle.clear()
                for fd, _ in poller.poll(50):
                    self._drain(fd)
        except BaseException as exc:
            self.errors.append(exc)

    def snapshot(self, a: Device, b: Device, ns2: NetNamespace) -> Snapshot:
        """The kernel's counters of A and B and the bridge's write counts, at one moment (the
        bridge held between drains, so nothing is written while they are read)."""
        self.paused.set()
        try:
            assert self._idle.wait(TIMEOUT)
            return stats(a), stats(b, ns2), dict(self.writes)
        finally:
            self._idle.clear()
            self.paused.clear()

    def _drain(self, fd: int) -> None:
        path, out_fd, handler = self.fds[fd]
        bufs: list[bytes] = []
        with contextlib.suppress(BlockingIOError):
            while len(bufs) < 64:
                bufs.append(os.read(fd, 65536 + 64))
        self.reads[id(path)] += len(bufs)
        answers: list[Packet] = []
        if path.super_packets:
            for buf in bufs:
                sp = path.decode_super(buf)
                if sp is not None:
                    path.accept(handler(sp) if handler else sp, answers)
        else:
            for pkt in path.decode_all(bufs):
                path.accept(handler(pkt) if handler else pkt, answers)
        for item in path.encode(answers):
            try:
                os.writev(out_fd, item.parts)
            except OSError as exc:
                path.failed(item, DropReason.REFUSED if exc.errno == errno.EINVAL
                            else DropReason.WRITE_ERROR)  # fmt: skip
            else:
                path.sent(item)
                self.writes[id(path)] += 1
                self.joined += item.packets > 1


Wired = tuple[Device, Device, NetNamespace, PathBridge]


@contextlib.contextmanager
def wired(make_netns: Callable[[], NetNamespace], *, tap: bool, offloads: int, hdr_size: int = 10,
          b_pi: bool = False, handler: Handler | None = None, handler_ba: Handler | None = None,
          b_offloads: int = 0, super_ab: bool = False) -> Iterator[Wired]:  # fmt: skip
    ns2 = make_netns()
    a = Device.create("pka%d", tap=tap, vnet_hdr=True, blocking=False)
    with ns2.enter():
        b = Device.create("pkb%d", tap=tap, packet_info=b_pi, vnet_hdr=bool(b_offloads),
                          blocking=False)  # fmt: skip
    with a, b:
        if hdr_size != 10:
            a.set_vnet_hdr_size(hdr_size)
        if offloads:
            enable_offloads(a, offloads)
        if b_offloads:
            with ns2.enter():
                enable_offloads(b, b_offloads)
        for dev, addr4, addr6, where in ((a, A4, A6, None), (b, B4, B6, ns2)):
            with ns2.enter() if where else contextlib.nullcontext():
                dev.link.add_address(f"{addr4}/24")
                dev.link.add_address(f"{addr6}/64")
                dev.link.up()
        with PathBridge(a, b, handler, handler_ba, super_ab=super_ab) as bridge:
            _wait_dad(ns2)
            yield a, b, ns2, bridge
        assert not bridge.errors, bridge.errors


def _wait_dad(ns2: NetNamespace) -> None:
    deadline = time.monotonic() + 5
    for where in (None, ns2):
        while time.monotonic() < deadline:
            with ns2.enter() if where else contextlib.nullcontext():
                out = os.popen("ip -6 addr show tentative").read()
            if "fd00:6d71" not in out:
                break
            time.sleep(0.05)


def stats(dev: Device, ns: NetNamespace | None = None) -> dict[str, int]:
    with ns.enter() if ns else contextlib.nullcontext():
        return dev.link.stats()


def tcp_exchange(ns2: NetNamespace, v6: bool, up: bytes, down: bytes) -> tuple[bytes, bytes]:
    return nettools.tcp_exchange(ns2, B6 if v6 else B4, up, down, TIMEOUT)


def reconcile(bridge: PathBridge, before: Snapshot, after: Snapshot) -> None:
    """The kernel counts each write once (a super-packet too); the path counts wire packets."""
    (a0, b0, w0), (a1, b1, w1) = before, after
    assert a1["rx_frame_errors"] == 0 and b1["rx_frame_errors"] == 0
    # every write into A (B -> A) and into B (A -> B) was the bridge's
    assert a1["rx_packets"] - a0["rx_packets"] == w1[id(bridge.ba)] - w0[id(bridge.ba)]
    assert b1["rx_packets"] - b0["rx_packets"] == w1[id(bridge.ab)] - w0[id(bridge.ab)]
    for path in (bridge.ab, bridge.ba):
        c = path.counter
        assert isinstance(c, WireCounts)
        # every wire packet read was written or dropped with a reason
        assert c.read == c.written + c.dropped_total, (c, path.source)


@pytest.mark.parametrize("v6", [False, True], ids=["ipv4", "ipv6"])
@pytest.mark.parametrize("offloads", [0, OFFLOADS], ids=["plain", "offloads"])
@pytest.mark.parametrize("tap", [False, True], ids=["tun", "tap"])
def test_tcp_through_the_path(make_netns: Callable[[], NetNamespace], tap: bool,
                              offloads: int, v6: bool) -> None:  # fmt: skip
    up, down = os.urandom(1 << 20), os.urandom(1 << 20)
    seen: list[str] = []
    hdr_size = 12 if tap else 10
    with wired(make_netns, tap=tap, offloads=offloads, hdr_size=hdr_size,
               handler=checked(tap, 1500, seen),
               handler_ba=checked(tap, 1500, seen)) as (a, b, ns2, bridge):  # fmt: skip
        before = bridge.snapshot(a, b, ns2)
        got_up, got_down = tcp_exchange(ns2, v6, up, down)
        assert got_up == up and got_down == down
        time.sleep(0.2)  # the last ACKs
        reconcile(bridge, before, bridge.snapshot(a, b, ns2))
    assert not seen, seen[:5]
    if offloads:
        assert bridge.reads[id(bridge.ab)] < bridge.ab.counter.read  # type: ignore[attr-defined]
        assert bridge.joined > 0  # the kernel took coalesced TSO writes


@pytest.mark.parametrize("v6", [False, True], ids=["ipv4", "ipv6"])
@pytest.mark.parametrize("b_pi", [False, True], ids=["b-plain", "b-pi"])
def test_udp_datagrams_keep_their_boundaries(make_netns: Callable[[], NetNamespace], v6: bool,
                                             b_pi: bool) -> None:  # fmt: skip
    """USO super-packets from A are split for B; a burst from B is coalesced into USO writes
    for A (the bridge is paused while it queues, so that one drain holds it)."""
    family = socket.AF_INET6 if v6 else socket.AF_INET
    a_addr, b_addr = (A6, B6) if v6 else (A4, B4)
    seen: list[str] = []
    count, size = 200, 1000
    with wired(make_netns, tap=False, offloads=OFFLOADS, b_pi=b_pi,
               handler=checked(False, 1500, seen),
               handler_ba=checked(False, 1500, seen)) as (a, b, ns2, bridge):  # fmt: skip
        before = bridge.snapshot(a, b, ns2)
        sent = [i.to_bytes(4, "big") + os.urandom(size - 4) for i in range(count)]
        with ns2.enter():
            server = socket.socket(family, socket.SOCK_DGRAM)
        client = socket.socket(family, socket.SOCK_DGRAM)
        with server, client:
            for s in (server, client):
                s.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, 16 << 20)
                s.settimeout(TIMEOUT)
            server.bind((b_addr, 0))
            client.bind((a_addr, 0))
            client.connect(server.getsockname()[:2])
            client.setsockopt(SOL_UDP, UDP_SEGMENT, size)  # USO super-packets out of A
            for i in range(0, count, 20):
                client.send(b"".join(sent[i : i + 20]))
                time.sleep(0.002)
            got_server = [server.recv(65536) for _ in range(count)]
            assert got_server == sent
            server.connect(client.getsockname()[:2])
            bridge.paused.set()
            time.sleep(0.1)  # the bridge is between drains now
            for d in sent[:60]:  # 60 wire packets queued on B's ring
                server.send(d)
            bridge.paused.clear()
            got_client = [client.recv(65536) for _ in range(60)]
            assert got_client == sent[:60]
        time.sleep(0.1)
        reconcile(bridge, before, bridge.snapshot(a, b, ns2))
    assert not seen, seen[:5]
    assert bridge.joined > 0  # a USO write held several datagrams, and the kernel took it


@pytest.mark.parametrize("tap", [False, True], ids=["tun", "tap"])
def test_a_handler_that_drops_one_port_drops_exactly_that_flow(
    make_netns: Callable[[], NetNamespace], tap: bool
) -> None:
    blocked = 5999

    def drop_port(pkt: Buffer) -> object:
        raw = bytes(pkt)
        l3 = Ether(raw).payload if tap else IP(raw)
        if UDP in l3 and blocked in (l3[UDP].sport, l3[UDP].dport):
            return None
        return pkt

    with wired(make_netns, tap=tap, offloads=OFFLOADS, handler=drop_port,
               handler_ba=drop_port) as (_, _, ns2, bridge):  # fmt: skip
        with ns2.enter():
            open_rx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            blocked_rx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        tx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        with open_rx, blocked_rx, tx:
            open_rx.bind((B4, 6000))
            blocked_rx.bind((B4, blocked))
            for s in (open_rx, blocked_rx):
                s.settimeout(0.5)
            for i in range(30):
                tx.sendto(b"open %d" % i, (B4, 6000))
                tx.sendto(b"blocked %d" % i, (B4, blocked))
            got = [open_rx.recv(100) for _ in range(30)]
            assert got == [b"open %d" % i for i in range(30)]
            with pytest.raises(TimeoutError):
                blocked_rx.recv(100)
    counts = bridge.ab.counter
    assert isinstance(counts, WireCounts)
    assert counts.dropped == {DropReason.FILTERED: 30}


@pytest.mark.parametrize("b_offloads", [0, OFFLOADS], ids=["to-plain", "to-offloads"])
def test_super_packet_mode_sees_the_offload_metadata(make_netns: Callable[[], NetNamespace],
                                                     b_offloads: int) -> None:  # fmt: skip
    """A forwarder that takes super-packets whole: written whole where B takes them, else cut."""
    kinds: list[tuple[int, int, int]] = []

    def record(sp: SuperPacket) -> object:
        kinds.append((sp.offload.gso_type, sp.offload.gso_size, sp.segments))
        return sp

    up, down = os.urandom(1 << 20), os.urandom(256 << 10)
    with wired(make_netns, tap=False, offloads=OFFLOADS, b_offloads=b_offloads,
               handler=record, super_ab=True) as (a, b, ns2, bridge):
        before = bridge.snapshot(a, b, ns2)
        assert tcp_exchange(ns2, False, up, down) == (up, down)
        time.sleep(0.2)
        reconcile(bridge, before, bridge.snapshot(a, b, ns2))
    supers = [k for k in kinds if k[0] == VIRTIO_NET_HDR_GSO_TCPV4]
    assert supers and all(size > 0 and n >= 1 for _, size, n in supers)
    c = bridge.ab.counter
    assert isinstance(c, WireCounts)
    assert c.read == sum(n for _, _, n in kinds)
    if b_offloads:  # B took them whole: fewer writes than wire packets
        assert bridge.writes[id(bridge.ab)] < c.written
    else:
        assert bridge.writes[id(bridge.ab)] == c.written
