"""The wire formats: exact sizes, round trips, and refusal reasons instead of exceptions."""

from __future__ import annotations

import os

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mqtun.wireguard import messages as m

pytestmark = pytest.mark.sans_io  # pure: no device, no namespace


def test_sizes_and_round_trips() -> None:
    init = m.Initiation(7, os.urandom(32), os.urandom(48), os.urandom(28), os.urandom(16),
                        os.urandom(16))
    resp = m.Response(8, 7, os.urandom(32), os.urandom(16), os.urandom(16), os.urandom(16))
    cookie = m.CookieReply(7, os.urandom(24), os.urandom(32))
    assert [len(x.pack()) for x in (init, resp, cookie)] == [148, 92, 64]
    assert m.parse(init.pack()) == init
    assert m.parse(resp.pack()) == resp
    assert m.parse(cookie.pack()) == cookie
    wire = m.Transport.header(0xDEADBEEF, 2**64 - 1) + bytes(16)
    parsed = m.parse(wire)
    assert isinstance(parsed, m.Transport)
    assert (parsed.receiver, parsed.counter, len(parsed.packet)) == (0xDEADBEEF, 2**64 - 1, 16)
    assert wire[:4] == b"\x04\x00\x00\x00"


def test_refusals_name_their_reason() -> None:
    init = m.Initiation(1, bytes(32), bytes(48), bytes(28)).pack()
    cases = {
        b"": m.DropReason.SHORT,
        b"\x01\x00": m.DropReason.SHORT,
        init[:-1]: m.DropReason.BAD_LENGTH,
        init + b"\x00": m.DropReason.BAD_LENGTH,
        b"\x02" + bytes(91 + 1): m.DropReason.BAD_LENGTH,
        b"\x03" + bytes(62): m.DropReason.BAD_LENGTH,
        b"\x04" + bytes(30): m.DropReason.SHORT,  # below a keepalive's 32 bytes
        b"\x05" + bytes(40): m.DropReason.UNKNOWN_TYPE,
        b"\x01\x01\x00\x00" + init[4:]: m.DropReason.UNKNOWN_TYPE,  # reserved bytes not zero
    }
    for data, reason in cases.items():
        drop = m.parse(data)
        assert isinstance(drop, m.Drop) and drop.reason is reason, (data[:8], drop)


@given(st.binary(max_size=300))
def test_parse_never_raises(data: bytes) -> None:
    result = m.parse(data)
    assert isinstance(result, m.Drop | m.Initiation | m.Response | m.CookieReply | m.Transport)
