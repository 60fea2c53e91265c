"""WireGuard's timer constants and rules, as pure functions of (state, event, now).

A `PeerTimers` holds one deadline (monotonic seconds, or None) per timer wireguard-go keeps
per peer; the `on_*` functions are the events that arm or disarm them, `expired` says which are
due at `now`, and the `needs_rekey_*` / `expired_keypair` predicates are the message and time
limits. The shell calls them and does the sending; jitter is passed in so tests are exact.
"""

from __future__ import annotations

import enum
import random
from dataclasses import dataclass, field

__all__ = [
    "KEEPALIVE_TIMEOUT",
    "MAX_TIMER_HANDSHAKES",
    "REJECT_AFTER_MESSAGES",
    "REJECT_AFTER_TIME",
    "REKEY_AFTER_MESSAGES",
    "REKEY_AFTER_TIME",
    "REKEY_ATTEMPT_TIME",
    "REKEY_TIMEOUT",
    "REKEY_TIMEOUT_JITTER_MAX",
    "PeerTimers",
    "Timer",
    "expired_keypair",
    "jitter",
    "needs_rekey_receiving",
    "needs_rekey_sending",
]

REKEY_AFTER_MESSAGES = 1 << 60
REJECT_AFTER_MESSAGES = (1 << 64) - (1 << 13) - 1
REKEY_AFTER_TIME = 120.0
REKEY_ATTEMPT_TIME = 90.0
REKEY_TIMEOUT = 5.0
MAX_TIMER_HANDSHAKES = int(REKEY_ATTEMPT_TIME / REKEY_TIMEOUT)
REKEY_TIMEOUT_JITTER_MAX = 0.334
REJECT_AFTER_TIME = 180.0
KEEPALIVE_TIMEOUT = 10.0


def jitter() -> float:
    """A random extra delay in [0, 334 ms) so peers do not retry in lockstep."""
    return random.random() * REKEY_TIMEOUT_JITTER_MAX


class Timer(enum.Enum):
    RETRANSMIT_HANDSHAKE = "retransmit_handshake"  # no response to our initiation yet
    SEND_KEEPALIVE = "send_keepalive"              # we received data and sent nothing back
    NEW_HANDSHAKE = "new_handshake"                # we sent data and heard nothing back
    ZERO_KEY_MATERIAL = "zero_key_material"        # no new keys for 3 x REJECT_AFTER_TIME
    PERSISTENT_KEEPALIVE = "persistent_keepalive"  # the configured keepalive interval


@dataclass(slots=True)
class PeerTimers:
    persistent_keepalive_interval: int = 0
    deadlines: dict[Timer, float] = field(default_factory=dict)
    handshake_attempts: int = 0
    need_another_keepalive: bool = False
    sent_last_minute_handshake: bool = False
    last_handshake: float | None = None

    def _d(self) -> dict[Timer, float]:
        return self.deadlines

    def pending(self, timer: Timer) -> bool:
        return timer in self._d()

    # -- events (wireguard-go's timers*() hooks) ----------------------------------------
    def on_data_sent(self, now: float, jitter: float) -> None:
        if not self.pending(Timer.NEW_HANDSHAKE):
            self._d()[Timer.NEW_HANDSHAKE] = now + KEEPALIVE_TIMEOUT + REKEY_TIMEOUT + jitter

    def on_data_received(self, now: float) -> None:
        if not self.pending(Timer.SEND_KEEPALIVE):
            self._d()[Timer.SEND_KEEPALIVE] = now + KEEPALIVE_TIMEOUT
        else:
            self.need_another_keepalive = True

    def on_authenticated_sent(self) -> None:
        self._d().pop(Timer.SEND_KEEPALIVE, None)

    def on_authenticated_received(self) -> None:
        self._d().pop(Timer.NEW_HANDSHAKE, None)

    def on_handshake_initiated(self, now: float, jitter: float) -> None:
        self._d()[Timer.RETRANSMIT_HANDSHAKE] = now + REKEY_TIMEOUT + jitter

    def on_handshake_complete(self, now: float) -> None:
        self._d().pop(Timer.RETRANSMIT_HANDSHAKE, None)
        self.handshake_attempts = 0
        self.sent_last_minute_handshake = False
        self.last_handshake = now

    def on_session_derived(self, now: float) -> None:
        self._d()[Timer.ZERO_KEY_MATERIAL] = now + 3 * REJECT_AFTER_TIME

    def on_authenticated_traversal(self, now: float) -> None:
        if self.persistent_keepalive_interval > 0:
            self._d()[Timer.PERSISTENT_KEEPALIVE] = now + self.persistent_keepalive_interval

    # -- expiry ------------------------------------------------------------------------
    def expired(self, now: float) -> list[Timer]:
        """The timers due at `now`, disarmed; the caller acts on each (see `on_retransmit`)."""
        due = [t for t, at in self._d().items() if at <= now]
        for t in due:
            del self._d()[t]
        return due

    def next_deadline(self) -> float | None:
        return min(self._d().values(), default=None)

    def on_retransmit(self, now: float) -> bool:
        """RETRANSMIT_HANDSHAKE fired: True to send another initiation, False to give up."""
        if self.handshake_attempts > MAX_TIMER_HANDSHAKES:
            self._d().pop(Timer.SEND_KEEPALIVE, None)
            self._d().setdefault(Timer.ZERO_KEY_MATERIAL, now + 3 * REJECT_AFTER_TIME)
            return False
        self.handshake_attempts += 1
        return True

    def on_keepalive_sent(self, now: float) -> None:
        """SEND_KEEPALIVE fired and a keepalive went out: rearm once if more data arrived."""
        if self.need_another_keepalive:
            self.need_another_keepalive = False
            self._d()[Timer.SEND_KEEPALIVE] = now + KEEPALIVE_TIMEOUT


def needs_rekey_sending(counter: int, is_initiator: bool, age: float) -> bool:
    """After a send on the current keypair: start a new handshake?"""
    return counter > REKEY_AFTER_MESSAGES or (is_initiator and age > REKEY_AFTER_TIME)


def needs_rekey_receiving(is_initiator: bool, age: float, already_sent: bool) -> bool:
    """After a receive: the initiator's last-minute handshake before the keys expire."""
    return (not already_sent and is_initiator
            and age > REJECT_AFTER_TIME - KEEPALIVE_TIMEOUT - REKEY_TIMEOUT)


def expired_keypair(counter: int, age: float) -> bool:
    """A keypair no message may use any more (either direction)."""
    return counter >= REJECT_AFTER_MESSAGES or age >= REJECT_AFTER_TIME
