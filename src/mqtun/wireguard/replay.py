"""The receive-side sliding window over 64-bit transport counters (RFC 6479 style).

As wireguard-go's `replay.Filter`: a ring of 128 blocks of 64 bits. The highest counter seen is
`last`; a counter above it slides the window forward (clearing the blocks it passes); one more
than WINDOW_SIZE (127 * 64 = 8128) behind it is refused; inside the window each counter is
accepted once. The block left unused in the ring is what lets the window move by whole blocks
without losing the bits of the counters just behind `last`. (The kernel module used a 2048-bit
window until 2020; wireguard-go's is this one.)
"""

from __future__ import annotations

__all__ = ["WINDOW_SIZE", "ReplayWindow"]

_BLOCK_BITS_LOG = 6
_BLOCK_BITS = 1 << _BLOCK_BITS_LOG
_RING_BLOCKS = 1 << 7
WINDOW_SIZE = (_RING_BLOCKS - 1) * _BLOCK_BITS
_BLOCK_MASK = _RING_BLOCKS - 1
_BIT_MASK = _BLOCK_BITS - 1


class ReplayWindow:
    """Not thread-safe: one receiver owns a window (one per keypair)."""

    __slots__ = ("_last", "_ring")

    def __init__(self) -> None:
        self._last = 0
        self._ring = [0] * _RING_BLOCKS

    @property
    def last(self) -> int:
        return self._last

    def check(self, counter: int, limit: int) -> bool:
        """Would `counter` be accepted? (Nothing changes: call before the decryption succeeds.)"""
        if counter >= limit:
            return False
        if counter > self._last:
            return True
        if self._last - counter > WINDOW_SIZE:
            return False
        block = self._ring[(counter >> _BLOCK_BITS_LOG) & _BLOCK_MASK]
        return not (block >> (counter & _BIT_MASK)) & 1

    def accept(self, counter: int, limit: int) -> bool:
        """Accept `counter` once: True the first time, False for a replay or out of window."""
        if counter >= limit:
            return False
        block = counter >> _BLOCK_BITS_LOG
        if counter > self._last:
            current = self._last >> _BLOCK_BITS_LOG
            for i in range(current + 1, current + min(block - current, _RING_BLOCKS) + 1):
                self._ring[i & _BLOCK_MASK] = 0
            self._last = counter
        elif self._last - counter > WINDOW_SIZE:
            return False
        slot = block & _BLOCK_MASK
        bit = 1 << (counter & _BIT_MASK)
        old = self._ring[slot]
        self._ring[slot] = old | bit
        return not old & bit

    def accept_run(self, first: int, count: int, limit: int) -> bool:
        """Accept the `count` consecutive counters from `first`, all above `last` (a batch
        sent in order: the common case), as `count` calls of `accept` would, in a few
        operations per 64 counters instead of per counter. False, with nothing changed, when
        the run is not of that kind: the caller then accepts counter by counter."""
        end = first + count - 1  # the run's last counter
        if count <= 0 or first <= self._last or end >= limit:
            return False
        ring, current = self._ring, self._last >> _BLOCK_BITS_LOG
        top = end >> _BLOCK_BITS_LOG
        for i in range(current + 1, current + min(top - current, _RING_BLOCKS) + 1):
            ring[i & _BLOCK_MASK] = 0  # (the blocks `last` passes, as accept clears them)
        self._last = end
        # every counter of the run is above the old `last`: none of their bits is set yet
        block = max(first >> _BLOCK_BITS_LOG, top - _RING_BLOCKS + 1)
        while block <= top:
            lo = max(first, block << _BLOCK_BITS_LOG) & _BIT_MASK
            hi = min(end, (block << _BLOCK_BITS_LOG) | _BIT_MASK) & _BIT_MASK
            ring[block & _BLOCK_MASK] |= ((2 << hi) - 1) ^ ((1 << lo) - 1)
            block += 1
        return True
