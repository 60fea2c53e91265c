"""Offloads against the real kernel: super-packets in, split in userspace, coalesced writes out.

Topology (one test, two network namespaces):

    ns1 (the test's own)                 userspace bridge                 ns2
    client socket -> A (vnet, offloads)  ==A->B: split==>  B (plain) -> server socket
                 <-                      <==B->A: coalesce==           <-

A hands out super-packets (TSO/USO) or partial checksums (CSUM); the bridge splits them and
writes wire packets into B, which has neither offloads nor a virtio-net header, so ns2's stack
checks every checksum the bridge made. Back the other way, B's wire packets are coalesced into
super-packets and written to A, which the kernel takes only if every header is right
(rx_frame_errors stays 0) and ns1's stack then delivers byte for byte.
"""

from __future__ import annotations

import contextlib
import errno
import os
import select
import socket
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator

import nettools
import pytest

import mqtun
from mqtun import Device
from mqtun._uapi import SO_RCVBUFFORCE, SOL_UDP, UDP_SEGMENT
from mqtun.errors import InvalidArgumentError, MqtunError
from mqtun.netns import NetNamespace
from mqtun.offload import (
    Offloads,
    check_offloads,
    enable_offloads,
    probe_offloads,
    read_packets,
    write_coalesced,
    write_packet,
)
from mqtun.packet import ZERO_HEADER, split

A4, B4, NET4 = "198.18.0.1", "198.18.0.2", 24
A6, B6, NET6 = "fd00:6d71::1", "fd00:6d71::2", 64
TIMEOUT = 20.0


class Bridge:
    """A userspace wire between a vnet device A and a plain device B, on its own thread."""

    def __init__(self, a: Device, b: Device, *, coalesce: bool = True, udp: bool = True) -> None:
        self.a, self.b = a, b
        self.coalesce, self.udp = coalesce, udp
        self.stats: Counter[str] = Counter()
        self.errors: list[BaseException] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="bridge")

    def __enter__(self) -> Bridge:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)

    def _run(self) -> None:
        qa, qb = self.a.queues[0], self.b.queues[0]
        poller = select.poll()
        poller.register(qa.fileno(), select.POLLIN)
        poller.register(qb.fileno(), select.POLLIN)
        tap = self.a.tap
        try:
            while not self._stop.is_set():
                for fd, _ in poller.poll(20):
                    if fd == qa.fileno():
                        for hdr, packet in read_packets(qa, 64):
                            self.stats["a_in"] += 1
                            self.stats["a_in_gso"] += hdr.is_gso
                            self.stats["a_in_tunnel"] += hdr.is_tunnel
                            self.stats["a_in_csum"] += hdr.needs_csum
                            for seg in split(hdr, packet, tap=tap):
                                self._write(qb, seg)
                    else:
                        packets = qb.read_batch(64, 0)
                        self.stats["b_in"] += len(packets)
                        if self.coalesce:
                            self.stats["a_out"] += write_coalesced(qa, packets, udp=self.udp)
                        else:
                            for p in packets:
                                write_packet(qa, ZERO_HEADER, p)
        except BaseException as exc:  # reported by the test, never lost in the thread
            self.errors.append(exc)

    def _write(self, queue: object, packet: bytes) -> None:
        try:
            queue.write(packet)  # type: ignore[attr-defined]
        except MqtunError as exc:
            if exc.errno != errno.EIO:  # link still coming up
                raise


@contextlib.contextmanager
def wired(
    make_netns: Callable[[], NetNamespace],
    *,
    tap: bool,
    offloads: int,
    hdr_size: int = 10,
    coalesce: bool = True,
    udp: bool = True,
) -> Iterator[tuple[Device, Device, NetNamespace, Bridge]]:
    """A in this namespace, B in a new one, addresses on both, the bridge running."""
    ns2 = make_netns()
    a = Device.create("offa%d", tap=tap, vnet_hdr=True, blocking=False)
    with ns2.enter():
        b = Device.create("offb%d", tap=tap, blocking=False)
    with a, b:
        if hdr_size != 10:
            a.set_vnet_hdr_size(hdr_size)
        enable_offloads(a, offloads)
        for dev, addr4, addr6, where in ((a, A4, A6, None), (b, B4, B6, ns2)):
            with ns2.enter() if where else contextlib.nullcontext():
                dev.link.add_address(f"{addr4}/{NET4}")
                dev.link.add_address(f"{addr6}/{NET6}")
                dev.link.up()
        with Bridge(a, b, coalesce=coalesce, udp=udp) as bridge:
            _wait_dad(ns2)
            yield a, b, ns2, bridge
        assert not bridge.errors, bridge.errors


def _wait_dad(ns2: NetNamespace) -> None:
    """IPv6 addresses are usable once duplicate address detection is over (bounded)."""
    deadline = time.monotonic() + 5
    for where in (None, ns2):
        while time.monotonic() < deadline:
            with ns2.enter() if where else contextlib.nullcontext():
                out = os.popen("ip -6 addr show tentative").read()
            if "fd00:6d71" not in out:
                break
            time.sleep(0.05)


# ---- traffic ----------------------------------------------------------------------------------


def tcp_exchange(ns2: NetNamespace, v6: bool, up: bytes, down: bytes) -> tuple[bytes, bytes]:
    return nettools.tcp_exchange(ns2, B6 if v6 else B4, up, down, TIMEOUT)


def udp_exchange(
    ns2: NetNamespace, v6: bool, count: int, size: int
) -> tuple[list[bytes], list[bytes], list[bytes]]:
    """Each side sends `count` datagrams of `size` bytes with UDP GSO (UDP_SEGMENT): the
    client's leave A as USO super-packets (if enabled), the server's leave B's software GSO as
    a burst of wire packets, which the bridge coalesces.

    Returns (sent, what the server got, what the client got).
    """
    family = socket.AF_INET6 if v6 else socket.AF_INET
    a_addr, b_addr = (A6, B6) if v6 else (A4, B4)
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
        client.setsockopt(SOL_UDP, UDP_SEGMENT, size)  # one send, many datagrams: USO
        for i in range(0, count, 40):
            client.send(b"".join(sent[i : i + 40]))
            time.sleep(0.002)
        got_server = [server.recv(65536) for _ in range(count)]
        server.connect(client.getsockname()[:2])
        server.setsockopt(SOL_UDP, UDP_SEGMENT, size)
        for i in range(0, count, 40):
            server.send(b"".join(got_server[i : i + 40]))
            time.sleep(0.002)
        got_client = [client.recv(65536) for _ in range(count)]
    return sent, got_server, got_client


def frame_errors(dev: Device) -> int:
    return int(dev.link.stats().get("rx_frame_errors", 0))


# ---- the round trips -------------------------------------------------------------------------

OFFLOAD_SETS = {
    "csum": Offloads.CSUM,
    "tso": Offloads.CSUM | Offloads.TSO | Offloads.TSO_ECN,
    "tso+uso": Offloads.CSUM | Offloads.TSO | Offloads.USO,
}


@pytest.mark.parametrize("v6", [False, True], ids=["ipv4", "ipv6"])
@pytest.mark.parametrize("offloads", list(OFFLOAD_SETS), ids=list(OFFLOAD_SETS))
@pytest.mark.parametrize("tap", [False, True], ids=["tun", "tap"])
def test_tcp_round_trip(make_netns, tap: bool, offloads: str, v6: bool) -> None:
    up, down = os.urandom(3 << 20), os.urandom(2 << 20)
    with wired(make_netns, tap=tap, offloads=OFFLOAD_SETS[offloads]) as (a, b, ns2, bridge):
        got_up, got_down = tcp_exchange(ns2, v6, up, down)
        assert got_up == up
        assert got_down == down
        stats = dict(bridge.stats)
        assert frame_errors(a) == 0
        with ns2.enter():
            assert frame_errors(b) == 0
    assert stats["a_in_csum"] > 0, stats
    if offloads != "csum":
        assert stats["a_in_gso"] > 0, stats  # the kernel did hand out super-packets
    assert stats["a_out"] < stats["b_in"], stats  # and the coalesced writes joined segments


@pytest.mark.parametrize("v6", [False, True], ids=["ipv4", "ipv6"])
@pytest.mark.parametrize("offloads", list(OFFLOAD_SETS), ids=list(OFFLOAD_SETS))
@pytest.mark.parametrize("tap", [False, True], ids=["tun", "tap"])
def test_udp_round_trip(make_netns, tap: bool, offloads: str, v6: bool) -> None:
    with wired(make_netns, tap=tap, offloads=OFFLOAD_SETS[offloads]) as (a, _, ns2, bridge):
        sent, got_server, got_client = udp_exchange(ns2, v6, count=240, size=1200)
        assert got_server == sent  # in order, byte for byte
        assert got_client == sent
        stats = dict(bridge.stats)
        assert frame_errors(a) == 0
    if offloads == "tso+uso":
        assert stats["a_in_gso"] > 0, stats  # USO super-packets came out of A
    assert stats["a_out"] < stats["b_in"], stats  # and USO super-packets went back in


def test_uncoalesced_writes_for_reference(make_netns) -> None:
    """The same wiring without coalescing: every packet written as it came."""
    up, down = os.urandom(1 << 20), os.urandom(1 << 20)
    with wired(make_netns, tap=False, offloads=OFFLOAD_SETS["tso"], coalesce=False) as w:
        a, _, ns2, bridge = w
        assert tcp_exchange(ns2, False, up, down) == (up, down)
        assert bridge.stats["a_out"] == 0 and frame_errors(a) == 0


@pytest.mark.parametrize("outer_v6", [False, True], ids=["outer4", "outer6"])
@pytest.mark.parametrize("tap", [False, True], ids=["tun", "tap"])
def test_vxlan_tunnel_super_packets(make_netns, tap: bool, outer_v6: bool) -> None:
    """TCP over VXLAN over A: tunnel super-packets, split (outer and inner) in userspace.

    The kernel hands out UDP-tunnel GSO packets only for tunnels with an outer UDP checksum
    (vxlan udpcsum) and with UDP_TUNNEL_GSO_CSUM set; the bridge's coalescing then joins the
    VXLAN datagrams coming back into USO super-packets.
    """
    offloads = Offloads.CSUM | Offloads.TSO | Offloads.USO | Offloads.UDP_TUNNEL_GSO
    offloads |= Offloads.UDP_TUNNEL_GSO_CSUM
    local, remote = (A6, B6) if outer_v6 else (A4, B4)
    with wired(make_netns, tap=tap, offloads=offloads, hdr_size=24) as (a, b, ns2, bridge):
        for where, dev, here, there, inner in (
            (None, a, local, remote, "198.19.0.1/24"),
            (ns2, b, remote, local, "198.19.0.2/24"),
        ):
            with ns2.enter() if where else contextlib.nullcontext():
                _ip("link", "add", "vx0", "type", "vxlan", "id", "42", "dstport", "4789",
                    "local", here, "remote", there, "dev", dev.name, "udpcsum")  # fmt: skip
                _ip("addr", "add", inner, "dev", "vx0")
                _ip("link", "set", "vx0", "up")
        up, down = os.urandom(2 << 20), os.urandom(1 << 20)
        with ns2.enter():
            listener = socket.socket()
        got_up, got_down = _tcp_over(listener, "198.19.0.2", up, down)
        assert got_up == up and got_down == down
        stats = dict(bridge.stats)
        assert frame_errors(a) == 0
    assert stats["a_in_tunnel"] > 0, stats
    assert stats["a_out"] < stats["b_in"], stats


def _ip(*args: str) -> None:
    import subprocess

    subprocess.run(["ip", *args], check=True, timeout=10, capture_output=True)


def _tcp_over(listener: socket.socket, addr: str, up: bytes, down: bytes) -> tuple[bytes, bytes]:
    received: list[bytes] = []

    def serve() -> None:
        conn, _ = listener.accept()
        with conn:
            conn.settimeout(TIMEOUT)
            chunks = []
            while chunk := conn.recv(1 << 20):
                chunks.append(chunk)
            received.append(b"".join(chunks))
            conn.sendall(down)

    with listener:
        listener.bind((addr, 0))
        listener.listen(1)
        listener.settimeout(TIMEOUT)
        server = threading.Thread(target=serve, daemon=True)
        server.start()
        with socket.create_connection((addr, listener.getsockname()[1]), timeout=TIMEOUT) as c:
            c.sendall(up)
            c.shutdown(socket.SHUT_WR)
            chunks = []
            while chunk := c.recv(1 << 20):
                chunks.append(chunk)
        server.join(TIMEOUT)
    return (received[0] if received else b""), b"".join(chunks)


# ---- masks: the library's rules against the kernel's -------------------------------------------


def test_check_offloads_agrees_with_the_kernel_on_every_mask() -> None:
    with Device.create("offp%d", vnet_hdr=True) as dev:
        for mask in range(0x400):
            try:
                dev.set_offloads(mask)
                kernel_ok = True
            except MqtunError as exc:
                assert exc.errno == errno.EINVAL
                kernel_ok = False
            try:
                check_offloads(mask)
                ours_ok = True
            except InvalidArgumentError:
                ours_ok = False
            assert ours_ok == kernel_ok, f"mask {mask:#x}: kernel {kernel_ok}, ours {ours_ok}"


def _kernel_tso(name: str) -> bool:
    """Whether the kernel has TSO on for `name` (its ethtool feature, read without mqtun)."""
    from pyroute2.ethtool.ioctl import IoctlEthtool

    eth = IoctlEthtool(name)
    try:
        return bool(eth.get_features()["tx-tcp-segmentation"])
    finally:
        eth.close()


def test_probe_finds_this_kernels_offloads_and_never_touches_a_device_in_use() -> None:
    tso = Offloads.CSUM | Offloads.TSO
    with Device.create("offp%d", vnet_hdr=True, multi_queue=True, offloads=int(tso)) as owner, \
            Device.attach(owner.name) as other:
        found = probe_offloads(other)
        assert found >= Offloads.CSUM | Offloads.TSO | Offloads.TSO_ECN | Offloads.USO
        assert _kernel_tso(owner.name), "the owner's TSO is still on"
        assert owner.offloads == other.offloads == tso
    assert not [i for i in mqtun.list_tun_links() if i.name.startswith("mqprobe")]


def test_enable_offloads_refuses_before_the_kernel() -> None:
    with Device.create("offp%d") as plain:
        with pytest.raises(InvalidArgumentError, match="virtio-net header"):
            enable_offloads(plain, Offloads.CSUM)
        enable_offloads(plain, 0)  # nothing is always fine
    with Device.create("offp%d", vnet_hdr=True) as dev:
        for bad, why in (
            (Offloads.TSO4, "need CSUM"),
            (Offloads.CSUM | Offloads.USO4, "go together"),
            (Offloads.CSUM | Offloads.TSO_ECN, "TSO_ECN"),
            (Offloads.CSUM | Offloads.UDP_TUNNEL_GSO, "plain segmentation"),
            (Offloads.CSUM | Offloads.TSO4 | Offloads.UDP_TUNNEL_GSO_CSUM, "needs UDP_TUNNEL_GSO"),
            (0x200, "unknown"),
        ):
            with pytest.raises(InvalidArgumentError, match=why):
                enable_offloads(dev, bad)
        with pytest.raises(InvalidArgumentError, match="24-byte"):
            enable_offloads(dev, Offloads.CSUM | Offloads.TSO4 | Offloads.UDP_TUNNEL_GSO)
        assert enable_offloads(dev, Offloads.CSUM | Offloads.TSO) == Offloads.CSUM | Offloads.TSO
