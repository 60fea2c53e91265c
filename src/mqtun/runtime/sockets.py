"""Per-worker UDP endpoints: a socket each in one SO_REUSEPORT group, UDP GSO out, UDP GRO in.

A tunnel's workers each own a device queue and a UDP socket, and share no lock. The sockets
are bound to one address and port with SO_REUSEPORT, so the kernel spreads incoming datagrams
over them by a hash of the outer 4-tuple (stable per outer flow: a peer that puts the inner
flow's hash in the outer source port, as VXLAN does, keeps every inner flow on one socket).

- `UdpEndpoint.send` sends many datagrams with few syscalls: a run of equal-size datagrams
  (and one shorter last one) goes out in one sendmsg with a UDP_SEGMENT cmsg, the payload
  gathered from the caller's buffers (a header and a frame each, no join).
- `UdpEndpoint.recv` reads with UDP_GRO on: one read may hold many datagrams of the segment
  size the cmsg gives.
- `SourcePorts` gives a sending socket per outer source port (bound lazily in the same
  reuseport way, a bounded number per worker), so datagrams can leave from the port a flow
  hash picks; a port that cannot be bound falls back to the endpoint's own.

Socket option numbers come from `mqtun._uapi`; every error becomes an MqtunError that says
what to do.
"""

from __future__ import annotations

import contextlib
import errno
import ipaddress
import socket
import struct
from collections.abc import Sequence

from mqtun import _uapi
from mqtun.errors import InvalidArgumentError, MqtunError, kernel_error
from mqtun.packet.headers import Buffer

__all__ = [
    "SourcePorts",
    "UdpEndpoint",
    "family_of",
    "gso_runs",
    "path_mtu",
    "reuseport_group",
]

_SEGMENT = struct.Struct("=H")
_GRO = struct.Struct("=i")
_GRO_ANC = socket.CMSG_SPACE(_GRO.size)
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
    limit = _MAX_UDP_PAYLOAD[family]
    runs = []
    i, n = 0, len(sizes)
    while i < n:
        size = sizes[i]
        most = max(1, min(max_segments, limit // max(size, 1)))
        j = i + 1
        while j < n and j - i < most and sizes[j] == size:
            j += 1
        if j < n and j - i < most and sizes[j] < size:
            j += 1  # a shorter datagram may end the run
        runs.append((i, j - i, size))
        i = j
    return runs


class UdpEndpoint:
    """One UDP socket of a worker (non-blocking reads, blocking sends)."""

    def __init__(self, sock: socket.socket, *, gro: bool) -> None:
        self.sock = sock
        self.gro = gro
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
             datagrams: Sequence[Sequence[Buffer]], sizes: Sequence[int]) -> tuple[int, int]:
        """Send datagrams (each a list of buffers gathered into one payload, `sizes` their
        lengths) to `dest`, equal-size runs in one UDP_SEGMENT sendmsg each.

        Returns (datagrams sent, errno of the first failed send or 0); a failed run's datagrams
        are not sent, the next runs are still tried."""
        sent = 0
        first_err = 0
        sendmsg = self._sendmsg
        for start, count, size in gso_runs(sizes, self.family):
            parts = [b for d in datagrams[start : start + count] for b in d]
            anc = [(_uapi.SOL_UDP, _uapi.UDP_SEGMENT, _SEGMENT.pack(size))] if count > 1 else []
            try:
                sendmsg(parts, anc, 0, dest)
            except OSError as exc:
                first_err = first_err or (exc.errno or errno.EIO)
                continue
            sent += count
        return sent, first_err

    def recv(self) -> tuple[bytes, int, tuple[str, int]] | None:
        """One read: (data, segment size or 0, source (address, port)), None if nothing is
        queued. With UDP_GRO the data may hold many datagrams (see packet.vxlan.datagrams)."""
        try:
            data, anc, _flags, addr = self._recvmsg(_RECV_SIZE, _GRO_ANC, socket.MSG_DONTWAIT)
        except (BlockingIOError, InterruptedError):
            return None
        except OSError as exc:
            raise kernel_error(exc, "recvmsg") from None
        seg = 0
        for level, kind, value in anc:
            if level == _uapi.SOL_UDP and kind == _uapi.UDP_GRO and len(value) >= _GRO.size:
                seg = _GRO.unpack_from(value)[0]
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
