from collections.abc import Sequence

from mqtun.packet.headers import Buffer
from mqtun.packet.vnet import VnetHeader

def tcp_rows(
    template: Buffer,
    payload: Buffer,
    mss: int,
    l3: int,
    l4: int,
    v4: bool,
    ip_id0: int,
    seq0: int,
    first_flags: int,
    mid_flags: int,
    last_flags: int,
    pseudo: int,
    as_list: bool = False,
    /,
) -> bytearray | list[bytes]: ...

def completed(packet: Buffer, csum_start: int, at: int, /) -> bytes: ...

def configure(zero_header: VnetHeader, header_type: type[VnetHeader],
              numbers: tuple[int, ...], /) -> None: ...

def coalesce(
    packets: Sequence[Buffer], tap: bool, max_size: int, tcp: bool, udp: bool, verify: bool, /
) -> list[tuple[VnetHeader, Buffer]]: ...

def coalesce_reads(
    prefix: int,
    vnet_at: int,
    vnet_size: int,
    little_endian: bool,
    tap: bool,
    max_size: int,
    tcp: bool,
    udp: bool,
    verify: bool,
    reads: Sequence[Buffer],
    /,
) -> tuple[list[Buffer], list[int] | None]: ...

def decode_plain(
    prefix: int,
    pi_strip: int,
    vnet_at: int,
    little_endian: bool,
    fast_mtu: int,
    views: bool,
    reads: list[bytes],
    /,
) -> list[Buffer] | None: ...
