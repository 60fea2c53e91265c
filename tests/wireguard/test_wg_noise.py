"""The handshake: known answers captured from wireguard-go, and the state machine's refusals.

The captures were made once with tests/wireguard/test_wg_interop.py's topology, fixed keys and
preshared key. Initiator role (fixed ephemeral, index, timestamp): our initiation,
wireguard-go 0.0.20220316's response, its echo reply under the new keys. Our initiation must
come out byte for byte, its response must validate under the transcript we compute, and the
keys we derive must open its data. Responder role (fixed ephemeral and index): its initiation
must validate, our response must come out byte for byte (it was accepted: wireguard-go then
sent data), and that data must open. Independent checks against a peer sharing no code with us."""

from __future__ import annotations

import time

import pytest
from scapy.layers.inet import ICMP, IP, UDP

from mqtun.wireguard import messages as m
from mqtun.wireguard.crypto import public_key
from mqtun.wireguard.noise import (
    Handshake,
    HandshakeState,
    Keypair,
    StaticIdentity,
    consume_initiation,
    tai64n,
)
from mqtun.wireguard.session import Session

pytestmark = pytest.mark.sans_io  # pure: no device, no namespace

OUR_KEY = bytes.fromhex("a8" * 31 + "40")
THEIR_KEY = bytes.fromhex("b0" * 31 + "50")
PSK = bytes(range(32))
EPHEMERAL = bytes.fromhex("e8" * 31 + "48")
TIMESTAMP = tai64n(1_764_584_000 * 10**9)
INITIATION = bytes.fromhex(
    "0100000044332211db19c2a2a31d793823f3f18c544b596017993802ac083435119fe3d2132d96603fea15a9"
    "3312f38d473e857c15de679fa4cea77934eb0e35af60e748608edebde7a639d8c339a2dc54065e397f72e45a"
    "6570c135f8dbd3c0c9e1bcd2c986a331e267c803bbec507b9a356694293d6afaac5e7522770e32627e5447a6"
    "00000000000000000000000000000000")
RESPONSE = bytes.fromhex(
    "020000006040fd82443322113fc4d26f45ad08e409121fb48b606d78a6020e611d54a97a71da838b4ca9fe70"
    "a2d2cfb1023a3d20dd9e71f637dc9e310fdda81b986ef1ea0c8ab670bf76b7fd000000000000000000000000"
    "00000000")
THEIR_TRANSPORT = bytes.fromhex(
    "04000000443322110000000000000000cfa5187914f57efe03bfd1cc53c2d19794f7d54575f5c0bf0c043c1b"
    "a80c0d23ae94dcbd2b4ed167aeffa3e006aa8c65b146777c0d5f079a7bcd386878ed281c")

# The responder's side, captured the same way: wireguard-go's initiation to us, our response
# with a fixed ephemeral and index, and wireguard-go's first data message under the new keys.
RESPONDER_EPHEMERAL = bytes.fromhex("d8" * 31 + "58")
THEIR_INITIATION = bytes.fromhex(
    "0100000036922ad7467e704fddb3f511d3d59d45eb7c20a63c8e27832b44e6801fb15aa3b30b33717e8b42f9"
    "992c26416c3275190f97336fc9887bc2b6aba474bd81df417ed6208ac1b74b37f2d2b737deb65f07fadf0d85"
    "e2f837ca712f7ed483e2ad64df76769fefcca399cfe4814e8e0bcbfbed1b0831bfb34622d1d46fa0eb88d526"
    "00000000000000000000000000000000")
OUR_RESPONSE = bytes.fromhex(
    "020000008877665536922ad7f25209179c90ead86fc77966f3f07f3fedd991474ef10f8c23790679b05de65f"
    "2ae61dfc129514d318243bfcc05840a5437ebe068ddc0842d03edf902534b4a0000000000000000000000000"
    "00000000")
THEIR_CONFIRMATION = bytes.fromhex(
    "04000000887766550000000000000000cac87d8706ea53ccb3fd7faeb545a76979d9852c85f8b5a7f6426c9f"
    "a1a69e645c00d849173250654705e1582db05d83707d3e20d5060f9bbdef597b90304986")


def test_initiation_is_reproduced_byte_for_byte() -> None:
    hs = Handshake(StaticIdentity(OUR_KEY), public_key(THEIR_KEY), PSK)
    assert hs.create_initiation(0x11223344, TIMESTAMP, 0.0, ephemeral_private=EPHEMERAL) == \
        INITIATION
    assert hs.state is HandshakeState.INITIATION_CREATED


def test_wireguard_go_response_validates_and_its_data_opens() -> None:
    hs = Handshake(StaticIdentity(OUR_KEY), public_key(THEIR_KEY), PSK)
    hs.create_initiation(0x11223344, TIMESTAMP, 0.0, ephemeral_private=EPHEMERAL)
    response = m.parse(RESPONSE)
    assert isinstance(response, m.Response) and response.receiver == 0x11223344
    assert StaticIdentity(THEIR_KEY).cookies.check_mac1(INITIATION)
    assert StaticIdentity(OUR_KEY).cookies.check_mac1(RESPONSE)
    keypair = hs.consume_response(response, 0.0)
    assert isinstance(keypair, Keypair) and keypair.is_initiator
    assert hs.state is HandshakeState.ZEROED  # the transcript is wiped once keys exist
    session = Session()
    session.install(keypair)
    transport = m.parse(THEIR_TRANSPORT)
    assert isinstance(transport, m.Transport)
    opened = session.decrypt(transport, 0.0)
    assert not isinstance(opened, m.Drop)
    plain = opened[0]
    assert len(plain) % 16 == 0  # padded to a multiple of 16, as the protocol asks
    reply = IP(plain[:int.from_bytes(plain[2:4], "big")])
    assert (reply.src, reply.dst, reply[ICMP].type, reply[ICMP].seq) == \
        ("198.19.77.2", "198.19.77.1", 0, 1)
    assert bytes(reply[ICMP].payload) == b"mqtun-wg"


def test_wrong_preshared_key_does_not_validate() -> None:
    hs = Handshake(StaticIdentity(OUR_KEY), public_key(THEIR_KEY), bytes(32))
    hs.create_initiation(0x11223344, TIMESTAMP, 0.0, ephemeral_private=EPHEMERAL)
    response = m.parse(RESPONSE)
    assert isinstance(response, m.Response)
    drop = hs.consume_response(response, 0.0)
    assert isinstance(drop, m.Drop) and drop.reason is m.DropReason.DECRYPT_FAILED


def _pair(psk: bytes = bytes(32)) -> tuple[StaticIdentity, Handshake, StaticIdentity, Handshake]:
    a, b = StaticIdentity(OUR_KEY), StaticIdentity(THEIR_KEY)
    return a, Handshake(a, b.public_key, psk), b, Handshake(b, a.public_key, psk)


def _consume(b: StaticIdentity, hb: Handshake, data: bytes, now: float) -> Handshake | m.Drop:
    msg = m.parse(data)
    assert isinstance(msg, m.Initiation)
    return consume_initiation(b, msg, lambda key: hb if key == hb.remote_static else None, now)


def test_both_roles_derive_mirrored_keys() -> None:
    _a, ha, b, hb = _pair(PSK)
    init = ha.create_initiation(1, tai64n(time.time_ns()), 1.0)
    assert _consume(b, hb, init, 1.0) is hb and hb.state is HandshakeState.INITIATION_CONSUMED
    resp, kb = hb.create_response(2, 1.0)
    parsed = m.parse(resp)
    assert isinstance(parsed, m.Response)
    ka = ha.consume_response(parsed, 1.0)
    assert isinstance(ka, Keypair)
    assert (ka.send_key, ka.receive_key) == (kb.receive_key, kb.send_key)
    assert (ka.local_index, ka.remote_index, kb.local_index, kb.remote_index) == (1, 2, 2, 1)
    assert "key" not in repr(ka).lower().replace("keypair", "")


def test_replayed_initiation_timestamp_and_flood_are_refused() -> None:
    _a, ha, b, hb = _pair()
    first = ha.create_initiation(1, tai64n(10**18), 1.0)
    assert _consume(b, hb, first, 1.0) is hb
    replay = _consume(b, hb, first, 5.0)
    assert isinstance(replay, m.Drop) and replay.reason is m.DropReason.REPLAYED_TIMESTAMP
    newer = ha.create_initiation(1, tai64n(10**18 + 10**9), 1.01)
    flood = _consume(b, hb, newer, 1.01)
    assert isinstance(flood, m.Drop) and flood.reason is m.DropReason.FLOOD
    assert _consume(b, hb, newer, 1.05) is hb


def test_unknown_peer_and_tampering() -> None:
    _a, ha, b, hb = _pair()
    init = ha.create_initiation(1, tai64n(time.time_ns()), 1.0)
    msg = m.parse(init)
    assert isinstance(msg, m.Initiation)
    unknown = consume_initiation(b, msg, lambda key: None, 1.0)
    assert isinstance(unknown, m.Drop) and unknown.reason is m.DropReason.UNKNOWN_PEER
    for at in (10, 50, 100):  # ephemeral, static, timestamp
        bad = bytearray(init)
        bad[at] ^= 1
        drop = _consume(b, hb, bytes(bad), 1.0)
        assert isinstance(drop, m.Drop) and drop.reason is m.DropReason.DECRYPT_FAILED
    stale = hb.consume_response(m.Response(9, 1, bytes(32), bytes(16)), 1.0)
    assert isinstance(stale, m.Drop) and stale.reason is m.DropReason.BAD_STATE


def test_tai64n_is_big_endian_and_whitened() -> None:
    stamp = tai64n(1_000_000_000 * 10**9 + 123_456_789)
    assert stamp[:8] == (0x400000000000000A + 1_000_000_000).to_bytes(8, "big")
    assert int.from_bytes(stamp[8:], "big") == 123_456_789 & ~0xFFFFFF
    assert tai64n(2 * 10**18) > tai64n(10**18)


def test_wireguard_go_initiation_validates_and_our_response_is_reproduced() -> None:
    me = StaticIdentity(OUR_KEY)
    hs = Handshake(me, public_key(THEIR_KEY), PSK)
    assert me.cookies.check_mac1(THEIR_INITIATION)
    initiation = m.parse(THEIR_INITIATION)
    assert isinstance(initiation, m.Initiation)
    assert consume_initiation(me, initiation, lambda key: hs if key == public_key(THEIR_KEY)
                              else None, 0.0) is hs
    assert hs.last_timestamp[:8] > bytes.fromhex("4000000069000000")  # a 2026 TAI64 label
    response, keypair = hs.create_response(0x55667788, 0.0,
                                           ephemeral_private=RESPONDER_EPHEMERAL)
    assert response == OUR_RESPONSE and not keypair.is_initiator
    session = Session()
    session.install(keypair)
    data = m.parse(THEIR_CONFIRMATION)
    assert isinstance(data, m.Transport) and data.receiver == 0x55667788
    opened = session.decrypt(data, 0.0)
    assert not isinstance(opened, m.Drop)
    plain = opened[0]
    packet = IP(plain[:int.from_bytes(plain[2:4], "big")])
    assert bytes(packet[UDP].payload) == b"from wireguard-go"
    assert session.current is not None and session.current.keypair is keypair  # confirmed
