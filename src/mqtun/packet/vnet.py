"""The virtio-net header that precedes every packet on an IFF_VNET_HDR queue.

Three layouts share one prefix: `virtio_net_hdr` (10 bytes), `virtio_net_hdr_mrg_rxbuf` (12, adds
num_buffers) and `virtio_net_hdr_v1_hash_tunnel` (24, adds the hash report and the UDP-tunnel
offsets of Linux 6.17+). A queue's header size may be any value >= 10 (TUNSETVNETHDRSZ): the
kernel reads the fields that fit and skips the rest, so encode pads and decode ignores the tail.

The 16-bit fields are in the byte order the kernel uses for the device: native unless
TUNSETVNETLE (little) or TUNSETVNETBE (big) was set. `little_endian=None` means native.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from functools import cache
from typing import NamedTuple

from mqtun._uapi import (
    VIRTIO_NET_HDR_BODY,
    VIRTIO_NET_HDR_F_NEEDS_CSUM,
    VIRTIO_NET_HDR_GSO_ECN,
    VIRTIO_NET_HDR_GSO_NONE,
    VIRTIO_NET_HDR_GSO_UDP_TUNNEL,
    VIRTIO_NET_HDR_MRG_RXBUF_BODY,
    VIRTIO_NET_HDR_MRG_RXBUF_SIZE,
    VIRTIO_NET_HDR_SIZE,
    VIRTIO_NET_HDR_V1_HASH_TUNNEL_BODY,
    VIRTIO_NET_HDR_V1_HASH_TUNNEL_SIZE,
)
from mqtun.errors import InvalidArgumentError
from mqtun.packet.headers import Buffer, MalformedPacket

__all__ = ["ZERO_HEADER", "VnetHeader", "decode", "decoder", "encode", "split_frame"]


class VnetHeader(NamedTuple):
    """One virtio-net header; fields past the chosen size are dropped by encode, 0 from decode."""

    flags: int = 0
    gso_type: int = 0
    hdr_len: int = 0
    gso_size: int = 0
    csum_start: int = 0
    csum_offset: int = 0
    num_buffers: int = 0
    hash_value: int = 0
    hash_report: int = 0
    outer_th_offset: int = 0
    inner_nh_offset: int = 0

    @property
    def needs_csum(self) -> bool:
        return bool(self.flags & VIRTIO_NET_HDR_F_NEEDS_CSUM)

    @property
    def is_gso(self) -> bool:
        return self.gso_type != VIRTIO_NET_HDR_GSO_NONE

    @property
    def gso_base(self) -> int:
        """The segmentation kind without the ECN and UDP-tunnel bits (TCPV4, TCPV6, UDP_L4...)."""
        return self.gso_type & ~(VIRTIO_NET_HDR_GSO_ECN | VIRTIO_NET_HDR_GSO_UDP_TUNNEL) & 0xFF

    @property
    def is_tunnel(self) -> bool:
        return bool(self.gso_type & VIRTIO_NET_HDR_GSO_UDP_TUNNEL)

    def encode(
        self, size: int = VIRTIO_NET_HDR_SIZE, *, little_endian: bool | None = None
    ) -> bytes:
        return encode(self, size, little_endian=little_endian)


ZERO_HEADER = VnetHeader()
"""No checksum or segmentation work: what a plain, complete packet carries."""


def _prefix(little_endian: bool | None) -> str:
    return "=" if little_endian is None else ("<" if little_endian else ">")


@cache
def _struct(size: int, little_endian: bool | None) -> tuple[struct.Struct, int]:
    """The Struct for the widest layout that fits in `size`, and how many fields it has."""
    if size < VIRTIO_NET_HDR_SIZE:
        raise InvalidArgumentError(f"a virtio-net header is at least 10 bytes, not {size}")
    if size >= VIRTIO_NET_HDR_V1_HASH_TUNNEL_SIZE:
        return struct.Struct(_prefix(little_endian) + VIRTIO_NET_HDR_V1_HASH_TUNNEL_BODY), 11
    if size >= VIRTIO_NET_HDR_MRG_RXBUF_SIZE:
        return struct.Struct(_prefix(little_endian) + VIRTIO_NET_HDR_MRG_RXBUF_BODY), 7
    return struct.Struct(_prefix(little_endian) + VIRTIO_NET_HDR_BODY), 6


def encode(
    hdr: VnetHeader, size: int = VIRTIO_NET_HDR_SIZE, *, little_endian: bool | None = None
) -> bytes:
    """`size` bytes: the header in the widest layout that fits, zero-padded to `size`."""
    st, nfields = _struct(size, little_endian)
    try:
        raw = st.pack(*hdr[:nfields])
    except struct.error as exc:
        raise InvalidArgumentError(f"virtio-net header field out of range: {exc}") from None
    return raw if len(raw) == size else raw.ljust(size, b"\0")


def decode(
    buf: Buffer, size: int = VIRTIO_NET_HDR_SIZE, *, little_endian: bool | None = None
) -> VnetHeader:
    """The header at the start of `buf`, read with the layout a queue of header size `size` uses."""
    st, _ = _struct(size, little_endian)
    if len(buf) < size:
        raise MalformedPacket("short-vnet-header", f"{len(buf)} bytes, the queue uses {size}")
    return VnetHeader(*st.unpack_from(buf))


def decoder(size: int = VIRTIO_NET_HDR_SIZE, *, little_endian: bool | None = None,
            ) -> Callable[[Buffer, int], VnetHeader]:
    """`decode` for one queue's layout, chosen once: read(buf, offset) -> the header at
    `offset`, for a caller that already checked `buf` holds `size` bytes from there (a packet
    path decodes one header per read, where the layout lookup and the slice cost as much)."""
    unpack_from = _struct(size, little_endian)[0].unpack_from

    def read(buf: Buffer, offset: int) -> VnetHeader:
        return VnetHeader(*unpack_from(buf, offset))  # fields past the layout default to 0

    return read


def split_frame(
    buf: Buffer, size: int = VIRTIO_NET_HDR_SIZE, *, little_endian: bool | None = None
) -> tuple[VnetHeader, memoryview]:
    """A read from a vnet queue taken apart: (header, the packet after it), without a copy."""
    hdr = decode(buf, size, little_endian=little_endian)
    return hdr, memoryview(buf)[size:]
