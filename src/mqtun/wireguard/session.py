"""A peer's transport sessions: the keypair slots, send counters, receive with replay window.

Slots are wireguard-go's: `current` (sending), `previous` (still received while the peer
switches over) and `next` (a responder's fresh keypair, promoted to current when the first
message under it arrives: that message is the initiator's key confirmation).

Send counters never collide between workers: a keypair hands out its counter space in disjoint
blocks (`CounterBlocks.take`, one lock-protected add in-process; across worker processes the
same add on a shared-memory word), each worker numbers its packets from its own block, and no
two blocks overlap, so no (key, nonce) pair is ever used twice. The block is small (64) next to
the receiver's 8128-counter window, so a slow worker's counters stay inside the peer's window.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

from mqtun.wireguard import crypto
from mqtun.wireguard.messages import Drop, DropReason, Transport
from mqtun.wireguard.noise import Keypair
from mqtun.wireguard.replay import ReplayWindow
from mqtun.wireguard.timers import REJECT_AFTER_MESSAGES, REJECT_AFTER_TIME

__all__ = ["PADDING_MULTIPLE", "CounterBlocks", "Session", "TransportKeys"]

PADDING_MULTIPLE = 16
COUNTER_BLOCK = 64


class CounterBlocks:
    """Disjoint ranges of one keypair's send counters (thread-safe)."""

    def __init__(self) -> None:
        self._next = 0
        self._lock = threading.Lock()

    def take(self, n: int = COUNTER_BLOCK) -> range:
        with self._lock:
            start, self._next = self._next, self._next + n
        return range(start, start + n)

    @property
    def issued(self) -> int:
        return self._next


@dataclass(slots=True)
class TransportKeys:
    """A keypair in use: its AEAD keys, its counter source, its receive window."""

    keypair: Keypair
    counters: CounterBlocks = field(default_factory=CounterBlocks)
    window: ReplayWindow = field(default_factory=ReplayWindow)
    _lease: range = range(0)
    _lease_at: int = 0

    def next_counter(self) -> int:
        """This worker's next counter (a fresh block from `counters` when its block is used up)."""
        if self._lease_at >= len(self._lease):
            self._lease, self._lease_at = self.counters.take(), 0
        counter = self._lease[self._lease_at]
        self._lease_at += 1
        return counter


def pad(packet: bytes, mtu: int | None = None) -> bytes:
    """Zero-pad to a multiple of 16 (not past the MTU), hiding exact lengths."""
    size = -len(packet) % PADDING_MULTIPLE
    if mtu is not None:
        size = max(0, min(size, mtu - len(packet)))
    return packet + bytes(size)


class Session:
    """One peer's keypair slots and the encrypt/decrypt of transport data messages."""

    def __init__(self) -> None:
        self.current: TransportKeys | None = None
        self.previous: TransportKeys | None = None
        self.next: TransportKeys | None = None

    def install(self, keypair: Keypair) -> TransportKeys:
        """Rotate in a freshly derived keypair (wireguard-go's BeginSymmetricSession)."""
        keys = TransportKeys(keypair)
        if keypair.is_initiator:
            if self.next is not None:
                self.previous, self.next = self.next, None
            else:
                self.previous = self.current
            self.current = keys
        else:
            self.next, self.previous = keys, None
        return keys

    def by_index(self, local_index: int) -> TransportKeys | None:
        for keys in (self.current, self.next, self.previous):
            if keys is not None and keys.keypair.local_index == local_index:
                return keys
        return None

    def clear(self) -> None:
        self.current = self.previous = self.next = None

    def encrypt(self, packet: bytes, now: float, *, mtu: int | None = None) -> bytes | Drop:
        """One IP packet (b"" for a keepalive) -> a transport data message on `current`."""
        keys = self.current
        if keys is None:
            return Drop(DropReason.NO_SESSION)
        age = now - keys.keypair.created
        counter = keys.next_counter()
        if counter >= REJECT_AFTER_MESSAGES or age >= REJECT_AFTER_TIME:
            return Drop(DropReason.KEY_EXPIRED)
        header = Transport.header(keys.keypair.remote_index, counter)
        return header + crypto.aead_encrypt(keys.keypair.send_key, counter, pad(packet, mtu), b"")

    def decrypt(self, msg: Transport, now: float) -> tuple[bytes, TransportKeys] | Drop:
        """A transport message -> (plaintext, the keys that opened it), or why not.

        The window is consulted before decrypting (cheap refusal of replays) and updated only
        after the tag verified, so a forged counter can never move it.
        """
        keys = self.by_index(msg.receiver)
        if keys is None:
            return Drop(DropReason.UNKNOWN_INDEX)
        if now - keys.keypair.created >= REJECT_AFTER_TIME:
            return Drop(DropReason.KEY_EXPIRED)
        if not keys.window.check(msg.counter, REJECT_AFTER_MESSAGES):
            return Drop(DropReason.REPLAY)
        try:
            plain = crypto.aead_decrypt(keys.keypair.receive_key, msg.counter,
                                        bytes(msg.packet), b"")
        except crypto.InvalidTag:
            return Drop(DropReason.DECRYPT_FAILED)
        if not keys.window.accept(msg.counter, REJECT_AFTER_MESSAGES):
            return Drop(DropReason.REPLAY)
        if keys is self.next:  # key confirmation: the initiator now sends on this keypair
            self.previous, self.current, self.next = self.current, keys, None
        return plain, keys
