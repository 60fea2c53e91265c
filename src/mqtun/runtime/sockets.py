"""Per-worker UDP endpoints: a socket each in one SO_REUSEPORT group, UDP GSO out, UDP GRO in.

A tunnel's workers each own a device queue and a UDP socket, and share no lock. The sockets
are bound to one address and port with SO_REUSEPORT, so the kernel spreads incoming datagrams
over them by a hash of the outer 4-tuple (stable per outer flow: a peer that puts the inner
flow's hash in the outer source port, as VXLAN does, keeps every inner flow on one socket).

- `UdpEndpoint.send` sends many datagrams with few syscalls: a run of equal-size datagrams
  (and one shorter last one) goes out in one sendmsg with a UDP_SEGMENT cmsg, the payload
  gathered from the caller's buffers (a header and a frame each, no join).
- `UdpEndpoint.recv` reads with UDP_GRO on: one read may hold many datagrams of the segment
  size the cmsg gives. With SO_RXQ_OVFL on, a read also says how many datagrams the kernel
  has dropped so far for want of room in the receive buffer (`UdpEndpoint.overflows`).
- `SourcePorts` gives a sending socket per outer source port (bound lazily in the same
  reuseport way, a bounded number per worker), so datagrams can leave from the port a flow
  hash picks; a port that cannot be bound falls back to the endpoint's own.
- `SocketRoute` / `SocketLoop`: a device queue and an endpoint served both ways through a
  `TunnelCodec` (encapsulate one way, check and decapsulate the other), with the offloads
  (split on read, coalesce on write) and every drop counted; `socket_program` runs one per
  worker of a WorkerPool.

Socket option numbers come from `mqtun._uapi`; every error becomes an MqtunError that says
what to do.
"""

from __future__ import annotations

import contextlib
import errno
import ipaddress
import os
import signal
import socket
import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from mqtun import _uapi
from mqtun.errors import InvalidArgumentError, MqtunError, kernel_error
from mqtun.packet import ZERO_HEADER, MalformedPacket, VnetHeader, coalesce, decode, encode, split
from mqtun.packet.gso import Train, split_train
from mqtun.packet.headers import Buffer
from mqtun.runtime.loop import (
    DEFAULT_SPIN_US,
    Route,
    _closed,
    _read_error,
    _write_error,
    serve_ready,
    stop_flag,
    watched_epoll,
)
from mqtun.stats import (
    READ_BYTES,
    READ_ERRORS,
    READ_PACKETS,
    WRITE_ERRORS,
    WRITTEN_BYTES,
    WRITTEN_PACKETS,
    DropReason,
    drop_reason,
)

if TYPE_CHECKING:
    from mqtun.queue import Queue
    from mqtun.runtime.workers import Program, WorkerInfo

__all__ = [
    "SocketLoop",
    "SocketRoute",
    "SourcePorts",
    "TunnelCodec",
    "UdpEndpoint",
    "family_of",
    "gso_runs",
    "path_mtu",
    "reuseport_group",
    "segments_per_send",
    "socket_program",
]

_SEGMENT = struct.Struct("=H")
_GRO = struct.Struct("=i")
_OVFL = struct.Struct("=I")
_ANC_SPACE = socket.CMSG_SPACE(_GRO.size) + socket.CMSG_SPACE(_OVFL.size)
_RECV_SIZE = 65536 + 64
_MAX_UDP_PAYLOAD: dict[int, int] = {socket.AF_INET: 65535 - 20 - 8, socket.AF_INET6: 65535 - 8}


def family_of(address: str) -> int:
    """AF_INET or AF_INET6 for an address literal; InvalidArgumentError otherwise."""
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        raise InvalidArgumentError(f"not an IP address: {address!r}") from None
    return socket.AF_INET6 if ip.version == 6 else socket.AF_INET


def _sockaddr(address: str, port: int) -> tuple[str, int] | tuple[str, int, int, int]:
    return (address, port, 0, 0) if family_of(address) == socket.AF_INET6 else (address, port)


def gso_runs(sizes: Sequence[int], family: int = socket.AF_INET,
             max_segments: int = _uapi.UDP_MAX_SEGMENTS) -> list[tuple[int, int, int]]:
    """How datagrams of `sizes` (in order) go out in UDP_SEGMENT sends: (first index, count,
    segment size) per sendmsg. A run is equal sizes, optionally ended by one shorter datagram,
    at most `max_segments` long and at most one IP packet's worth of payload."""
    runs = []
    i, n = 0, len(sizes)
    while i < n:
        size = sizes[i]
        most = max(1, min(max_segments, segments_per_send(size, family)))
        j = i + 1
        while j < n and j - i < most and sizes[j] == size:
            j += 1
        if j < n and j - i < most and sizes[j] < size:
            j += 1  # a shorter datagram may end the run
        runs.append((i, j - i, size))
        i = j
    return runs


def segments_per_send(size: int, family: int = socket.AF_INET) -> int:
    """How many datagrams of `size` bytes one UDP_SEGMENT sendmsg can carry (one IP packet's
    worth of payload, at most UDP_MAX_SEGMENTS)."""
    return max(1, min(_uapi.UDP_MAX_SEGMENTS, _MAX_UDP_PAYLOAD[family] // max(size, 1)))


class UdpEndpoint:
    """One UDP socket of a worker (non-blocking reads, blocking sends)."""

    def __init__(self, sock: socket.socket, *, gro: bool) -> None:
        self.sock = sock
        self.gro = gro
        self.overflows = 0  # datagrams the kernel dropped, the receive buffer full (SO_RXQ_OVFL)
        self.family = sock.family
        self._sendmsg = sock.sendmsg
        self._recvmsg = sock.recvmsg

    @classmethod
    def bind(cls, address: str, port: int, *, reuseport: bool = True, gro: bool = True,
             rcvbuf: int | None = None) -> UdpEndpoint:
        """A UDP socket bound to (address, port), in the port's reuseport group if asked."""
        family = family_of(address)
        sock = socket.socket(family, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        try:
            if reuseport:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            if rcvbuf:
                with contextlib.suppress(OSError):  # best effort: FORCE needs CAP_NET_ADMIN
                    sock.setsockopt(socket.SOL_SOCKET, _uapi.SO_RCVBUFFORCE, rcvbuf)
            if gro:
                sock.setsockopt(_uapi.SOL_UDP, _uapi.UDP_GRO, 1)
            sock.setsockopt(socket.SOL_SOCKET, _uapi.SO_RXQ_OVFL, 1)
            sock.bind(_sockaddr(address, port))
        except OSError as exc:
            sock.close()
            if exc.errno == errno.EADDRINUSE:
                raise MqtunError(exc.errno, f"UDP port {port} on {address} is taken by a socket "
                                 "outside this reuseport group: stop that program or choose "
                                 "another --port", op="bind") from None
            if exc.errno == errno.EADDRNOTAVAIL:
                raise MqtunError(exc.errno, f"{address} is not an address of this host (network "
                                 "namespace): add it to an interface first", op="bind") from None
            if exc.errno == errno.ENOPROTOOPT:
                raise MqtunError(exc.errno, "this kernel has no UDP_GRO socket option "
                                 "(Linux 5.0+)", op="setsockopt") from None
            raise kernel_error(exc, "bind") from None
        return cls(sock, gro=gro)

    def fileno(self) -> int:
        return self.sock.fileno()

    @property
    def port(self) -> int:
        return int(self.sock.getsockname()[1])

    def close(self) -> None:
        self.sock.close()

    def send(self, dest: tuple[str, int] | tuple[str, int, int, int],
             datagrams: Sequence[Sequence[Buffer]], sizes: Sequence[int], *,
             family: int | None = None) -> tuple[int, int]:
        """Send datagrams (each a list of buffers gathered into one payload, `sizes` their
        lengths) to `dest`, equal-size runs in one UDP_SEGMENT sendmsg each. `family`: the
        destination's, when it is not the socket's (IPv4-mapped on a dual-stack socket: the
        IPv4 size limit holds).

        Returns (datagrams sent, errno of the first failed send or 0); a failed run's datagrams
        are not sent, the next runs are still tried."""
        sent = 0
        first_err = 0
        sendmsg = self._sendmsg
        for start, count, size in gso_runs(sizes, family or self.family):
            parts = [b for d in datagrams[start : start + count] for b in d]
            anc = [(_uapi.SOL_UDP, _uapi.UDP_SEGMENT, _SEGMENT.pack(size))] if count > 1 else []
            try:
                sendmsg(parts, anc, 0, dest)
            except OSError as exc:
                first_err = first_err or (exc.errno or errno.EIO)
                continue
            sent += count
        return sent, first_err

    def send_train(self, dest: tuple[str, int] | tuple[str, int, int, int], train: Train, *,
                   family: int | None = None) -> tuple[int, int]:
        """Send a Train's datagrams (its body's equal-size ones, then its tail) to `dest`: as
        many per UDP_SEGMENT sendmsg as one IP packet holds, slices of the one buffer.
        `family`: the destination's, as for send().

        Returns (datagrams sent, errno of the first failed send or 0), as send() does."""
        size, count, tail = train.size, train.count, train.tail
        per = segments_per_send(size, family or self.family)
        body = memoryview(train.body)
        anc = [(_uapi.SOL_UDP, _uapi.UDP_SEGMENT, _SEGMENT.pack(size))]
        sendmsg = self._sendmsg
        sent = first_err = 0
        tail_left = len(tail) > 0
        i = 0
        while i < count or tail_left:
            k = min(per, count - i)
            parts: list[Buffer] = [body[i * size : (i + k) * size]] if k else []
            n = k
            if tail_left and i + k == count and k < per:
                parts.append(tail)  # a shorter last datagram may end a UDP_SEGMENT send
                tail_left = False
                n += 1
            try:
                sendmsg(parts, anc if n > 1 else [], 0, dest)
            except OSError as exc:
                first_err = first_err or (exc.errno or errno.EIO)
            else:
                sent += n
            i += k
        return sent, first_err

    def recv(self) -> tuple[bytes, int, tuple[str, int]] | None:
        """One read: (data, segment size or 0, source (address, port)), None if nothing is
        queued. With UDP_GRO the data may hold many datagrams (see packet.vxlan.datagrams).

        The SO_RXQ_OVFL cmsg (the socket's drop count when this datagram was queued, present
        once it is not 0) updates `overflows`: drops are seen with the next datagram queued
        after them."""
        try:
            data, anc, _flags, addr = self._recvmsg(_RECV_SIZE, _ANC_SPACE, socket.MSG_DONTWAIT)
        except (BlockingIOError, InterruptedError):
            return None
        except OSError as exc:
            raise kernel_error(exc, "recvmsg") from None
        seg = 0
        for level, kind, value in anc:
            if level == _uapi.SOL_UDP and kind == _uapi.UDP_GRO and len(value) >= _GRO.size:
                seg = _GRO.unpack_from(value)[0]
            elif (level == socket.SOL_SOCKET and kind == _uapi.SO_RXQ_OVFL
                  and len(value) >= _OVFL.size):
                # a 32-bit count that wraps: the change since the last one seen, added
                seen = _OVFL.unpack_from(value)[0]
                self.overflows += (seen - self.overflows) & 0xFFFFFFFF
        return data, seg, (addr[0], addr[1])


def reuseport_group(address: str, port: int, count: int, **kwargs: object) -> list[UdpEndpoint]:
    """`count` endpoints on (address, port) in one SO_REUSEPORT group (closed again on error)."""
    out: list[UdpEndpoint] = []
    try:
        for _ in range(count):
            out.append(UdpEndpoint.bind(address, port, **kwargs))  # type: ignore[arg-type]
    except BaseException:
        for ep in out:
            ep.close()
        raise
    return out


def path_mtu(local: str, remote: str, port: int) -> int:
    """The MTU of the route from `local` to `remote` (IP_MTU of a connected UDP socket)."""
    family = family_of(local)
    if family_of(remote) != family:
        raise InvalidArgumentError(f"local {local} and remote {remote} are not of one family")
    with socket.socket(family, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
        try:
            s.bind(_sockaddr(local, 0))
            s.connect(_sockaddr(remote, port))
            if family == socket.AF_INET6:
                return int(s.getsockopt(socket.IPPROTO_IPV6, _uapi.IPV6_MTU))
            return int(s.getsockopt(socket.IPPROTO_IP, _uapi.IP_MTU))
        except OSError as exc:
            if exc.errno in (errno.ENETUNREACH, errno.EHOSTUNREACH):
                raise MqtunError(exc.errno, f"no route from {local} to {remote}: add the "
                                 "underlay address and route first", op="connect") from None
            if exc.errno == errno.EADDRNOTAVAIL:
                raise MqtunError(exc.errno, f"{local} is not an address of this host (network "
                                 "namespace): add it to an interface first", op="bind") from None
            raise kernel_error(exc, "path_mtu") from None


class SourcePorts:
    """Sending sockets by outer source port, bound on demand to (address, port) with
    SO_REUSEPORT (workers share a port), at most `limit` open at once; a port that cannot be
    bound (taken by another program) sends from `fallback` instead."""

    def __init__(self, address: str, fallback: UdpEndpoint, limit: int = 64) -> None:
        self.address = address
        self.fallback = fallback
        self.limit = limit
        self._by_port: dict[int, UdpEndpoint] = {fallback.port: fallback}

    def get(self, port: int) -> UdpEndpoint:
        ep = self._by_port.get(port)
        if ep is not None:
            return ep
        if len(self._by_port) > self.limit:
            self.close(keep_fallback=True)
        try:
            ep = UdpEndpoint.bind(self.address, port, gro=False, rcvbuf=None)
        except MqtunError:
            ep = self.fallback
        self._by_port[port] = ep
        return ep

    def close(self, keep_fallback: bool = False) -> None:
        for ep in self._by_port.values():
            if ep is not self.fallback:
                ep.close()
        self._by_port = {self.fallback.port: self.fallback} if keep_fallback else {}


# ---- a device queue <-> a UDP socket: the tunnel worker's loop ---------------------------------
class TunnelCodec(Protocol):
    """What a tunnel protocol gives `SocketLoop`: one handler per direction and the rules a
    received datagram is judged by. `mqtun.apps.tunnel.VxlanCodec` is VXLAN's."""

    header_len: int  # bytes in front of each frame in a datagram

    def encapsulate(self, frame: memoryview) -> bytes:
        """The bytes to put in front of a wire frame (it is gathered after them); for a
        super-frame, asked once and put in front of each of its segments."""

    def source_port(self, frame: memoryview) -> int | None:
        """The outer UDP source port for the frame's flow (None: the endpoint's own)."""

    def check(self, datagram: memoryview) -> DropReason | None:
        """Why a received datagram is not a frame of this tunnel, or None."""

    def datagrams(self, buf: memoryview, segment_size: int) -> list[memoryview]:
        """The datagrams in one UDP_GRO read."""

    def receive_header(self, frame: memoryview, gso_size: int, mtu: int) -> VnetHeader:
        """The virtio-net header to write a decapsulated frame with."""

    def too_big_reply(self, frame: memoryview, mtu: int) -> bytes | None:
        """What to write back to the device for a frame too big for the path (or None)."""


@dataclass
class SocketRoute:
    """A device queue and a UDP endpoint, both ways, through `codec`.

    Device -> socket: each read is split into wire frames (a GSO super-packet's segments),
    each frame that fits in `max_frame` once encapsulated is sent to (`remote`, `port`),
    a drain's datagrams of one source port in UDP GSO sends. Socket -> device: datagrams from
    `remote` only, checked, decapsulated, coalesced and written; one longer than `mtu` +
    Ethernet header is written as the super-frame it is."""

    queue: Queue
    endpoint: UdpEndpoint
    remote: str
    port: int
    codec: TunnelCodec
    max_frame: int
    mtu: int
    local: str = ""  # where per-flow source ports are bound (default: no per-flow ports)
    batch: int = 64


_DEVICE_READ_SIZE = 65536 + _uapi.VIRTIO_NET_HDR_V1_HASH_TUNNEL_SIZE + 64


class SocketLoop:
    """Serves one SocketRoute until `stop()` (safe in a signal handler). Bad input is counted
    under a DropReason on the queue's counters; only the loss of the device ends `run()`
    (DeviceGoneError)."""

    def __init__(self, route: SocketRoute) -> None:
        self.route = route
        self.queue = route.queue
        self.counters = route.queue.counters
        self.codec = route.codec
        self.tap = route.queue.device.tap
        self.peer = _sockaddr(route.remote, route.port)
        self.remote = ipaddress.ip_address(route.remote).compressed
        self.ports = SourcePorts(route.local, route.endpoint) if route.local else None
        self.hsize = route.queue.device.vnet_hdr_size
        self.zero = encode(ZERO_HEADER, self.hsize)
        self.inner_mtu = route.max_frame - (_uapi.ETH_HLEN if self.tap else 0)
        self.rx_limit = route.mtu + ((_uapi.ETH_HLEN + 2 * _uapi.VLAN_HLEN) if self.tap else 0)
        self._out: dict[int | None, tuple[list[Any], list[int]]] = {}
        # drops the socket's SO_RXQ_OVFL count already stands for (a restarted worker's
        # endpoint starts where the queue's counter is: the count is the socket's, not ours)
        route.endpoint.overflows = self._overflows = self._counted_overflows()
        self._stopping = False
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)

    def stop(self, *_: object) -> None:
        self._stopping = True
        with contextlib.suppress(OSError):
            os.write(self._wake_w, b"\0")

    def close(self) -> None:
        if self.ports is not None:
            self.ports.close()
        for fd in (self._wake_r, self._wake_w):
            with contextlib.suppress(OSError):
                os.close(fd)

    def run(self, spin_us: int = DEFAULT_SPIN_US) -> None:
        """Serve until `stop()`: the one wait of every loop (`serve_ready`: ask epoll which
        of the queue and the socket hold packets, drain those, spin, sleep). A queue closed
        underneath ends it with EBADF, a deleted device with DeviceGoneError."""
        q = self.queue
        if q.closed:
            raise _closed(q)
        os.set_blocking(q.fd, False)
        with contextlib.ExitStack() as stack:
            on: dict[int, Callable[[], object]] = {
                q.fd: self._from_device, self.route.endpoint.fileno(): self._from_socket}
            ep = watched_epoll(stack, on, [q], self._wake_r)
            serve_ready(ep, on, stop_flag(self), spin_us=spin_us)

    # ---- device -> socket ---------------------------------------------------------------
    def _from_device(self) -> int:
        q, c = self.queue, self.counters
        slots = c.slots
        fd, hsize, batch, tap = q.fd, self.hsize, self.route.batch, self.tap
        n = 0
        while n < batch:
            try:
                data = os.read(fd, _DEVICE_READ_SIZE)
            except BlockingIOError:
                break
            except OSError as exc:
                _read_error(q, exc)
                break
            n += 1
            slots[READ_PACKETS] += 1
            slots[READ_BYTES] += len(data) - hsize
            try:
                if hsize:
                    hdr = decode(data, hsize)
                    frame = memoryview(data)[hsize:]
                    if hdr.gso_type:  # a super-frame: its segments in one buffer, sent now
                        self._send_train(frame, split_train(
                            hdr, frame, tap=tap, prefix=self.codec.encapsulate(frame)))
                        continue
                    segments = split(hdr, frame, tap=tap) if hdr.flags else [frame]
                else:
                    segments = [memoryview(data)]
            except MalformedPacket:
                c.drop(DropReason.OFFLOAD)
                continue
            self._queue(segments)
        if self._out:
            self._send_queued()
        return n

    def _too_big(self, frame: Buffer) -> None:
        """Tell the sender of a frame that does not fit the path, as the kernel's tunnels do."""
        reply = self.codec.too_big_reply(memoryview(frame), self.inner_mtu)
        if reply is not None:
            self._write(self.zero, reply)

    def _send_train(self, frame: memoryview, train: Train) -> None:
        """Send a super-frame's segments (behind the tunnel header): after what is queued, so
        a flow's frames leave in order; segments too big for the path dropped and counted."""
        c = self.counters
        head, limit = self.codec.header_len, self.route.max_frame
        body_fits = train.size - head <= limit
        tail_fits = len(train.tail) - head <= limit
        if not (body_fits and tail_fits):
            c.drop(DropReason.TOO_BIG, (0 if body_fits else train.count) + (not tail_fits))
            big = memoryview(train.tail) if body_fits else memoryview(train.body)[:train.size]
            self._too_big(big[head:])
            train = Train(train.body if body_fits else b"", train.size,
                          train.count if body_fits else 0, train.tail if tail_fits else b"")
            if not len(train):
                return
        if self._out:
            self._send_queued()
        ep = self.route.endpoint
        if self.ports is not None:
            port = self.codec.source_port(frame)
            if port is not None:
                ep = self.ports.get(port)
        sent, err = ep.send_train(self.peer, train)
        if err:
            c.slots[WRITE_ERRORS] += 1
            c.drop(drop_reason(err), len(train) - sent)

    def _queue(self, segments: list[Any]) -> None:
        """Encapsulate a frame's segments for sending, by outer source port (a drain's
        datagrams of one flow go out together, equal sizes in one UDP GSO send)."""
        c, codec = self.counters, self.codec
        limit = self.route.max_frame
        if len(segments[0]) > limit or len(segments[-1]) > limit:
            fit = [s for s in segments if len(s) <= limit]
            c.drop(DropReason.TOO_BIG, len(segments) - len(fit))
            self._too_big(segments[0] if len(segments[0]) > limit else segments[-1])
            if not fit:
                return
            segments = fit
        port = codec.source_port(segments[0]) if self.ports is not None else None
        out = self._out.get(port)
        if out is None:
            out = self._out[port] = ([], [])
        head = codec.header_len
        encapsulate = codec.encapsulate
        out[0].extend([(encapsulate(s), s) for s in segments])
        out[1].extend([head + len(s) for s in segments])

    def _send_queued(self) -> None:
        c = self.counters
        for port, (datagrams, sizes) in self._out.items():
            ep = self.route.endpoint if port is None or self.ports is None \
                else self.ports.get(port)
            sent, err = ep.send(self.peer, datagrams, sizes)
            if err:
                c.slots[WRITE_ERRORS] += 1
                c.drop(drop_reason(err), len(datagrams) - sent)
        self._out.clear()

    # ---- socket -> device ---------------------------------------------------------------
    def _from_socket(self) -> int:
        c, codec = self.counters, self.codec
        recv = self.route.endpoint.recv
        check, remote, limit, head = codec.check, self.remote, self.rx_limit, codec.header_len
        pending: list[memoryview] = []
        n = 0
        while n < self.route.batch:
            try:
                got = recv()
            except MqtunError:
                c.slots[READ_ERRORS] += 1
                break
            if got is None:
                break
            n += 1
            data, seg, (addr, _port) = got
            mv = memoryview(data)
            parts = codec.datagrams(mv, seg)
            if addr != remote and ipaddress.ip_address(addr).compressed != remote:
                c.drop(DropReason.WRONG_SOURCE, len(parts))
                continue
            whole = seg > 0 and len(mv) > seg and len(parts) == 1
            for d in parts:
                reason = check(d)
                if reason is not None:
                    c.drop(reason)
                    continue
                if whole or len(d) - head > limit:  # a super-frame: written as it is
                    self._flush(pending)
                    frame = d[head:]
                    hdr = codec.receive_header(frame, seg if whole else 0, self.route.mtu)
                    self._write(encode(hdr, self.hsize), frame)
                else:
                    pending.append(d[head:])
        self._flush(pending)
        if self.route.endpoint.overflows != self._overflows:
            ov = self.route.endpoint.overflows
            c.drop(DropReason.SOCKET_OVERFLOW, ov - self._overflows)
            self._overflows = ov
        return n

    def _counted_overflows(self) -> int:
        return int(self.counters.snapshot().dropped.get(DropReason.SOCKET_OVERFLOW.label, 0))

    def _flush(self, frames: list[memoryview]) -> None:
        if not frames:
            return
        hsize, codec = self.hsize, self.codec
        # a lone frame (an ACK, mostly) has nothing to join: coalesce would hand it back as is
        pairs = coalesce(frames, tap=self.tap) if len(frames) > 1 else [(ZERO_HEADER, frames[0])]
        for hdr, data in pairs:
            if not (hdr.flags or hdr.gso_type):
                hdr = codec.receive_header(memoryview(data), 0, 0)
            self._write(encode(hdr, hsize) if hdr.flags or hdr.gso_type else self.zero, data)
        frames.clear()

    def _write(self, head: bytes, frame: Any) -> None:
        q = self.queue
        try:
            n = os.writev(q.fd, (head, frame))
        except OSError as exc:
            _write_error(q, exc)
            return
        slots = self.counters.slots
        slots[WRITTEN_PACKETS] += 1
        slots[WRITTEN_BYTES] += n - self.hsize


def socket_program(build: Callable[[WorkerInfo], SocketRoute]) -> Program:
    """A WorkerPool program that serves a SocketRoute instead of queue routes: `build` runs in
    the worker process; the worker serves until SIGTERM, then exits (the pool's loop never
    starts: a Program can only return queue routes today)."""

    def program(info: WorkerInfo) -> list[Route]:
        loop = SocketLoop(build(info))
        signal.signal(signal.SIGTERM, loop.stop)
        try:
            loop.run()
        finally:
            loop.close()
        os._exit(0)  # stopped on request: the pool's EXIT_STOPPED

    return program
