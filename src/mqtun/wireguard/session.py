"""A peer's transport sessions: the keypair slots, send counters, receive with replay window.

Slots are wireguard-go's: `current` (sending), `previous` (still received while the peer
switches over) and `next` (a responder's fresh keypair, promoted to current when the first
message under it arrives: that message is the initiator's key confirmation).

Send counters never collide between workers: a keypair hands out its counter space in disjoint
blocks (`CounterBlocks.take`, one lock-protected add in-process; across worker processes the
same add on a shared-memory word), each worker numbers a batch of packets from the block it
takes for that batch, and no two blocks overlap, so no (key, nonce) pair is ever used twice.
A block is taken when its batch is sent and never kept for later: a worker that stays idle
while another sends thousands of packets does not come back with counters from far behind,
which the peer's 8128-counter window would refuse as replays (a kept-back block of 64 once
made every packet of an idle worker's flow a replay, and its TCP flow stall).
(`CounterBlocks` serves threads; `SharedCounterBlocks` serves forked worker processes.)
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import dataclass, field

from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305

from mqtun.wireguard import crypto
from mqtun.wireguard.messages import Drop, DropReason, Transport
from mqtun.wireguard.noise import Keypair
from mqtun.wireguard.replay import ReplayWindow
from mqtun.wireguard.timers import REJECT_AFTER_MESSAGES, REJECT_AFTER_TIME

__all__ = [
    "PADDING_MULTIPLE",
    "CounterBlocks",
    "CounterTable",
    "Session",
    "SharedCounterBlocks",
    "TransportKeys",
]

PADDING_MULTIPLE = 16
_NONCE_PREFIX = bytes(4)


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


class SharedCounterBlocks(CounterBlocks):
    """The same disjoint blocks, drawn by worker *processes*: the next free counter is one
    8-byte word in memory shared across fork (an anonymous MAP_SHARED mmap), advanced under
    a process-shared lock. Create it before forking the workers, or take slots of a
    `CounterTable` made before the fork; each worker's `TransportKeys` then draws from it."""

    def __init__(self, table: CounterTable | None = None, slot: int = 0) -> None:
        self._table = table if table is not None else CounterTable(1)
        self._at = 8 * slot

    def take(self, n: int = COUNTER_BLOCK) -> range:
        word, at = self._table.words, self._at
        with self._table.lock:
            start = int.from_bytes(word[at:at + 8], "little")
            word[at:at + 8] = (start + n).to_bytes(8, "little")
        return range(start, start + n)

    @property
    def issued(self) -> int:
        return int.from_bytes(self._table.words[self._at:self._at + 8], "little")


class CounterTable:
    """`slots` shared counter words and their lock, made before fork; the main process hands
    a slot to each new keypair (`assign`, `release` once the keypair is gone), every process
    draws from it by number."""

    def __init__(self, slots: int = 1024) -> None:
        import mmap
        import multiprocessing

        self.slots = slots
        self.words = mmap.mmap(-1, 8 * slots, flags=mmap.MAP_SHARED)
        self.lock = multiprocessing.get_context("fork").Lock()
        self._free = list(range(slots - 1, -1, -1))

    def assign(self) -> int:
        """A free slot for a new keypair, reset to counter 0 (main process only). A slot is
        reused only after `release`: never while its keypair may still send."""
        if not self._free:
            raise RuntimeError("no free counter slot: more live keypairs than the table holds")
        slot = self._free.pop()
        with self.lock:
            self.words[8 * slot:8 * slot + 8] = bytes(8)
        return slot

    def release(self, slot: int) -> None:
        self._free.append(slot)

    def blocks(self, slot: int) -> SharedCounterBlocks:
        return SharedCounterBlocks(self, slot)


@dataclass(slots=True)
class TransportKeys:
    """A keypair in use: its AEAD keys, its counter source, its receive window."""

    keypair: Keypair
    counters: CounterBlocks = field(default_factory=CounterBlocks)
    window: ReplayWindow = field(default_factory=ReplayWindow)
    # the AEADs are keyed once per keypair, not once per packet
    sender: ChaCha20Poly1305 = field(init=False)
    receiver: ChaCha20Poly1305 = field(init=False)

    def __post_init__(self) -> None:
        self.sender = ChaCha20Poly1305(self.keypair.send_key)
        self.receiver = ChaCha20Poly1305(self.keypair.receive_key)

    def next_counters(self, n: int) -> range:
        """Counters for a batch of `n` packets about to be sent (a block of their own)."""
        return self.counters.take(n)

    def next_counter(self) -> int:
        return self.counters.take(1).start


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

    def install(self, keypair: Keypair, counters: CounterBlocks | None = None) -> TransportKeys:
        """Rotate in a freshly derived keypair (wireguard-go's BeginSymmetricSession).

        `counters`: where its send counters come from (shared with other workers), else a
        private source."""
        keys = TransportKeys(keypair, counters=counters or CounterBlocks())
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

    def promote(self, local_index: int) -> bool:
        """Key confirmation seen elsewhere (another worker): `next` becomes `current`."""
        if self.next is None or self.next.keypair.local_index != local_index:
            return False
        self.previous, self.current, self.next = self.current, self.next, None
        return True

    def clear(self) -> None:
        self.current = self.previous = self.next = None

    def encrypt(self, packet: bytes, now: float, *, mtu: int | None = None) -> bytes | Drop:
        """One IP packet (b"" for a keepalive) -> a transport data message on `current`."""
        out = self.encrypt_many([packet], now, mtu=mtu)
        return out if isinstance(out, Drop) else out[0]

    def encrypt_many(self, packets: Sequence[bytes], now: float, *,
                     mtu: int | None = None) -> list[bytes] | Drop:
        """IP packets -> their transport data messages on `current`, in order, numbered from
        one block of counters taken for the batch (all of them refused if it reaches past
        REJECT_AFTER_MESSAGES)."""
        keys = self.current
        if keys is None:
            return Drop(DropReason.NO_SESSION)
        if now - keys.keypair.created >= REJECT_AFTER_TIME:
            return Drop(DropReason.KEY_EXPIRED)
        counters = keys.next_counters(len(packets))
        if counters.stop > REJECT_AFTER_MESSAGES:
            return Drop(DropReason.KEY_EXPIRED)
        seal, remote, header = keys.sender.encrypt, keys.keypair.remote_index, Transport.header
        # (a full-size packet, the common case, needs no padding: pad() only when it does)
        return [header(remote, c) + seal(_NONCE_PREFIX + c.to_bytes(8, "little"),
                                         p if len(p) == mtu else pad(p, mtu), None)
                for c, p in zip(counters, packets, strict=True)]

    def decrypt(self, msg: Transport, now: float) -> tuple[bytes, TransportKeys] | Drop:
        """A transport message -> (plaintext, the keys that opened it), or why not."""
        header = Transport.header(msg.receiver, msg.counter)
        opened = self.open_many(msg.receiver, [header + bytes(msg.packet)], now)
        if isinstance(opened, Drop):
            return opened
        keys, plains, refused = opened
        return refused[0] if refused else (plains[0], keys)

    def open_many(self, receiver: int, messages: Sequence[bytes], now: float
                  ) -> tuple[TransportKeys, list[bytes], list[Drop]] | Drop:
        """Transport messages under one receiver index (whole datagrams, header included) ->
        (the keys, the plaintexts of those that opened, in order, one Drop per refused one);
        a Drop for all of them when the index or its keys are not usable.

        The window is consulted before decrypting (cheap refusal of replays) and updated only
        after the tag verified, so a forged counter can never move it. The first message that
        opens under `next` confirms it (the initiator now sends on this keypair).
        """
        keys = self.by_index(receiver)
        if keys is None:
            return Drop(DropReason.UNKNOWN_INDEX)
        if now - keys.keypair.created >= REJECT_AFTER_TIME:
            return Drop(DropReason.KEY_EXPIRED)
        window, opener = keys.window, keys.receiver.decrypt
        check, accept, limit = window.check, window.accept, REJECT_AFTER_MESSAGES
        plains: list[bytes] = []
        refused: list[Drop] = []
        for data in messages:
            counter = int.from_bytes(data[8:16], "little")
            if not check(counter, limit):
                refused.append(_REPLAY)
                continue
            try:
                plain = opener(_NONCE_PREFIX + data[8:16], memoryview(data)[16:], None)
            except crypto.InvalidTag:
                refused.append(_DECRYPT_FAILED)
                continue
            if not accept(counter, limit):
                refused.append(_REPLAY)
                continue
            plains.append(plain)
        if plains and keys is self.next:
            self.previous, self.current, self.next = self.current, keys, None
        return keys, plains, refused


_REPLAY = Drop(DropReason.REPLAY)
_DECRYPT_FAILED = Drop(DropReason.DECRYPT_FAILED)
