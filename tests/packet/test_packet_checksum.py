"""One's-complement sums and checksums against a word-by-word reference and against scapy."""

from __future__ import annotations

import importlib
import os
import pickle

import packet_builders as pb
import pytest
from hypothesis import given
from hypothesis import strategies as st

from mqtun.errors import MqtunError, MqtunException
from mqtun.packet import (
    MalformedPacket,
    checksum,
    complete_checksum,
    fold,
    ipv4_header_checksum,
    ones_sum,
    parse,
    pseudo_header_sum,
    residue,
    transport_checksum,
)
from mqtun.packet.checksum import completed, congruent, fold_plan

pytestmark = pytest.mark.usefixtures("both_sums")  # numpy and pure-Python sums
checksum_module = importlib.import_module("mqtun.packet.checksum")


def reference_sum(data: bytes) -> int:
    """RFC 1071 the slow way: add 16-bit words, fold the carries back in."""
    if len(data) % 2:
        data += b"\0"
    total = sum(int.from_bytes(data[i : i + 2], "big") for i in range(0, len(data), 2))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return total


@given(st.binary(max_size=3000))
def test_ones_sum_matches_the_word_by_word_sum(data: bytes) -> None:
    assert ones_sum(data) == reference_sum(data)
    assert residue(data) == reference_sum(data) % 0xFFFF
    assert congruent(data) % 0xFFFF == residue(data)
    assert checksum(data) == ~reference_sum(data) & 0xFFFF


@pytest.mark.parametrize("size", [127, 128, 129, 1447, 1448, 2049, 9000, 16384, 16385, 65535])
def test_large_sizes_fold_correctly(size: int) -> None:
    for data in (os.urandom(size), b"\xff" * size, bytes(size)):
        assert ones_sum(data) == reference_sum(data)


def test_memoryview_and_bytearray_inputs() -> None:
    data = os.urandom(3001)
    assert residue(memoryview(data)[1:]) == residue(bytearray(data[1:])) == residue(data[1:])


def test_rfc1071_example_and_the_two_zeros() -> None:
    # RFC 1071 section 3: 00 01 f2 03 f4 f5 f6 f7 sums to 0xddf2
    assert ones_sum(bytes.fromhex("0001f203f4f5f6f7")) == 0xDDF2
    assert checksum(bytes.fromhex("0001f203f4f5f6f7")) == 0x220D
    assert ones_sum(b"\xff\xff\xff\xff") == 0xFFFF  # a non-zero sum never folds to 0
    assert ones_sum(bytes(6)) == 0
    assert fold(0) == 0 and fold(0xFFFF) == 0xFFFF and fold(0x1FFFE) == 0xFFFF
    assert fold(0x12345) == 0x2346


def test_fold_plan_keeps_the_congruence() -> None:
    data = os.urandom(1448)
    v = int.from_bytes(data, "big")
    for s, m in fold_plan(1448):
        v = (v >> s) + (v & m)
    assert v.bit_length() <= 1100
    assert v % 0xFFFF == residue(data)


@given(st.binary(min_size=0, max_size=1500), st.booleans(), st.booleans())
def test_transport_checksum_matches_scapy(payload: bytes, v6: bool, is_udp: bool) -> None:
    shape = pb.Shape(v6=v6)
    raw = pb.udp(shape, payload) if is_udp else pb.tcp(shape, payload)
    p = parse(raw)
    segment = raw[p.l4_off : p.end]
    field = 6 if is_udp else 16
    want = int.from_bytes(segment[field : field + 2], "big")  # scapy's checksum
    got = transport_checksum(p.src, p.dst, p.proto, segment, field_offset=field)
    assert pb.same_checksum(got, want)
    if is_udp:
        assert got != 0


@given(st.integers(0, 0xFFFF), st.integers(0, 255), st.booleans())
def test_ipv4_header_checksum_matches_scapy(ip_id: int, tos: int, options: bool) -> None:
    raw = pb.udp(pb.Shape(ip_options=options), b"abc", ip_id=ip_id, tos=tos)
    ihl = (raw[0] & 0xF) * 4
    assert ipv4_header_checksum(raw[:ihl]) == int.from_bytes(raw[10:12], "big")
    broken = bytearray(raw[:ihl])
    broken[10:12] = b"\x12\x34"  # the field's current value does not matter
    assert ipv4_header_checksum(broken) == int.from_bytes(raw[10:12], "big")


@given(st.binary(min_size=0, max_size=2000), st.booleans(), st.booleans(), st.booleans())
def test_complete_checksum_finishes_a_needs_csum_packet(
    payload: bytes, v6: bool, is_udp: bool, tap: bool
) -> None:
    shape = pb.Shape(v6=v6, tap=tap)
    raw = pb.udp(shape, payload) if is_udp else pb.tcp(shape, payload)
    p = parse(raw, tap=tap)
    off = 6 if is_udp else 16
    partial = bytearray(raw)
    seed = pseudo_header_sum(p.src, p.dst, p.proto, p.end - p.l4_off)
    partial[p.l4_off + off : p.l4_off + off + 2] = seed.to_bytes(2, "big")
    copy = completed(bytes(partial), p.l4_off, off)  # the copying form: the same result
    complete_checksum(partial, p.l4_off, off)
    assert copy == partial
    at = p.l4_off + off
    assert pb.same_checksum(
        int.from_bytes(partial[at : at + 2], "big"), int.from_bytes(raw[at : at + 2], "big")
    )
    assert partial[:at] == raw[:at] and partial[at + 2 :] == raw[at + 2 :]


def test_complete_checksum_refuses_offsets_past_the_end() -> None:
    buf = bytearray(40)
    with pytest.raises(MalformedPacket) as info:
        complete_checksum(buf, 30, 9)
    assert info.value.reason == "bad-csum-offset"
    assert isinstance(info.value, ValueError) and isinstance(info.value, MqtunException)


def test_malformed_packet_is_not_an_os_error() -> None:
    """`except OSError` around I/O must not swallow a parse error."""
    with pytest.raises(MalformedPacket) as info:
        try:
            parse(b"\x45" + bytes(10))
        except OSError:  # what an I/O shell catches for a failed read or write
            pytest.fail("a MalformedPacket was caught as an OSError")
    err = info.value
    assert not isinstance(err, OSError) and isinstance(err, ValueError)
    assert isinstance(err, MqtunException) and not isinstance(err, MqtunError)
    assert err.reason == "truncated-ipv4" and str(err).startswith("malformed packet (")
    again = pickle.loads(pickle.dumps(err))
    assert (type(again), again.reason, again.detail, str(again)) == (
        MalformedPacket, err.reason, err.detail, str(err))


def test_malformed_packet_survives_pickling() -> None:
    err = pickle.loads(pickle.dumps(MalformedPacket("truncated-tcp", "3 bytes")))
    assert err.reason == "truncated-tcp" and "3 bytes" in str(err)


@given(st.binary(min_size=0, max_size=4000), st.integers(1, 600), st.integers(0, 40))
def test_piece_sums_agree_with_residue(data: bytes, size: int, count: int) -> None:
    size += size & 1
    count = min(count, len(data) // size)
    sums = checksum_module.piece_sums(data, size, count)
    if sums is None:  # pure-Python run, or a shape numpy is not used for
        assert not checksum_module.VECTORIZE or count < 8
        return
    assert [v % 0xFFFF for v in sums] == [
        residue(data[k * size : (k + 1) * size]) for k in range(count)
    ]
    pieces = [data[k * size : (k + 1) * size] for k in range(count)] + [data[:3]]
    got = checksum_module.packet_sums(pieces)
    assert got is not None and got[-1] is None
    assert [v % 0xFFFF for v in got[:-1]] == [residue(p) for p in pieces[:-1]]
