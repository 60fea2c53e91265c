"""The virtio-net header codec: the kernel's three layouts, any header size, both byte orders."""

from __future__ import annotations

import struct
import sys

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mqtun.errors import InvalidArgumentError
from mqtun.packet import ZERO_HEADER, MalformedPacket, VnetHeader, decode, encode, split_frame

u8 = st.integers(0, 0xFF)
u16 = st.integers(0, 0xFFFF)
headers = st.builds(
    VnetHeader, u8, u8, u16, u16, u16, u16, u16, st.integers(0, 0xFFFFFFFF), u16, u16, u16
)
orders = st.sampled_from([None, True, False])


@given(headers, st.integers(10, 40), orders)
def test_round_trip_keeps_the_fields_that_fit(
    hdr: VnetHeader, size: int, order: bool | None
) -> None:
    raw = encode(hdr, size, little_endian=order)
    assert len(raw) == size
    back = decode(raw + b"tail", size, little_endian=order)
    kept = 6 if size < 12 else (7 if size < 24 else 11)
    assert back[:kept] == hdr[:kept]
    assert all(v == 0 for v in back[kept:])
    assert raw[24:] == bytes(max(0, size - 24))


def test_layout_is_the_kernels() -> None:
    """Offsets from include/uapi/linux/virtio_net.h: flags@0 gso_type@1 hdr_len@2 gso_size@4
    csum_start@6 csum_offset@8 num_buffers@10 hash_value@12 hash_report@16 padding@18
    outer_th_offset@20 inner_nh_offset@22."""
    hdr = VnetHeader(0x01, 0x21, 0x0203, 0x0405, 0x0607, 0x0809, 0x0A0B, 0x0C0D0E0F, 0x1011,
                     0x1415, 0x1617)  # fmt: skip
    le = encode(hdr, 24, little_endian=True)
    assert le == bytes.fromhex("0121 0302 0504 0706 0908 0b0a 0f0e0d0c 1110 0000 1514 1716")
    be = encode(hdr, 24, little_endian=False)
    assert be == bytes.fromhex("0121 0203 0405 0607 0809 0a0b 0c0d0e0f 1011 0000 1415 1617")
    native = encode(hdr, 24)
    assert native == (le if sys.byteorder == "little" else be)
    assert encode(hdr, 10, little_endian=True) == le[:10]
    assert encode(hdr, 12, little_endian=True) == le[:12]


def test_properties() -> None:
    hdr = VnetHeader(flags=1, gso_type=0x80 | 0x20 | 4)
    assert hdr.needs_csum and hdr.is_gso and hdr.is_tunnel and hdr.gso_base == 4
    assert not ZERO_HEADER.is_gso and not ZERO_HEADER.needs_csum


def test_refusals() -> None:
    with pytest.raises(MalformedPacket) as info:
        decode(b"\0" * 9)
    assert info.value.reason == "short-vnet-header"
    with pytest.raises(MalformedPacket):
        decode(b"\0" * 20, 24)
    with pytest.raises(InvalidArgumentError):
        encode(ZERO_HEADER, 8)
    with pytest.raises(InvalidArgumentError):
        encode(VnetHeader(gso_size=0x10000))


def test_split_frame_is_a_view() -> None:
    hdr = VnetHeader(1, 1, 54, 1448, 34, 16, 1)
    buf = bytearray(encode(hdr, 12) + b"packet")
    got, view = split_frame(buf, 12)
    assert got == hdr and bytes(view) == b"packet"
    buf[12] = ord("P")
    assert bytes(view) == b"Packet"  # no copy was made
    assert struct.calcsize("=BBHHHH") == 10


@given(st.binary(max_size=1600), st.sampled_from([10, 12, 20, 24]), orders, st.booleans())
def test_fuzz_queue_reads_decode_and_split_or_are_refused(
    raw: bytes, size: int, order: bool | None, tap: bool
) -> None:
    """Whatever a vnet queue hands over (any bytes, any header size), the receive path
    (header decode, then GSO split) either yields packets or raises MalformedPacket."""
    from mqtun.packet import split

    try:
        hdr, pkt = split_frame(raw, size, little_endian=order)
        segs = split(hdr, pkt, tap=tap, max_segments=4096)
    except MalformedPacket as err:
        assert err.reason
    else:
        assert len(raw) >= size and all(isinstance(s, bytes) for s in segs)


@given(st.sampled_from([10, 12, 20, 24]), st.sampled_from([None, True, False]),
       st.integers(0, 8), st.binary(min_size=24, max_size=24))
def test_a_layouts_decoder_reads_what_decode_reads(size: int, little_endian: bool | None,
                                                   offset: int, raw: bytes) -> None:
    from mqtun.packet.vnet import decoder

    buf = bytes(offset) + raw
    assert decoder(size, little_endian=little_endian)(memoryview(buf), offset) == decode(
        buf[offset:], size, little_endian=little_endian)
