"""MAC1/MAC2 and cookie replies between two identities, with time passed in."""

from __future__ import annotations

import time

import pytest

from mqtun.wireguard import messages as m
from mqtun.wireguard.cookie import COOKIE_REFRESH_TIME, source_bytes
from mqtun.wireguard.noise import Handshake, StaticIdentity, tai64n

pytestmark = pytest.mark.sans_io  # pure: no device, no namespace

A = bytes.fromhex("a8" * 31 + "40")
B = bytes.fromhex("b0" * 31 + "50")
SRC = source_bytes("198.18.0.1", 51820)


def test_mac1_binds_the_receiver() -> None:
    a, b = StaticIdentity(A), StaticIdentity(B)
    init = Handshake(a, b.public_key).create_initiation(1, tai64n(time.time_ns()), 0.0)
    assert b.cookies.check_mac1(init) and not a.cookies.check_mac1(init)
    assert init[-16:] == bytes(16)  # no cookie yet: mac2 is zero
    bad = bytearray(init)
    bad[20] ^= 1
    assert not b.cookies.check_mac1(bytes(bad))


def test_cookie_round_trip_gives_a_valid_mac2() -> None:
    a, b = StaticIdentity(A), StaticIdentity(B)
    hs = Handshake(a, b.public_key)
    init = hs.create_initiation(1, tai64n(time.time_ns()), 10.0)
    assert not b.cookies.check_mac2(init, SRC, 10.0)
    reply = b.cookies.create_reply(init, 1, SRC, 10.0)
    parsed = m.parse(reply.pack())
    assert parsed == reply
    assert hs.cookies.consume_reply(reply, 10.0)
    second = hs.create_initiation(1, tai64n(time.time_ns()), 11.0)
    assert second[-16:] != bytes(16)
    assert b.cookies.check_mac1(second) and b.cookies.check_mac2(second, SRC, 11.0)
    assert not b.cookies.check_mac2(second, source_bytes("198.18.0.1", 51821), 11.0)
    # the secret expires: an old cookie stops counting, and the initiator stops sending it
    assert not b.cookies.check_mac2(second, SRC, 10.0 + COOKIE_REFRESH_TIME + 1)
    late = hs.create_initiation(1, tai64n(time.time_ns()), 11.0 + COOKIE_REFRESH_TIME + 1)
    assert late[-16:] == bytes(16)


def test_a_reply_to_another_message_is_refused() -> None:
    a, b = StaticIdentity(A), StaticIdentity(B)
    hs = Handshake(a, b.public_key)
    first = hs.create_initiation(1, tai64n(time.time_ns()), 0.0)
    reply = b.cookies.create_reply(first, 1, SRC, 0.0)
    hs.create_initiation(2, tai64n(time.time_ns()), 0.1)  # a newer mac1 than the reply binds
    assert not hs.cookies.consume_reply(reply, 0.1)
    assert not Handshake(a, b.public_key).cookies.consume_reply(reply, 0.1)  # sent nothing
