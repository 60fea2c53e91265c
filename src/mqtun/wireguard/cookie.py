"""MAC1, MAC2 and cookie replies: WireGuard's defence against handshake floods.

Every handshake message ends in mac1 (keyed by the receiver's public key: proves the sender
knows whom it talks to) and mac2 (keyed by a cookie: proves the sender can receive at its
source address). A responder under load answers an initiation lacking a valid mac2 with a
cookie reply instead of doing Diffie-Hellman; the initiator stores the cookie and puts it in
the mac2 of its next attempt. The cookie is MAC(secret, source address), the secret changes
every two minutes, and the reply is encrypted with XChaCha20-Poly1305 bound to the mac1 it
answers. Time is passed in (`now`, monotonic seconds); randomness can be too, for tests.
"""

from __future__ import annotations

import hmac
import ipaddress
import os
from collections.abc import Callable

from mqtun.wireguard import crypto
from mqtun.wireguard.messages import CookieReply

__all__ = ["COOKIE_REFRESH_TIME", "CookieChecker", "CookieGenerator", "source_bytes"]

COOKIE_REFRESH_TIME = 120.0
LABEL_MAC1 = b"mac1----"
LABEL_COOKIE = b"cookie--"


def source_bytes(host: str, port: int) -> bytes:
    """The bytes a cookie is bound to: the address then the port (as wireguard-go writes them)."""
    return ipaddress.ip_address(host).packed + port.to_bytes(2, "little")


def _mac_offsets(msg: bytes | bytearray | memoryview) -> tuple[int, int]:
    mac2_at = len(msg) - 16
    return mac2_at - 16, mac2_at


class CookieChecker:
    """The receiving side: checks mac1/mac2 of messages sent to us, makes cookie replies."""

    def __init__(self, local_public: bytes, *, random: Callable[[int], bytes] = os.urandom) -> None:
        self._mac1_key = crypto.hash_(LABEL_MAC1, local_public)
        self._cookie_key = crypto.hash_(LABEL_COOKIE, local_public)
        self._random = random
        self._secret = b""
        self._secret_set = -1e18

    def check_mac1(self, msg: bytes | bytearray | memoryview) -> bool:
        mac1_at, mac2_at = _mac_offsets(msg)
        expected = crypto.mac(self._mac1_key, bytes(msg[:mac1_at]))
        return hmac.compare_digest(expected, bytes(msg[mac1_at:mac2_at]))

    def _cookie(self, src: bytes) -> bytes:
        return crypto.mac(self._secret, src)

    def check_mac2(self, msg: bytes | bytearray | memoryview, src: bytes, now: float) -> bool:
        if not self._secret or now - self._secret_set > COOKIE_REFRESH_TIME:
            return False
        _, mac2_at = _mac_offsets(msg)
        expected = crypto.mac(self._cookie(src), bytes(msg[:mac2_at]))
        return hmac.compare_digest(expected, bytes(msg[mac2_at:]))

    def create_reply(self, msg: bytes | bytearray | memoryview, receiver: int, src: bytes,
                     now: float) -> CookieReply:
        """The cookie reply to `msg`, whose sender index is `receiver`."""
        if not self._secret or now - self._secret_set > COOKIE_REFRESH_TIME:
            self._secret = self._random(32)
            self._secret_set = now
        mac1_at, mac2_at = _mac_offsets(msg)
        nonce = self._random(24)
        sealed = crypto.xaead_encrypt(self._cookie_key, nonce, self._cookie(src),
                                      bytes(msg[mac1_at:mac2_at]))
        return CookieReply(receiver, nonce, sealed)


class CookieGenerator:
    """The sending side: writes mac1/mac2 into messages to one peer, consumes its cookie replies."""

    def __init__(self, remote_public: bytes) -> None:
        self._mac1_key = crypto.hash_(LABEL_MAC1, remote_public)
        self._cookie_key = crypto.hash_(LABEL_COOKIE, remote_public)
        self._last_mac1: bytes | None = None
        self._cookie = b""
        self._cookie_set = -1e18

    def add_macs(self, msg: bytearray, now: float) -> None:
        """Fill the last 32 bytes of `msg` (mac1, then mac2 when a fresh cookie is held)."""
        mac1_at, mac2_at = _mac_offsets(msg)
        mac1 = crypto.mac(self._mac1_key, bytes(msg[:mac1_at]))
        msg[mac1_at:mac2_at] = mac1
        self._last_mac1 = mac1
        if self._cookie and now - self._cookie_set <= COOKIE_REFRESH_TIME:
            msg[mac2_at:] = crypto.mac(self._cookie, bytes(msg[:mac2_at]))
        else:
            msg[mac2_at:] = bytes(16)

    def consume_reply(self, reply: CookieReply, now: float) -> bool:
        """Store the cookie if the reply answers the last message we sent; False otherwise."""
        if self._last_mac1 is None:
            return False
        try:
            cookie = crypto.xaead_decrypt(self._cookie_key, reply.nonce, reply.encrypted_cookie,
                                          self._last_mac1)
        except crypto.InvalidTag:
            return False
        self._cookie, self._cookie_set = cookie, now
        return True

    @property
    def has_cookie(self) -> bool:
        return bool(self._cookie)
