from mqtun.packet.headers import Buffer

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
