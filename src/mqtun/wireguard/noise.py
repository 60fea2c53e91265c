"""The Noise_IKpsk2_25519_ChaChaPoly_BLAKE2s handshake as WireGuard runs it, over bytes.

One `Handshake` per peer holds the transcript (hash, chaining key), the ephemeral key and the
indexes; its state moves ZEROED -> INITIATION_CREATED -> RESPONSE_CONSUMED on the initiator and
ZEROED -> INITIATION_CONSUMED -> RESPONSE_CREATED on the responder, and ends by deriving a
`Keypair`. Nothing here reads a clock or the network: `now` (monotonic seconds) and the TAI64N
`timestamp` are passed in, and the ephemeral private key can be (known-answer tests do).
Refusals come back as `Drop`s, never as exceptions.
"""

from __future__ import annotations

import enum
import os
import struct
from collections.abc import Callable
from dataclasses import dataclass

from mqtun.wireguard import crypto
from mqtun.wireguard.cookie import CookieChecker, CookieGenerator
from mqtun.wireguard.messages import Drop, DropReason, Initiation, Response

__all__ = [
    "CONSTRUCTION",
    "HANDSHAKE_INITIATION_RATE",
    "IDENTIFIER",
    "Handshake",
    "HandshakeState",
    "Keypair",
    "StaticIdentity",
    "consume_initiation",
    "tai64n",
]

CONSTRUCTION = b"Noise_IKpsk2_25519_ChaChaPoly_BLAKE2s"
IDENTIFIER = b"WireGuard v1 zx2c4 Jason@zx2c4.com"
INITIAL_CHAIN_KEY = crypto.hash_(CONSTRUCTION)
INITIAL_HASH = crypto.hash_(INITIAL_CHAIN_KEY, IDENTIFIER)
HANDSHAKE_INITIATION_RATE = 1 / 50  # at most one initiation per peer consumed per 20 ms
_TAI64_BASE = 0x400000000000000A
_WHITENER = 0xFFFFFF  # low 24 bits of the nanoseconds are zeroed: no fine clock leaks


def tai64n(unix_time_ns: int) -> bytes:
    """The 12-byte TAI64N label of a wall-clock time, whitened as wireguard-go does."""
    seconds, nanos = divmod(unix_time_ns, 1_000_000_000)
    return struct.pack(">QI", _TAI64_BASE + seconds, nanos & ~_WHITENER)


def new_private_key() -> bytes:
    key = bytearray(os.urandom(32))
    key[0] &= 248
    key[31] = (key[31] & 127) | 64
    return bytes(key)


class StaticIdentity:
    """This side's long-term key pair and the cookie checker keyed by its public key."""

    def __init__(self, private_key: bytes) -> None:
        if len(private_key) != 32:
            raise ValueError("a WireGuard private key is 32 bytes")
        self.private_key = private_key
        self.public_key = crypto.public_key(private_key)
        self.cookies = CookieChecker(self.public_key)


class HandshakeState(enum.Enum):
    ZEROED = 0
    INITIATION_CREATED = 1
    INITIATION_CONSUMED = 2
    RESPONSE_CREATED = 3
    RESPONSE_CONSUMED = 4


@dataclass(slots=True)
class Keypair:
    """The symmetric session one handshake produced (keys never appear in repr or logs)."""

    send_key: bytes
    receive_key: bytes
    local_index: int
    remote_index: int
    is_initiator: bool
    created: float

    def __repr__(self) -> str:
        role = "initiator" if self.is_initiator else "responder"
        return f"Keypair(local={self.local_index:#x}, remote={self.remote_index:#x}, {role})"


def _mix_hash(h: bytes, data: bytes) -> bytes:
    return crypto.hash_(h, data)


class Handshake:
    """The handshake with one peer: its static key, optional preshared key, and our transcript."""

    def __init__(self, local: StaticIdentity, remote_static: bytes,
                 preshared_key: bytes = bytes(32)) -> None:
        self.local = local
        self.remote_static = remote_static
        self.preshared_key = preshared_key
        self.cookies = CookieGenerator(remote_static)
        self.precomputed = crypto.dh(local.private_key, remote_static)
        self.state = HandshakeState.ZEROED
        self.last_timestamp = bytes(12)
        self.last_initiation_consumed = float("-inf")
        self.last_sent = float("-inf")
        self._clear()

    def _clear(self) -> None:
        self.hash = b""
        self.chain_key = b""
        self.local_ephemeral = b""
        self.remote_ephemeral = b""
        self.local_index = 0
        self.remote_index = 0
        self.state = HandshakeState.ZEROED

    # -- initiator -----------------------------------------------------------------------
    def create_initiation(self, local_index: int, timestamp: bytes, now: float, *,
                          ephemeral_private: bytes | None = None) -> bytes:
        """Message 1, with mac1/mac2 filled; the state becomes INITIATION_CREATED."""
        if self.precomputed is None:
            raise ValueError("the peer's public key is a low-order point")
        eph = ephemeral_private or new_private_key()
        eph_pub = crypto.public_key(eph)
        h = _mix_hash(INITIAL_HASH, self.remote_static)
        ck = crypto.kdf1(INITIAL_CHAIN_KEY, eph_pub)
        h = _mix_hash(h, eph_pub)
        ss = crypto.dh(eph, self.remote_static)
        assert ss is not None  # remote_static passed the precomputation check
        ck, key = crypto.kdf2(ck, ss)
        enc_static = crypto.aead_encrypt(key, 0, self.local.public_key, h)
        h = _mix_hash(h, enc_static)
        ck, key = crypto.kdf2(ck, self.precomputed)
        enc_time = crypto.aead_encrypt(key, 0, timestamp, h)
        h = _mix_hash(h, enc_time)
        self.hash, self.chain_key, self.local_ephemeral = h, ck, eph
        self.local_index, self.last_sent = local_index, now
        self.state = HandshakeState.INITIATION_CREATED
        msg = bytearray(Initiation(local_index, eph_pub, enc_static, enc_time).pack())
        self.cookies.add_macs(msg, now)
        return bytes(msg)

    def consume_response(self, msg: Response, now: float) -> Keypair | Drop:
        """Message 2 for our initiation -> the session keypair (we are the initiator)."""
        if self.state is not HandshakeState.INITIATION_CREATED or msg.receiver != self.local_index:
            return Drop(DropReason.BAD_STATE, "no initiation outstanding for this response")
        h = _mix_hash(self.hash, msg.ephemeral)
        ck = crypto.kdf1(self.chain_key, msg.ephemeral)
        ee = crypto.dh(self.local_ephemeral, msg.ephemeral)
        se = crypto.dh(self.local.private_key, msg.ephemeral)
        if ee is None or se is None:
            return Drop(DropReason.DECRYPT_FAILED, "low-order ephemeral")
        ck = crypto.kdf1(ck, ee)
        ck = crypto.kdf1(ck, se)
        ck, tau, key = crypto.kdf3(ck, self.preshared_key)
        h = _mix_hash(h, tau)
        try:
            crypto.aead_decrypt(key, 0, msg.encrypted_nothing, h)
        except crypto.InvalidTag:
            return Drop(DropReason.DECRYPT_FAILED, "response does not authenticate")
        send, receive = crypto.kdf2(ck, b"")
        keypair = Keypair(send, receive, self.local_index, msg.sender, True, now)
        self._clear()
        return keypair

    # -- responder -----------------------------------------------------------------------
    def create_response(self, local_index: int, now: float, *,
                        ephemeral_private: bytes | None = None) -> tuple[bytes, Keypair]:
        """Message 2 (macs filled) and the session keypair (we are the responder)."""
        if self.state is not HandshakeState.INITIATION_CONSUMED:
            raise ValueError("a response needs a consumed initiation")
        eph = ephemeral_private or new_private_key()
        eph_pub = crypto.public_key(eph)
        h = _mix_hash(self.hash, eph_pub)
        ck = crypto.kdf1(self.chain_key, eph_pub)
        ee = crypto.dh(eph, self.remote_ephemeral)
        se = crypto.dh(eph, self.remote_static)
        assert ee is not None and se is not None  # both checked when the initiation was consumed
        ck = crypto.kdf1(ck, ee)
        ck = crypto.kdf1(ck, se)
        ck, tau, key = crypto.kdf3(ck, self.preshared_key)
        h = _mix_hash(h, tau)
        empty = crypto.aead_encrypt(key, 0, b"", h)
        msg = bytearray(Response(local_index, self.remote_index, eph_pub, empty).pack())
        self.cookies.add_macs(msg, now)
        receive, send = crypto.kdf2(ck, b"")
        keypair = Keypair(send, receive, local_index, self.remote_index, False, now)
        self._clear()
        return bytes(msg), keypair


def consume_initiation(local: StaticIdentity, msg: Initiation,
                       find_peer: Callable[[bytes], Handshake | None],
                       now: float) -> Handshake | Drop:
    """Message 1 -> the peer's Handshake, now INITIATION_CONSUMED and ready to respond.

    `find_peer` maps the decrypted static public key to the configured peer (None: unknown).
    The timestamp must be newer than the last one accepted from that peer (replay), and one
    initiation per peer is consumed per HANDSHAKE_INITIATION_RATE at most (flood).
    """
    h = _mix_hash(_mix_hash(INITIAL_HASH, local.public_key), msg.ephemeral)
    ck = crypto.kdf1(INITIAL_CHAIN_KEY, msg.ephemeral)
    es = crypto.dh(local.private_key, msg.ephemeral)
    if es is None:
        return Drop(DropReason.DECRYPT_FAILED, "low-order ephemeral")
    ck, key = crypto.kdf2(ck, es)
    try:
        remote_static = crypto.aead_decrypt(key, 0, msg.encrypted_static, h)
    except crypto.InvalidTag:
        return Drop(DropReason.DECRYPT_FAILED, "initiation static does not authenticate")
    h = _mix_hash(h, msg.encrypted_static)
    peer = find_peer(remote_static)
    if peer is None:
        return Drop(DropReason.UNKNOWN_PEER)
    if peer.precomputed is None:
        return Drop(DropReason.DECRYPT_FAILED, "low-order peer key")
    ck, key = crypto.kdf2(ck, peer.precomputed)
    try:
        timestamp = crypto.aead_decrypt(key, 0, msg.encrypted_timestamp, h)
    except crypto.InvalidTag:
        return Drop(DropReason.DECRYPT_FAILED, "initiation timestamp does not authenticate")
    h = _mix_hash(h, msg.encrypted_timestamp)
    if timestamp <= peer.last_timestamp:
        return Drop(DropReason.REPLAYED_TIMESTAMP)
    if now - peer.last_initiation_consumed <= HANDSHAKE_INITIATION_RATE:
        return Drop(DropReason.FLOOD)
    peer.hash, peer.chain_key = h, ck
    peer.remote_index, peer.remote_ephemeral = msg.sender, msg.ephemeral
    peer.last_timestamp, peer.last_initiation_consumed = timestamp, now
    peer.state = HandshakeState.INITIATION_CONSUMED
    return peer
