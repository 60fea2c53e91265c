"""The four WireGuard wire formats: parse with validation, build from fields.

Every message starts with a little-endian 32-bit word whose low byte is the type and whose
other three bytes are zero. Handshake messages have one exact size; a transport message is a
16-byte header followed by at least a 16-byte tag. `parse` never raises: what it cannot accept
comes back as a `Drop` naming the reason, to be counted by whoever received the datagram.
"""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass

__all__ = [
    "COOKIE_REPLY",
    "COOKIE_REPLY_SIZE",
    "INITIATION",
    "INITIATION_SIZE",
    "KEEPALIVE_SIZE",
    "RESPONSE",
    "RESPONSE_SIZE",
    "TRANSPORT",
    "TRANSPORT_HEADER",
    "TRANSPORT_HEADER_SIZE",
    "CookieReply",
    "Drop",
    "DropReason",
    "Initiation",
    "Message",
    "Response",
    "Transport",
    "parse",
]

INITIATION, RESPONSE, COOKIE_REPLY, TRANSPORT = 1, 2, 3, 4
INITIATION_SIZE = 148
RESPONSE_SIZE = 92
COOKIE_REPLY_SIZE = 64
TRANSPORT_HEADER_SIZE = 16
KEEPALIVE_SIZE = TRANSPORT_HEADER_SIZE + 16

_INITIATION = struct.Struct("<II32s48s28s16s16s")
_RESPONSE = struct.Struct("<III32s16s16s16s")
_COOKIE_REPLY = struct.Struct("<II24s32s")
_TRANSPORT = struct.Struct("<IIQ")
TRANSPORT_HEADER = _TRANSPORT  # (type, receiver, counter): packed in place by the sealer
assert _INITIATION.size == INITIATION_SIZE and _RESPONSE.size == RESPONSE_SIZE
assert _COOKIE_REPLY.size == COOKIE_REPLY_SIZE and _TRANSPORT.size == TRANSPORT_HEADER_SIZE


class DropReason(enum.Enum):
    """Why a datagram or a message was not accepted; the value is the statistics key."""

    SHORT = "short"
    UNKNOWN_TYPE = "unknown_type"
    BAD_LENGTH = "bad_length"
    BAD_MAC1 = "bad_mac1"
    BAD_MAC2 = "bad_mac2"
    UNDER_LOAD = "under_load_no_cookie"
    RATE_LIMITED = "handshake_rate_limited"
    DECRYPT_FAILED = "decrypt_failed"
    UNKNOWN_PEER = "unknown_peer"
    UNKNOWN_INDEX = "unknown_index"
    REPLAYED_TIMESTAMP = "replayed_timestamp"
    FLOOD = "handshake_flood"
    BAD_STATE = "bad_state"
    REPLAY = "replay"
    KEY_EXPIRED = "key_expired"
    NO_COOKIE_EXPECTED = "unexpected_cookie"
    NOT_ALLOWED_SOURCE = "source_not_allowed"
    NO_ROUTE = "no_peer_for_destination"
    NO_SESSION = "no_session"


@dataclass(frozen=True, slots=True)
class Drop:
    reason: DropReason
    detail: str = ""


@dataclass(frozen=True, slots=True)
class Initiation:
    sender: int
    ephemeral: bytes
    encrypted_static: bytes
    encrypted_timestamp: bytes
    mac1: bytes = bytes(16)
    mac2: bytes = bytes(16)

    def pack(self) -> bytes:
        return _INITIATION.pack(INITIATION, self.sender, self.ephemeral, self.encrypted_static,
                                self.encrypted_timestamp, self.mac1, self.mac2)


@dataclass(frozen=True, slots=True)
class Response:
    sender: int
    receiver: int
    ephemeral: bytes
    encrypted_nothing: bytes
    mac1: bytes = bytes(16)
    mac2: bytes = bytes(16)

    def pack(self) -> bytes:
        return _RESPONSE.pack(RESPONSE, self.sender, self.receiver, self.ephemeral,
                              self.encrypted_nothing, self.mac1, self.mac2)


@dataclass(frozen=True, slots=True)
class CookieReply:
    receiver: int
    nonce: bytes
    encrypted_cookie: bytes

    def pack(self) -> bytes:
        return _COOKIE_REPLY.pack(COOKIE_REPLY, self.receiver, self.nonce, self.encrypted_cookie)


@dataclass(frozen=True, slots=True)
class Transport:
    """A transport data message; `packet` is the ciphertext with its tag (a view, no copy)."""

    receiver: int
    counter: int
    packet: memoryview

    @staticmethod
    def header(receiver: int, counter: int) -> bytes:
        return _TRANSPORT.pack(TRANSPORT, receiver, counter)


Message = Initiation | Response | CookieReply | Transport


def parse(data: bytes | bytearray | memoryview) -> Message | Drop:
    """One datagram -> its message, or the reason it is not one."""
    view = memoryview(data)
    if len(view) < 4:
        return Drop(DropReason.SHORT, f"{len(view)} bytes")
    kind = int.from_bytes(view[:4], "little")
    if kind == TRANSPORT:
        if len(view) < KEEPALIVE_SIZE:
            return Drop(DropReason.SHORT, f"transport of {len(view)} bytes")
        _, receiver, counter = _TRANSPORT.unpack_from(view)
        return Transport(receiver, counter, view[TRANSPORT_HEADER_SIZE:])
    if kind == INITIATION:
        if len(view) != INITIATION_SIZE:
            return Drop(DropReason.BAD_LENGTH, f"initiation of {len(view)} bytes")
        _, *fields = _INITIATION.unpack_from(view)
        return Initiation(*fields)
    if kind == RESPONSE:
        if len(view) != RESPONSE_SIZE:
            return Drop(DropReason.BAD_LENGTH, f"response of {len(view)} bytes")
        _, *fields = _RESPONSE.unpack_from(view)
        return Response(*fields)
    if kind == COOKIE_REPLY:
        if len(view) != COOKIE_REPLY_SIZE:
            return Drop(DropReason.BAD_LENGTH, f"cookie reply of {len(view)} bytes")
        _, *fields = _COOKIE_REPLY.unpack_from(view)
        return CookieReply(*fields)
    return Drop(DropReason.UNKNOWN_TYPE, f"type word {kind:#x}")
