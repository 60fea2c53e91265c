"""The cross-platform configuration protocol `wg` speaks to userspace WireGuard, sans-IO.

A client writes `get=1\\n\\n` or `set=1\\n` + `key=value` lines + a blank line on the unix
socket /var/run/wireguard/IFNAME.sock; the server answers with `key=value` lines (get) and a
final `errno=N\\n\\n` (0, or a negative errno). Device keys come first; `public_key=` starts a
peer section. Here: `RequestReader` frames a byte stream into requests, `apply_set` applies one
set body to a `DeviceConfig` (all or nothing: a refused line leaves the config as it was, and
the result says what changed so the shell can rebind or rekey), `format_get` serializes.
"""

from __future__ import annotations

import copy
import errno as _errno
import ipaddress
from dataclasses import dataclass, field

from mqtun.wireguard.crypto import public_key

__all__ = [
    "DeviceConfig",
    "PeerConfig",
    "RequestReader",
    "SetResult",
    "UapiRequest",
    "apply_set",
    "format_endpoint",
    "format_get",
    "parse_endpoint",
    "parse_get",
    "response",
]

Network = ipaddress.IPv4Network | ipaddress.IPv6Network
EINVAL = -_errno.EINVAL
EPROTO = -_errno.EPROTO


@dataclass(slots=True)
class PeerConfig:
    public_key: bytes
    preshared_key: bytes = bytes(32)
    endpoint: tuple[str, int] | None = None
    persistent_keepalive_interval: int = 0
    allowed_ips: list[Network] = field(default_factory=list)
    # state, reported by get
    last_handshake_time_ns: int = 0
    rx_bytes: int = 0
    tx_bytes: int = 0


@dataclass(slots=True)
class DeviceConfig:
    private_key: bytes | None = None
    listen_port: int = 0
    fwmark: int = 0
    peers: dict[bytes, PeerConfig] = field(default_factory=dict)

    def __repr__(self) -> str:  # never show the private key
        return f"DeviceConfig(listen_port={self.listen_port}, peers={len(self.peers)})"


@dataclass(slots=True)
class SetResult:
    errno: int = 0
    message: str = ""
    private_key_changed: bool = False
    listen_port_changed: bool = False
    fwmark_changed: bool = False
    peers_changed: set[bytes] = field(default_factory=set)
    peers_removed: set[bytes] = field(default_factory=set)
    keepalive_turned_on: set[bytes] = field(default_factory=set)


class _Refused(Exception):
    def __init__(self, errno: int, message: str) -> None:
        super().__init__(message)
        self.errno = errno


def _key(value: str, what: str) -> bytes:
    try:
        key = bytes.fromhex(value)
    except ValueError:
        key = b""
    if len(key) != 32 or len(value) != 64:
        raise _Refused(EINVAL, f"{what} is not 64 hex digits")
    return key


def _uint(value: str, bits: int, what: str) -> int:
    if not value.isdigit() or int(value) >= 1 << bits:
        raise _Refused(EINVAL, f"{what} is not an unsigned {bits}-bit number: {value!r}")
    return int(value)


def parse_endpoint(value: str) -> tuple[str, int]:
    """'198.18.0.1:51820' or '[fd00::1]:51820' -> (host, port)."""
    host, sep, port = value.rpartition(":")
    if not sep:
        raise ValueError(f"endpoint without a port: {value!r}")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    ipaddress.ip_address(host)
    if not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"bad endpoint port: {value!r}")
    return host, int(port)


def format_endpoint(endpoint: tuple[str, int]) -> str:
    host, port = endpoint
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def apply_set(config: DeviceConfig, body: str) -> SetResult:
    """Apply the lines of one set operation; on error nothing is applied and `errno` is set."""
    work = copy.deepcopy(config)
    result = SetResult()
    try:
        _apply(work, body, result)
    except _Refused as refused:
        return SetResult(errno=refused.errno, message=str(refused))
    config.private_key, config.listen_port = work.private_key, work.listen_port
    config.fwmark, config.peers = work.fwmark, work.peers
    return result


def _apply(config: DeviceConfig, body: str, result: SetResult) -> None:
    peer: PeerConfig | None = None  # None while in the device section or on a dummy peer
    in_device = True
    created: set[bytes] = set()  # peers this operation created (update_only undoes that)
    for line in body.split("\n"):
        if not line:
            continue
        key, sep, value = line.partition("=")
        if not sep:
            raise _Refused(EPROTO, f"line without '=': {line!r}")
        if key == "public_key":
            in_device = False
            public = _key(value, "public_key")
            own = config.private_key is not None and public_key(config.private_key) == public
            if own:  # wireguard-go ignores a peer with the device's own key
                peer = None
                continue
            peer = config.peers.get(public)
            if peer is None:
                peer = config.peers[public] = PeerConfig(public)
                created.add(public)
            result.peers_changed.add(public)
            continue
        if in_device:
            _device_line(config, key, value, result)
        else:
            peer = _peer_line(config, peer, key, value, result, created)


def _device_line(config: DeviceConfig, key: str, value: str, result: SetResult) -> None:
    if key == "private_key":
        private = _key(value, "private_key")
        config.private_key = None if private == bytes(32) else private
        result.private_key_changed = True
    elif key == "listen_port":
        config.listen_port = _uint(value, 16, "listen_port")
        result.listen_port_changed = True
    elif key == "fwmark":
        config.fwmark = _uint(value, 32, "fwmark")
        result.fwmark_changed = True
    elif key == "replace_peers":
        if value != "true":
            raise _Refused(EINVAL, f"replace_peers={value!r}")
        result.peers_removed |= set(config.peers)
        config.peers.clear()
    else:
        raise _Refused(EINVAL, f"invalid device key {key!r}")


def _peer_line(config: DeviceConfig, peer: PeerConfig | None, key: str, value: str,
               result: SetResult, created: set[bytes]) -> PeerConfig | None:
    if key in ("update_only", "remove", "replace_allowed_ips") and value != "true":
        raise _Refused(EINVAL, f"{key}={value!r}")
    if key == "update_only":
        if peer is not None and peer.public_key in created:
            del config.peers[peer.public_key]
            result.peers_changed.discard(peer.public_key)
            return None
        return peer
    if key == "remove":
        if peer is not None:
            config.peers.pop(peer.public_key, None)
            result.peers_changed.discard(peer.public_key)
            result.peers_removed.add(peer.public_key)
        return None
    if key == "preshared_key":
        psk = _key(value, "preshared_key")
        if peer is not None:
            peer.preshared_key = psk
    elif key == "endpoint":
        try:
            endpoint = parse_endpoint(value)
        except ValueError as exc:
            raise _Refused(EINVAL, str(exc)) from None
        if peer is not None:
            peer.endpoint = endpoint
    elif key == "persistent_keepalive_interval":
        secs = _uint(value, 16, "persistent_keepalive_interval")
        if peer is not None:
            if peer.persistent_keepalive_interval == 0 and secs:
                result.keepalive_turned_on.add(peer.public_key)
            peer.persistent_keepalive_interval = secs
    elif key == "replace_allowed_ips":
        if peer is not None:
            peer.allowed_ips.clear()
    elif key == "allowed_ip":
        remove = value.startswith("-")
        try:
            net = ipaddress.ip_network(value.lstrip("-"), strict=False)
        except ValueError:
            raise _Refused(EINVAL, f"bad allowed_ip {value!r}") from None
        if peer is not None:
            if remove:
                if net in peer.allowed_ips:
                    peer.allowed_ips.remove(net)
            else:
                for other in config.peers.values():  # one prefix, one peer
                    if other is not peer and net in other.allowed_ips:
                        other.allowed_ips.remove(net)
                if net not in peer.allowed_ips:
                    peer.allowed_ips.append(net)
    elif key == "protocol_version":
        if value != "1":
            raise _Refused(EINVAL, f"protocol_version={value!r}")
    else:
        raise _Refused(EINVAL, f"invalid peer key {key!r}")
    return peer


def format_get(config: DeviceConfig) -> str:
    """The body of a get answer (without the final errno line)."""
    lines: list[str] = []
    if config.private_key is not None:
        lines.append(f"private_key={config.private_key.hex()}")
    if config.listen_port:
        lines.append(f"listen_port={config.listen_port}")
    if config.fwmark:
        lines.append(f"fwmark={config.fwmark}")
    for peer in config.peers.values():
        lines.append(f"public_key={peer.public_key.hex()}")
        lines.append(f"preshared_key={peer.preshared_key.hex()}")
        lines.append("protocol_version=1")
        if peer.endpoint is not None:
            lines.append(f"endpoint={format_endpoint(peer.endpoint)}")
        secs, nsec = divmod(peer.last_handshake_time_ns, 1_000_000_000)
        lines.append(f"last_handshake_time_sec={secs}")
        lines.append(f"last_handshake_time_nsec={nsec}")
        lines.append(f"tx_bytes={peer.tx_bytes}")
        lines.append(f"rx_bytes={peer.rx_bytes}")
        lines.append(f"persistent_keepalive_interval={peer.persistent_keepalive_interval}")
        lines.extend(f"allowed_ip={net}" for net in peer.allowed_ips)
    return "".join(line + "\n" for line in lines)


def response(body: str, errno: int) -> bytes:
    return (body + f"errno={errno}\n\n").encode()


@dataclass(frozen=True, slots=True)
class UapiRequest:
    operation: str  # "get" or "set"; "invalid" ends the connection
    body: str = ""


class RequestReader:
    """Frames the bytes of one connection into requests (a request ends at a blank line)."""

    MAX_REQUEST = 1 << 20

    def __init__(self) -> None:
        self._buffer = b""

    def feed(self, data: bytes) -> list[UapiRequest]:
        self._buffer += data
        out: list[UapiRequest] = []
        while True:
            end = self._buffer.find(b"\n\n")
            if end < 0:
                if len(self._buffer) > self.MAX_REQUEST:
                    self._buffer = b""
                    out.append(UapiRequest("invalid"))
                return out
            raw, self._buffer = self._buffer[:end + 1], self._buffer[end + 2:]
            head, _, body = raw.decode(errors="replace").partition("\n")
            if head == "get=1" and not body:
                out.append(UapiRequest("get"))
            elif head == "set=1":
                out.append(UapiRequest("set", body))
            else:
                out.append(UapiRequest("invalid"))
                return out


def parse_get(body: str) -> DeviceConfig:
    """A get answer's body -> the DeviceConfig it describes (the client side, and a test oracle)."""
    config = DeviceConfig()
    peer: PeerConfig | None = None
    for line in body.split("\n"):
        key, sep, value = line.partition("=")
        if not sep:
            continue
        if key == "private_key":
            config.private_key = bytes.fromhex(value)
        elif key == "listen_port":
            config.listen_port = int(value)
        elif key == "fwmark":
            config.fwmark = int(value)
        elif key == "public_key":
            peer = config.peers[bytes.fromhex(value)] = PeerConfig(bytes.fromhex(value))
        elif peer is None or key in ("protocol_version", "errno"):
            continue
        elif key == "preshared_key":
            peer.preshared_key = bytes.fromhex(value)
        elif key == "endpoint":
            peer.endpoint = parse_endpoint(value)
        elif key == "persistent_keepalive_interval":
            peer.persistent_keepalive_interval = int(value)
        elif key == "allowed_ip":
            peer.allowed_ips.append(ipaddress.ip_network(value, strict=False))
        elif key == "last_handshake_time_sec":
            peer.last_handshake_time_ns += int(value) * 1_000_000_000
        elif key == "last_handshake_time_nsec":
            peer.last_handshake_time_ns += int(value)
        elif key == "rx_bytes":
            peer.rx_bytes = int(value)
        elif key == "tx_bytes":
            peer.tx_bytes = int(value)
    return config
