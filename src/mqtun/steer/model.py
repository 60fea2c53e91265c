"""Pure-Python prediction of the queue the kernel picks for a packet. No kernel, no fd.

The kernel hands a packet to queue ``(u16)ret % numqueues`` where ``ret`` is what the steering
program returned (drivers/net/tun.c: tun_ebpf_select_queue). Each model here computes the same
``ret`` as its built-in program, bit for bit, so ``model.queue_for(packet, n)`` is exactly the
queue the packet lands on: the differential tests hold every program to its model on thousands
of packets through BPF_PROG_TEST_RUN and on real traffic.

What every built-in program parses (`parse_flow`), for TUN (the packet starts with the IP
header) and TAP (Ethernet first):

- TAP: the ethertype at offset 12; up to two 802.1Q/802.1ad tags *in the data* are skipped.
  A tag the stack keeps out of band (skb vlan_present: a VLAN device on top of the TAP with
  tx-vlan offload, the default) is not in the data the program sees, so the frame hashes like
  its untagged self. Either way the VLAN id is not part of the flow.
- TUN: the version nibble of the first byte.
- IPv4: addresses; ports of TCP/UDP when the header length is >= 20 and the packet is not a
  fragment (MF set or offset != 0): fragments go by addresses only.
- IPv6: addresses; up to 6 extension headers (hop-by-hop, routing, destination options) are
  skipped; a fragment header, any other protocol than TCP/UDP, or more extension headers
  than that: addresses only.
- Anything else (ARP, a packet too short for its IP header, a version other than 4/6) is not
  a flow: every built-in program returns 0 for it, i.e. queue 0.
- Ports that do not fit in the packet read as absent (addresses only).

The kernel's own choice without a program (`KernelDefault`) can only be predicted up to a
secret: tun_automq_select_queue takes ``__skb_get_hash_symmetric(skb)`` — the flow dissector's
addresses, ports and protocol, sorted so both directions agree, hashed with siphash under
``hashrnd``, a key drawn at random once per boot and never exposed — and, when no flow-table
entry learned from a userspace write matches, uses ``reciprocal_scale(hash, numqueues)``. So
the model tells which packets share a queue (same `KernelDefault.flow_class`), and maps a hash
to a queue, but not which queue a given flow gets.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from dataclasses import dataclass

from mqtun import _uapi as u
from mqtun.errors import InvalidArgumentError

__all__ = [
    "MAX_IPV6_EXT_HEADERS",
    "RSS_DEFAULT_KEY",
    "RSS_INPUT_MAX",
    "SYMMETRIC_SEED",
    "ByCpuModel",
    "FixedModel",
    "Flow",
    "KernelDefault",
    "Model",
    "RssModel",
    "SymmetricModel",
    "kernel_queue",
    "parse_flow",
    "reciprocal_scale",
    "rss_input",
    "symmetric_hash",
    "toeplitz_hash",
    "toeplitz_table",
]

MAX_IPV6_EXT_HEADERS = 6
MAX_VLAN_TAGS = 2
_IPV6_SKIPPED = (u.IPPROTO_HOPOPTS, u.IPPROTO_ROUTING, u.IPPROTO_DSTOPTS)
_PORT_PROTOS = (u.IPPROTO_TCP, u.IPPROTO_UDP)
_VLAN_TPIDS = (u.ETH_P_8021Q, u.ETH_P_8021AD)

# The symmetric hash: a 32-bit multiply-xorshift chain and murmur3's finalizer.
SYMMETRIC_SEED = 0x6D717475  # "mqtu"
_MIX = 0x9E3779B1
_FMIX1 = 0x85EBCA6B
_FMIX2 = 0xC2B2AE35
_M32 = 0xFFFFFFFF

# RSS: the Toeplitz key every NIC datasheet and the virtio spec use as the example default.
RSS_DEFAULT_KEY = bytes.fromhex(
    "6d5a56da255b0ec24167253d43a38fb0d0ca2bcbae7b30b477cb2da38030f20c6a42b73bbeac01fa"
)
RSS_INPUT_MAX = 36  # IPv6 addresses + ports: the longest Toeplitz input
RSS_KEY_SIZE = RSS_INPUT_MAX + 4


@dataclass(frozen=True)
class Flow:
    """What a steering program takes from a packet. `ports` is None for addresses-only."""

    family: int  # 4 or 6
    src: bytes
    dst: bytes
    proto: int
    ports: tuple[int, int] | None

    def reversed(self) -> Flow:
        ports = None if self.ports is None else (self.ports[1], self.ports[0])
        return Flow(self.family, self.dst, self.src, self.proto, ports)


def parse_flow(packet: bytes, tap: bool = False) -> Flow | None:
    """The flow a built-in program sees in `packet`, or None when it is not one.

    This Ethernet/VLAN/IP parser is deliberately not mqtun.packet.headers: it mirrors the
    eBPF parser the built-in programs carry (steer.programs.emit_parse), limits and TPIDs
    included, so that it predicts what the kernel runs rather than what a packet "is".
    """
    data = bytes(packet)
    if tap:
        if len(data) < u.ETH_HLEN:
            return None
        ethertype = int.from_bytes(data[12:14], "big")
        off = u.ETH_HLEN
        for _ in range(MAX_VLAN_TAGS):
            if ethertype not in _VLAN_TPIDS:
                break
            if len(data) < off + u.VLAN_HLEN:
                return None
            ethertype = int.from_bytes(data[off + 2 : off + 4], "big")
            off += u.VLAN_HLEN
        if ethertype == u.ETH_P_IP:
            return _parse_ipv4(data, off)
        if ethertype == u.ETH_P_IPV6:
            return _parse_ipv6(data, off)
        return None
    if not data:
        return None
    version = data[0] >> 4
    if version == 4:
        return _parse_ipv4(data, 0)
    if version == 6:
        return _parse_ipv6(data, 0)
    return None


def _ports(data: bytes, off: int) -> tuple[int, int] | None:
    if len(data) < off + 4:
        return None
    sport, dport = struct.unpack_from("!HH", data, off)
    return sport, dport


def _parse_ipv4(data: bytes, off: int) -> Flow | None:
    if len(data) < off + u.IPV4_HDR_MIN:
        return None
    ihl = (data[off] & 0x0F) * 4
    frag = int.from_bytes(data[off + 6 : off + 8], "big")
    proto = data[off + 9]
    src, dst = data[off + 12 : off + 16], data[off + 16 : off + 20]
    ports = None
    if ihl >= u.IPV4_HDR_MIN and not frag & (u.IP_MF | u.IP_OFFSET) and proto in _PORT_PROTOS:
        ports = _ports(data, off + ihl)
    return Flow(4, src, dst, proto, ports)


def _parse_ipv6(data: bytes, off: int) -> Flow | None:
    if len(data) < off + u.IPV6_HDR_LEN:
        return None
    nh = data[off + 6]
    src, dst = data[off + 8 : off + 24], data[off + 24 : off + 40]
    l4 = off + u.IPV6_HDR_LEN
    for _ in range(MAX_IPV6_EXT_HEADERS):
        if nh not in _IPV6_SKIPPED:
            break
        if len(data) < l4 + 2:
            return Flow(6, src, dst, nh, None)
        nh, hdrlen = data[l4], data[l4 + 1]
        l4 += (hdrlen + 1) * 8
    ports = _ports(data, l4) if nh in _PORT_PROTOS else None
    return Flow(6, src, dst, nh, ports)


# ---- the symmetric hash ------------------------------------------------------------------------


def _fold(addr: bytes) -> int:
    """An address as one 32-bit word: itself (IPv4) or the xor of its four words (IPv6)."""
    value = 0
    for (word,) in struct.iter_unpack("!I", addr):
        value ^= word
    return value


def _mix(h: int, word: int) -> int:
    h = ((h ^ word) * _MIX) & _M32
    return h ^ (h >> 15)


def _fmix(h: int) -> int:
    h ^= h >> 16
    h = (h * _FMIX1) & _M32
    h ^= h >> 13
    h = (h * _FMIX2) & _M32
    return h ^ (h >> 16)


def symmetric_hash(packet: bytes, tap: bool = False) -> int:
    """The 32-bit value the symmetric-hash program returns (0 for a non-flow).

    Both directions of a flow give the same value: the (address, port) ends are put in order
    first (by folded address, then by port)."""
    flow = parse_flow(packet, tap)
    if flow is None:
        return 0
    a, b = _fold(flow.src), _fold(flow.dst)
    sp, dp = flow.ports or (0, 0)
    if a > b or (a == b and sp > dp):
        a, b, sp, dp = b, a, dp, sp
    h = SYMMETRIC_SEED
    for word in (a, b, (sp << 16) | dp):
        h = _mix(h, word)
    return _fmix(h)


# ---- Toeplitz ----------------------------------------------------------------------------------


def toeplitz_hash(key: bytes, data: bytes) -> int:
    """The Toeplitz hash of `data` under `key` (needs len(key) >= len(data) + 4), as NICs
    and the virtio-net RSS spec define it."""
    if len(key) < len(data) + 4:
        raise InvalidArgumentError(
            f"a Toeplitz key for {len(data)} input bytes needs {len(data) + 4} bytes", op="rss"
        )
    k = int.from_bytes(key, "big")
    kbits = len(key) * 8
    result = 0
    for i in range(len(data) * 8):
        if data[i // 8] & (0x80 >> (i % 8)):
            result ^= (k >> (kbits - 32 - i)) & _M32
    return result


def toeplitz_table(key: bytes, positions: int = RSS_INPUT_MAX) -> list[list[int]]:
    """`table[p][v]`: the Toeplitz contribution of byte value v at input position p.

    The hash of an input is the xor of `table[p][input[p]]` over its bytes: what the RSS program
    computes, one map load per byte."""
    if len(key) < positions + 4:
        raise InvalidArgumentError(
            f"the RSS key must be at least {positions + 4} bytes, not {len(key)}", op="rss"
        )
    k = int.from_bytes(key, "big")
    kbits = len(key) * 8
    table: list[list[int]] = []
    for p in range(positions):
        windows = [(k >> (kbits - 32 - (p * 8 + b))) & _M32 for b in range(8)]
        row = [0] * 256
        for v in range(1, 256):
            acc = 0
            for b in range(8):
                if v & (0x80 >> b):
                    acc ^= windows[b]
            row[v] = acc
        table.append(row)
    return table


def rss_input(flow: Flow, l4: bool = True) -> bytes:
    """The bytes RSS hashes: source and destination address, then source and destination
    port when the flow has ports (and `l4`), all in network order."""
    data = flow.src + flow.dst
    if l4 and flow.ports is not None:
        data += struct.pack("!HH", *flow.ports)
    return data


# ---- the models --------------------------------------------------------------------------------


def kernel_queue(ret: int, numqueues: int) -> int:
    """The queue the kernel picks for a program's return value: (u16)ret % numqueues."""
    if numqueues <= 0:
        raise InvalidArgumentError("a device with a steering program needs at least one queue")
    return (ret & 0xFFFF) % numqueues


def reciprocal_scale(value: int, numqueues: int) -> int:
    """The kernel's reciprocal_scale(): a 32-bit hash onto 0..numqueues-1, by its top bits."""
    return ((value & _M32) * numqueues) >> 32


class Model:
    """The return value of a built-in program for a packet, and so its queue."""

    tap: bool = False

    def ret(self, packet: bytes, cpu: int | None = None) -> int:
        raise NotImplementedError

    def queue_for(self, packet: bytes, numqueues: int, cpu: int | None = None) -> int:
        """The queue index (kernel order) the packet lands on with `numqueues` queues."""
        return kernel_queue(self.ret(packet, cpu), numqueues)


class SymmetricModel(Model):
    def __init__(self, tap: bool = False) -> None:
        self.tap = tap

    def ret(self, packet: bytes, cpu: int | None = None) -> int:
        return symmetric_hash(packet, self.tap)


class RssModel(Model):
    """Toeplitz over (src, dst[, sport, dport]), then ``table[hash & (len(table) - 1)]``."""

    def __init__(self, key: bytes = RSS_DEFAULT_KEY, table: Sequence[int] = (0,),
                 *, l4: bool = True, tap: bool = False) -> None:
        if len(key) < RSS_KEY_SIZE:
            raise InvalidArgumentError(f"the RSS key must be {RSS_KEY_SIZE} bytes or more")
        size = len(table)
        if size == 0 or size & (size - 1):
            raise InvalidArgumentError(f"the indirection table size must be a power of two, "
                                       f"not {size}")
        self._key = bytes(key)
        self._rows: list[list[int]] | None = None
        self.table = list(table)
        self.l4 = l4
        self.tap = tap

    @property
    def key(self) -> bytes:
        return self._key

    @key.setter
    def key(self, key: bytes) -> None:
        if len(key) < RSS_KEY_SIZE:
            raise InvalidArgumentError(f"the RSS key must be {RSS_KEY_SIZE} bytes or more")
        self._key = bytes(key)
        self._rows = None

    def hash(self, packet: bytes) -> int | None:
        """The Toeplitz hash of the packet's flow, or None when it is not a flow."""
        flow = parse_flow(packet, self.tap)
        if flow is None:
            return None
        if self._rows is None:  # the per-byte table, as the program uses it
            self._rows = toeplitz_table(self._key)
        h = 0
        for row, byte in zip(self._rows, rss_input(flow, self.l4), strict=False):
            h ^= row[byte]
        return h

    def ret(self, packet: bytes, cpu: int | None = None) -> int:
        h = self.hash(packet)
        if h is None:
            return 0
        return self.table[h & (len(self.table) - 1)]


class ByCpuModel(Model):
    """The sending CPU, through `table` (``table[cpu % len(table)]``) or as is."""

    def __init__(self, table: Sequence[int] | None = None) -> None:
        self.table = None if table is None else list(table)

    def ret(self, packet: bytes, cpu: int | None = None) -> int:
        if cpu is None:
            raise InvalidArgumentError("the by-CPU model needs the sending CPU")
        if self.table is None:
            return cpu
        return self.table[cpu % len(self.table)]


class FixedModel(Model):
    def __init__(self, queue: int) -> None:
        self.queue = queue

    def ret(self, packet: bytes, cpu: int | None = None) -> int:
        return self.queue


@dataclass(frozen=True)
class _DefaultClass:
    family: int
    proto: int
    ends: tuple[tuple[bytes, int], tuple[bytes, int]]


class KernelDefault:
    """The kernel's choice without a steering program, as far as it can be known.

    Exact: two packets with the same `flow_class` go to the same queue (unless a userspace
    write taught the flow table otherwise), including the two directions of a flow, and
    `queue_for_hash` is the kernel's arithmetic on a known hash. Not knowable: the hash itself,
    a siphash keyed with the per-boot secret ``hashrnd``."""

    def __init__(self, tap: bool = False) -> None:
        self.tap = tap

    def flow_class(self, packet: bytes) -> _DefaultClass | None:
        """A value equal for packets the kernel hashes alike (addresses, ports, protocol,
        direction-independent), for TCP and UDP packets with ports; None for anything else,
        where the kernel's dissector may use fields this model does not read (ESP SPIs,
        tunnels, fragments)."""
        flow = parse_flow(packet, self.tap)
        if flow is None or flow.ports is None:
            return None
        sp, dp = flow.ports
        ends = tuple(sorted(((flow.src, sp), (flow.dst, dp))))
        return _DefaultClass(flow.family, flow.proto, ends)  # type: ignore[arg-type]

    @staticmethod
    def queue_for_hash(flow_hash: int, numqueues: int) -> int:
        """The queue for a flow-table miss: reciprocal_scale(hash, numqueues)."""
        return reciprocal_scale(flow_hash, numqueues)
