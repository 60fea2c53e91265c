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
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305

from mqtun.packet.headers import Buffer
from mqtun.wireguard import crypto
from mqtun.wireguard.messages import (
    KEEPALIVE_SIZE,
    TRANSPORT,
    TRANSPORT_HEADER,
    TRANSPORT_HEADER_SIZE,
    Drop,
    DropReason,
    Transport,
)
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
_HEADER_SIZE = TRANSPORT_HEADER_SIZE
_OVERHEAD = KEEPALIVE_SIZE  # header and tag: a message is its padded packet and this
_MESSAGE_ROOM = _OVERHEAD + PADDING_MULTIPLE - 1


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
    # seal_into(nonce, plaintext, aad, out): encrypt with the tag into `out` (16 bytes longer)
    seal_into: Callable[[bytes, Buffer, None, memoryview], int] = field(init=False)

    def __post_init__(self) -> None:
        self.sender = ChaCha20Poly1305(self.keypair.send_key)
        self.receiver = ChaCha20Poly1305(self.keypair.receive_key)
        self.seal_into = _sealer(self.sender)

    def next_counters(self, n: int) -> range:
        """Counters for a batch of `n` packets about to be sent (a block of their own)."""
        return self.counters.take(n)

    def next_counter(self) -> int:
        return self.counters.take(1).start


def _sealer(aead: ChaCha20Poly1305) -> Callable[[bytes, Buffer, None, memoryview], int]:
    if hasattr(aead, "encrypt_into"):
        return aead.encrypt_into

    def seal_into(nonce: bytes, plaintext: Buffer, aad: None, out: memoryview) -> int:
        out[:] = aead.encrypt(nonce, bytes(plaintext), aad)  # (cryptography < encrypt_into)
        return len(out)

    return seal_into


def pad(packet: Buffer, mtu: int | None = None) -> bytes:
    """Zero-pad to a multiple of 16 (not past the MTU), hiding exact lengths."""
    size = -len(packet) % PADDING_MULTIPLE
    if mtu is not None:
        size = max(0, min(size, mtu - len(packet)))
    return bytes(packet) + bytes(size)


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

    def encrypt_many(self, packets: Sequence[Buffer], now: float, *,
                     mtu: int | None = None) -> list[bytes] | Drop:
        """IP packets -> their transport data messages on `current`, one bytes each, in
        order (`seal_many`, cut)."""
        sealed = self.seal_many(packets, now, mtu=mtu)
        if isinstance(sealed, Drop):
            return sealed
        return [bytes(train[k:k + segment]) for train, segment in sealed
                for k in range(0, len(train), segment)]

    def seal_many(self, packets: Sequence[Buffer], now: float, *,
                  mtu: int | None = None) -> list[tuple[memoryview, int]] | Drop:
        """IP packets -> their transport data messages on `current`, in order, numbered from
        one block of counters taken for the batch (all of them refused if it reaches past
        REJECT_AFTER_MESSAGES), as UDP GSO trains: (buffer, segment size) pairs, each buffer
        messages of `segment` bytes back to back, the last maybe shorter. A super-packet's
        segments (all full but the last) are one train, sealed in place into one buffer: no
        per-message bytes object, header concatenation or list for the send."""
        keys = self.current
        if keys is None:
            return Drop(DropReason.NO_SESSION)
        if now - keys.keypair.created >= REJECT_AFTER_TIME:
            return Drop(DropReason.KEY_EXPIRED)
        counters = keys.next_counters(len(packets))
        if counters.stop > REJECT_AFTER_MESSAGES:
            return Drop(DropReason.KEY_EXPIRED)
        # room for each message: header, tag and at most 15 bytes of padding
        buf = bytearray(sum(map(len, packets)) + _MESSAGE_ROOM * len(packets))
        view = memoryview(buf)
        remote, seal_into = keys.keypair.remote_index, keys.seal_into
        pack_into = TRANSPORT_HEADER.pack_into
        trains: list[tuple[memoryview, int]] = []
        start = off = segment = 0
        short = False  # the train got its shorter last message: the next one starts anew
        for c, p in zip(counters, packets, strict=True):
            # (a full-size packet, the common case, needs no padding: pad() only when it does)
            if len(p) != mtu:
                p = pad(p, mtu)
            size = len(p) + _OVERHEAD
            if segment and (short or size > segment):
                trains.append((view[start:off], segment))
                start, segment, short = off, 0, False
            if not segment:
                segment = size
            elif size < segment:
                short = True
            pack_into(buf, off, TRANSPORT, remote, c)
            seal_into(_NONCE_PREFIX + c.to_bytes(8, "little"), p, None,
                      view[off + _HEADER_SIZE:off + size])
            off += size
        trains.append((view[start:off], segment))
        return trains

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
        limit = REJECT_AFTER_MESSAGES
        plains: list[bytes] = []
        refused: list[Drop] = []
        counters = [_from_bytes(data[8:16], "little") for data in messages]
        n = len(counters)
        if n > 1 and counters[0] > window.last and counters[-1] < limit \
                and counters == list(range(counters[0], counters[0] + n)):
            # a run in order, every counter new (the peer's batch): the window needs no look
            # before the decryption and takes the run at once after it; a message that fails
            # to open is left out of what the window takes
            opened: list[bytes | None] = []
            for data in messages:
                try:
                    opened.append(opener(_NONCE_PREFIX + data[8:16], memoryview(data)[16:], None))
                except crypto.InvalidTag:
                    opened.append(None)
            if None not in opened and window.accept_run(counters[0], n, limit):
                plains = opened  # type: ignore[assignment]  # (no None in it)
            else:
                for counter, plain in zip(counters, opened, strict=True):
                    if plain is None:
                        refused.append(_DECRYPT_FAILED)
                    elif window.accept(counter, limit):
                        plains.append(plain)
                    else:
                        refused.append(_REPLAY)
        else:
            check, accept = window.check, window.accept
            for counter, data in zip(counters, messages, strict=True):
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


_from_bytes = int.from_bytes
_REPLAY = Drop(DropReason.REPLAY)
_DECRYPT_FAILED = Drop(DropReason.DECRYPT_FAILED)
