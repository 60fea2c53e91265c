"""Sans-IO packet work for offloads: checksums, header parsing, the virtio-net header, GSO, GRO.

Pure functions over bytes, bytearray and memoryview; no file descriptor anywhere, and nothing
from mqtun but the kernel ABI (`mqtun._uapi`) and the error family (`mqtun.errors`). Every
refusal is a `MalformedPacket` (a ValueError of mqtun's family, never an OSError) whose
`reason` is one of `REASONS`.
"""

from mqtun.packet.checksum import (
    checksum,
    complete_checksum,
    fold,
    ipv4_header_checksum,
    ones_sum,
    pseudo_header_sum,
    residue,
    transport_checksum,
)
from mqtun.packet.gro import coalesce, offload_checksum
from mqtun.packet.gso import split
from mqtun.packet.headers import (
    REASONS,
    Buffer,
    FlowKey,
    MalformedPacket,
    Parsed,
    flow_key,
    parse,
    parse_ethernet,
)
from mqtun.packet.vnet import ZERO_HEADER, VnetHeader, decode, encode, split_frame

__all__ = [
    "REASONS",
    "ZERO_HEADER",
    "Buffer",
    "FlowKey",
    "MalformedPacket",
    "Parsed",
    "VnetHeader",
    "checksum",
    "coalesce",
    "complete_checksum",
    "decode",
    "encode",
    "flow_key",
    "fold",
    "ipv4_header_checksum",
    "offload_checksum",
    "ones_sum",
    "parse",
    "parse_ethernet",
    "pseudo_header_sum",
    "residue",
    "split",
    "split_frame",
    "transport_checksum",
]
