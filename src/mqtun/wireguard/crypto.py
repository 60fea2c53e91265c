"""The primitives WireGuard names, built from maintained libraries only.

HASH is BLAKE2s-256 and MAC is keyed BLAKE2s-128 (hashlib); HMAC is RFC 2104 HMAC over BLAKE2s
(the standard library's `hmac` with hashlib's blake2s, which is what WireGuard defines); KDFn is
the HKDF-style chain of the paper; DH is X25519 and AEAD is ChaCha20-Poly1305 (`cryptography`).
XAEAD (XChaCha20-Poly1305, used only for cookie replies) is composed here from ChaCha20-Poly1305
and HChaCha20, which `cryptography` does not expose: HChaCha20 is recovered from one raw ChaCha20
block, since a block's keystream is the permuted state plus the input state, word by word.
"""

from __future__ import annotations

import hashlib
import hmac
import struct

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

__all__ = [
    "KEY_SIZE",
    "TAG_SIZE",
    "InvalidTag",
    "aead_decrypt",
    "aead_encrypt",
    "dh",
    "hash_",
    "hchacha20",
    "kdf1",
    "kdf2",
    "kdf3",
    "mac",
    "public_key",
    "xaead_decrypt",
    "xaead_encrypt",
]

KEY_SIZE = 32
TAG_SIZE = 16
_SIGMA = struct.unpack("<4I", b"expand 32-byte k")


def hash_(*parts: bytes) -> bytes:
    """HASH(a || b || ...): BLAKE2s-256."""
    h = hashlib.blake2s()
    for part in parts:
        h.update(part)
    return h.digest()


def mac(key: bytes, data: bytes) -> bytes:
    """MAC(key, data): keyed BLAKE2s with a 16-byte digest."""
    return hashlib.blake2s(data, digest_size=16, key=key).digest()


def _hmac(key: bytes, *parts: bytes) -> bytes:
    h = hmac.new(key, digestmod=hashlib.blake2s)
    for part in parts:
        h.update(part)
    return h.digest()


def kdf1(key: bytes, data: bytes) -> bytes:
    prk = _hmac(key, data)
    return _hmac(prk, b"\x01")


def kdf2(key: bytes, data: bytes) -> tuple[bytes, bytes]:
    prk = _hmac(key, data)
    t0 = _hmac(prk, b"\x01")
    return t0, _hmac(prk, t0, b"\x02")


def kdf3(key: bytes, data: bytes) -> tuple[bytes, bytes, bytes]:
    prk = _hmac(key, data)
    t0 = _hmac(prk, b"\x01")
    t1 = _hmac(prk, t0, b"\x02")
    return t0, t1, _hmac(prk, t1, b"\x03")


def public_key(private: bytes) -> bytes:
    """The X25519 public key of a 32-byte private key (clamping is X25519's own)."""
    pub = X25519PrivateKey.from_private_bytes(private).public_key()
    return pub.public_bytes(Encoding.Raw, PublicFormat.Raw)


def dh(private: bytes, public: bytes) -> bytes | None:
    """X25519; None for a low-order public key (all-zero shared secret: WireGuard refuses it)."""
    try:
        shared = X25519PrivateKey.from_private_bytes(private).exchange(
            X25519PublicKey.from_public_bytes(public))
    except ValueError:
        return None
    return None if shared == bytes(32) else shared


def _nonce(counter: int) -> bytes:
    return b"\x00\x00\x00\x00" + counter.to_bytes(8, "little")


def aead_encrypt(key: bytes, counter: int, plaintext: bytes, aad: bytes) -> bytes:
    return ChaCha20Poly1305(key).encrypt(_nonce(counter), plaintext, aad or None)


def aead_decrypt(key: bytes, counter: int, ciphertext: bytes, aad: bytes) -> bytes:
    """Raises InvalidTag when the message was not made with this key, counter and aad."""
    return ChaCha20Poly1305(key).decrypt(_nonce(counter), ciphertext, aad or None)


def hchacha20(key: bytes, nonce16: bytes) -> bytes:
    """HChaCha20 (draft-irtf-cfrg-xchacha section 2.2) from one raw ChaCha20 block.

    cryptography's ChaCha20 takes the 16 bytes of state words 12..15 as its "nonce", so the
    block for (key, nonce16) is permute(state) + state; subtracting the known input words gives
    the permuted state, whose words 0..3 and 12..15 are HChaCha20's output.
    """
    if len(key) != 32 or len(nonce16) != 16:
        raise ValueError("hchacha20 takes a 32-byte key and a 16-byte nonce")
    block = Cipher(algorithms.ChaCha20(key, nonce16), mode=None).encryptor().update(bytes(64))
    out = struct.unpack("<16I", block)
    state = _SIGMA + struct.unpack("<8I", key) + struct.unpack("<4I", nonce16)
    words = [(out[i] - state[i]) & 0xFFFFFFFF for i in (0, 1, 2, 3, 12, 13, 14, 15)]
    return struct.pack("<8I", *words)


def _xsplit(key: bytes, nonce24: bytes) -> tuple[ChaCha20Poly1305, bytes]:
    if len(nonce24) != 24:
        raise ValueError("XChaCha20-Poly1305 takes a 24-byte nonce")
    return ChaCha20Poly1305(hchacha20(key, nonce24[:16])), b"\x00" * 4 + nonce24[16:]


def xaead_encrypt(key: bytes, nonce24: bytes, plaintext: bytes, aad: bytes) -> bytes:
    aead, nonce = _xsplit(key, nonce24)
    return aead.encrypt(nonce, plaintext, aad or None)


def xaead_decrypt(key: bytes, nonce24: bytes, ciphertext: bytes, aad: bytes) -> bytes:
    aead, nonce = _xsplit(key, nonce24)
    return aead.decrypt(nonce, ciphertext, aad or None)
