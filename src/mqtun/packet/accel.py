"""The optional C loops of the offload codecs (`mqtun.packet._accel`, built with the package
when a C compiler is there).

`packet.gso` cuts a TCP super-packet's full-size segments with it,
`packet.checksum.completed` finishes a NEEDS_CSUM packet's checksum in a copy,
`packet.gro.coalesce` joins a batch's segments and datagrams (its rules, one pass in C), and a
plain forwarder's drain of raw reads is joined the same way (`coalesce_reads`), when it is
built and `ACCELERATE` is on; otherwise with numpy, or the pure-Python code. All give the same
bytes (the tests hold each to an independent oracle, and the C coalesce to the Python one).
`MQTUN_NO_ACCEL=1` in the environment turns it off, e.g. to measure what it buys (and
the C read loop of mqtun.queue, `mqtun._reads`, with it).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

from mqtun import _uapi
from mqtun.packet.headers import MAX_VLAN_TAGS, VLAN_TPIDS
from mqtun.packet.vnet import ZERO_HEADER, VnetHeader

__all__ = ["ACCELERATE", "available", "coalesce", "coalesce_reads", "completed", "decode_plain",
           "tcp_rows"]

try:
    from mqtun.packet import _accel
except ImportError:  # built without a C compiler: the numpy and Python paths remain
    _accel = None  # type: ignore[assignment]

ACCELERATE: bool = os.environ.get("MQTUN_NO_ACCEL", "") in ("", "0")


def available() -> bool:
    """Whether the C loop was built (whatever ACCELERATE says)."""
    return _accel is not None


def tcp_rows() -> Callable[..., Any] | None:
    """`_accel.tcp_rows` when it is built and ACCELERATE is on, else None."""
    return _accel.tcp_rows if ACCELERATE and _accel is not None else None


def completed() -> Callable[[Any, int, int], bytes] | None:
    """`_accel.completed` when it is built and ACCELERATE is on, else None."""
    return _accel.completed if ACCELERATE and _accel is not None else None


_told = False  # configure() was called


def _configured() -> Any:
    """The C module, told the kernel's numbers once (for coalesce and coalesce_reads), when it
    is built and ACCELERATE is on; else None."""
    global _told
    if not ACCELERATE or _accel is None:
        return None
    if not _told:
        _accel.configure(ZERO_HEADER, VnetHeader, (
            _uapi.ETH_P_IP, _uapi.ETH_P_IPV6, *VLAN_TPIDS, MAX_VLAN_TAGS, _uapi.ETH_HLEN,
            _uapi.IPPROTO_TCP, _uapi.IPPROTO_UDP, _uapi.TCPHDR_ACK, _uapi.TCPHDR_PSH,
            _uapi.TCPHDR_CWR,
            _uapi.TCPHDR_SYN | _uapi.TCPHDR_FIN | _uapi.TCPHDR_RST | _uapi.TCPHDR_URG,
            _uapi.VIRTIO_NET_HDR_F_NEEDS_CSUM, _uapi.VIRTIO_NET_HDR_F_DATA_VALID,
            _uapi.VIRTIO_NET_HDR_GSO_TCPV4,
            _uapi.VIRTIO_NET_HDR_GSO_TCPV6, _uapi.VIRTIO_NET_HDR_GSO_UDP_L4,
            _uapi.VIRTIO_NET_HDR_GSO_ECN, _uapi.TCP_CSUM_OFFSET, _uapi.UDP_CSUM_OFFSET,
        ))  # fmt: skip
        _told = True
    return _accel


def coalesce() -> Callable[..., Any] | None:
    """`_accel.coalesce` when it is built and ACCELERATE is on, else None. Called as
    gro.coalesce's body: (packets, tap, max_size, tcp, udp, verify)."""
    c = _configured()
    return None if c is None else c.coalesce


def decode_plain() -> Callable[..., Any] | None:
    """`_accel.decode_plain` when it is built and ACCELERATE is on, else None: the wire
    packets of a drain of plain reads, for a handler (runtime.path.PacketPath.plain_decoder)."""
    c = _configured()
    return None if c is None else c.decode_plain


def coalesce_reads() -> Callable[..., Any] | None:
    """`_accel.coalesce_reads` when it is built and ACCELERATE is on, else None: a plain
    forwarder's drain of raw reads joined for a writer of the same layout (runtime.loop)."""
    c = _configured()
    return None if c is None else c.coalesce_reads
