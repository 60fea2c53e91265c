"""The data-path I/O of a WireGuard endpoint: one TUN queue and one UDP socket, with offloads.

Shared by the single-process `Endpoint` and each worker of `MultiEndpoint`, so both move
packets the same way:

- TUN -> wire: a queue with a virtio-net header and TSO/USO hands out super-packets of up to
  64 KB; `read_tun` splits each once (`mqtun.packet.split_train`, which also completes a
  partial checksum, into one buffer), so every wire packet is encrypted on its own and the
  segments of one read share their route. They are sealed into one buffer too
  (`Session.seal_many`), which `send_datagrams` sends with UDP GSO (`UdpEndpoint.send_train`:
  up to 64 datagrams in one sendmsg).
- wire -> TUN: the socket reads with UDP_GRO, so one read may hold a train of datagrams (a
  peer's UDP GSO send, or the kernel's GRO), cut at the segment size the cmsg gives
  (`receive_datagrams`); the packets they decrypt to are joined by `write_tun` into
  super-packets (`mqtun.packet.coalesce`) and written with their virtio-net header, one TUN
  write for a whole run of a flow.

Without offloads (`offloaded=False`: a queue without a virtio-net header) the same functions
read, send and write one packet at a time. Nothing here knows WireGuard: the datagrams and
packets are bytes.
"""

from __future__ import annotations

import contextlib
import socket
from collections.abc import Sequence
from typing import TYPE_CHECKING

from mqtun import _uapi
from mqtun.errors import MqtunError
from mqtun.offload import Offloads, read_packets, write_packet
from mqtun.packet import ZERO_HEADER, MalformedPacket, coalesce
from mqtun.packet.gso import Train, split_train
from mqtun.packet.headers import Buffer
from mqtun.runtime.sockets import UdpEndpoint
from mqtun.stats import DropReason

if TYPE_CHECKING:
    from mqtun.queue import Queue
    from mqtun.wireguard.core import Datagram

__all__ = ["TUN_OFFLOADS", "Outbox", "plain_address", "read_tun", "receive_datagrams",
           "send_datagrams", "tune_socket", "wire_address", "write_tun"]

TUN_OFFLOADS = Offloads.CSUM | Offloads.TSO4 | Offloads.TSO6 | Offloads.USO
SOCKET_BUFFER = 4 << 20  # a burst of a few thousand datagrams waits here, not in a drop


def tune_socket(sock: socket.socket, *, gro: bool) -> None:
    """Big socket buffers (best effort: FORCE needs CAP_NET_ADMIN) and, if asked, UDP_GRO."""
    for force, plain in ((_uapi.SO_RCVBUFFORCE, socket.SO_RCVBUF),
                         (_uapi.SO_SNDBUFFORCE, socket.SO_SNDBUF)):
        try:
            sock.setsockopt(socket.SOL_SOCKET, force, SOCKET_BUFFER)
        except OSError:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, plain, SOCKET_BUFFER)
    if gro:
        sock.setsockopt(_uapi.SOL_UDP, _uapi.UDP_GRO, 1)


def read_tun(queue: Queue, offloaded: bool, batch: int) -> list[Sequence[Buffer]]:
    """Up to `batch` reads of `queue`, each as the wire packets it stands for (one packet, or
    a super-packet's segments: views of the one buffer `split_train` cut them into, no copy
    each). A super-packet that cannot be split is an OFFLOAD drop. DeviceGoneError (the
    interface was deleted) goes to the caller."""
    if not offloaded:
        return [[p] for p in queue.read_batch(batch)]
    out: list[Sequence[Buffer]] = []
    for hdr, packet in read_packets(queue, batch):
        if not (hdr.flags or hdr.gso_type):
            out.append([packet.tobytes()])
            continue
        try:
            train = split_train(hdr, packet)
        except MalformedPacket:
            queue.counters.drop(DropReason.OFFLOAD)
            continue
        body, size = memoryview(train.body).cast("B"), train.size
        segments: list[Buffer] = [body[k:k + size] for k in range(0, train.count * size, size)]
        if len(train.tail):
            segments.append(train.tail)
        out.append(segments)
    return out


def _family(host: str) -> int:
    return socket.AF_INET6 if ":" in host and not host.startswith("::ffff:") else socket.AF_INET


def plain_address(address: tuple[str, int]) -> tuple[str, int]:
    """An IPv4-mapped IPv6 source (dual-stack socket) as the IPv4 address it is."""
    host, port = address[0], address[1]
    if host.startswith("::ffff:") and "." in host:
        return host[7:], port
    return host, port


def wire_address(address: tuple[str, int]) -> tuple[str, int]:
    """A peer's address as the dual-stack socket takes it (IPv4 as IPv4-mapped)."""
    host, port = address
    return (host, port) if ":" in host else (f"::ffff:{host}", port)


def send_datagrams(udp: UdpEndpoint, datagrams: Sequence[Datagram],
                   wire: dict[tuple[str, int], tuple[str, int]]) -> None:
    """Send `datagrams` in order: a GSO train (`Datagram.segment`) in UDP_SEGMENT sends of
    its one buffer, consecutive single ones to one destination together (UDP GSO for equal
    sizes). `wire` caches each destination's socket address (IPv4 as IPv4-mapped on the
    dual-stack socket). A refused send is not retried: the peer's retransmission covers it."""
    i, n = 0, len(datagrams)
    while i < n:
        to = datagrams[i].to
        dest = wire.get(to)
        if dest is None:
            dest = wire[to] = wire_address(to)
        data, seg = datagrams[i].data, datagrams[i].segment
        if seg and len(data) > seg:
            count = len(data) // seg
            view = memoryview(data)
            udp.send_train(dest, Train(view[:count * seg], seg, count, view[count * seg:]),
                           family=_family(dest[0]))
            i += 1
            continue
        j = i + 1
        while j < n and datagrams[j].to == to and not (
                datagrams[j].segment and len(datagrams[j].data) > datagrams[j].segment):
            j += 1
        group = datagrams[i:j]
        if len(group) == 1:
            with contextlib.suppress(OSError):
                udp.sock.sendto(data, dest)
        else:
            udp.send(dest, [[d.data] for d in group], [len(d.data) for d in group],
                     family=_family(dest[0]))
        i = j


def receive_datagrams(udp: UdpEndpoint, batch: int) -> list[tuple[bytes, tuple[str, int]]]:
    """Up to `batch` reads of the socket as (datagram, source), a GRO train cut in its
    datagrams. An ICMP error queued on the socket is skipped."""
    out: list[tuple[bytes, tuple[str, int]]] = []
    for _ in range(batch):
        try:
            got = udp.recv()
        except MqtunError:
            continue
        if got is None:
            break
        data, seg, source = got
        src = plain_address(source)
        if seg <= 0 or len(data) <= seg:
            out.append((data, src))
        else:
            out += [(data[k:k + seg], src) for k in range(0, len(data), seg)]
    return out


def write_tun(queue: Queue, packets: list[bytes], offloaded: bool) -> None:
    """Write authenticated IP packets to `queue`: with offloads, same-flow runs joined into
    super-packets first. A refused write is counted by the queue and skipped (a deleted
    device is noticed by the next read)."""
    if not packets:
        return
    if not offloaded:
        for packet in packets:
            with contextlib.suppress(MqtunError):
                queue.write(packet)
        return
    # verify=False: every packet here opened under ChaCha20-Poly1305, whose tag already proves
    # it is what the peer sent (the kernel's WireGuard marks its decrypted packets
    # CHECKSUM_UNNECESSARY for the same reason); re-verifying each TCP checksum would only
    # repeat that in Python.
    items = coalesce(packets, verify=False) if len(packets) > 1 else [(ZERO_HEADER, packets[0])]
    for hdr, data in items:
        with contextlib.suppress(MqtunError):
            write_packet(queue, hdr, data)


class Outbox:
    """What one data path sends, in order: datagrams go out at once (`send_datagrams`, each
    destination's socket address cached), the packets they decrypt to wait for `flush`, so
    that a whole batch's packets are joined into super-packets by one `write_tun`."""

    def __init__(self, offloaded: bool) -> None:
        self.offloaded = offloaded
        self.wire: dict[tuple[str, int], tuple[str, int]] = {}
        self.pending: list[bytes] = []

    def emit(self, udp: UdpEndpoint, datagrams: Sequence[Datagram],
             packets: list[bytes]) -> None:
        if datagrams:
            send_datagrams(udp, datagrams, self.wire)
        if packets:
            self.pending += packets

    def flush(self, queue: Queue) -> None:
        if self.pending:
            packets, self.pending = self.pending, []
            write_tun(queue, packets, self.offloaded)
