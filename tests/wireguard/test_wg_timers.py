"""The timer rules as pure functions of (state, now), checked against wireguard-go's timers.go."""

from __future__ import annotations

import pytest

from mqtun.wireguard import timers as t
from mqtun.wireguard.timers import PeerTimers, Timer

pytestmark = pytest.mark.sans_io  # pure: no device, no namespace


def test_constants() -> None:
    assert t.REKEY_AFTER_MESSAGES == 2**60
    assert t.REJECT_AFTER_MESSAGES == 2**64 - 2**13 - 1
    assert (t.REKEY_AFTER_TIME, t.REJECT_AFTER_TIME, t.REKEY_ATTEMPT_TIME) == (120, 180, 90)
    assert (t.REKEY_TIMEOUT, t.KEEPALIVE_TIMEOUT, t.MAX_TIMER_HANDSHAKES) == (5, 10, 18)
    assert all(0 <= t.jitter() < 0.334 for _ in range(100))


def test_data_sent_without_answer_starts_a_new_handshake() -> None:
    p = PeerTimers()
    p.on_data_sent(100.0, 0.2)
    p.on_data_sent(101.0, 0.0)           # already pending: not pushed back
    assert p.expired(115.1) == []
    assert p.expired(115.2) == [Timer.NEW_HANDSHAKE]
    p.on_data_sent(200.0, 0.0)
    p.on_authenticated_received()        # any answer cancels it
    assert p.expired(1000.0) == []


def test_received_data_gets_a_keepalive_unless_we_send() -> None:
    p = PeerTimers()
    p.on_data_received(0.0)
    p.on_data_received(1.0)              # pending: remember to send another one
    assert p.expired(10.0) == [Timer.SEND_KEEPALIVE]
    p.on_keepalive_sent(10.0)
    assert p.expired(20.0) == [Timer.SEND_KEEPALIVE]
    p.on_keepalive_sent(20.0)
    assert p.expired(100.0) == []
    p.on_data_received(200.0)
    p.on_authenticated_sent()            # we sent something: no keepalive needed
    assert p.expired(300.0) == []


def test_retransmits_then_gives_up() -> None:
    p = PeerTimers()
    now = 0.0
    for _ in range(t.MAX_TIMER_HANDSHAKES + 1):
        p.on_handshake_initiated(now, 0.0)
        now += t.REKEY_TIMEOUT
        assert p.expired(now) == [Timer.RETRANSMIT_HANDSHAKE]
        assert p.on_retransmit(now)
    p.on_handshake_initiated(now, 0.0)
    now += t.REKEY_TIMEOUT
    assert p.expired(now) == [Timer.RETRANSMIT_HANDSHAKE]
    assert not p.on_retransmit(now)      # 20 attempts in ~90 s: stop
    assert p.pending(Timer.ZERO_KEY_MATERIAL)
    p.on_handshake_complete(now)
    assert p.handshake_attempts == 0 and p.last_handshake == now


def test_persistent_keepalive_and_key_zeroing() -> None:
    p = PeerTimers(persistent_keepalive_interval=25)
    p.on_authenticated_traversal(0.0)
    p.on_session_derived(0.0)
    assert p.next_deadline() == 25.0
    assert p.expired(25.0) == [Timer.PERSISTENT_KEEPALIVE]
    assert p.expired(540.0) == [Timer.ZERO_KEY_MATERIAL]


def test_rekey_and_reject_predicates() -> None:
    assert t.needs_rekey_sending(2**60 + 1, False, 0.0)
    assert t.needs_rekey_sending(1, True, 121.0) and not t.needs_rekey_sending(1, False, 121.0)
    assert t.needs_rekey_receiving(True, 166.0, False)
    assert not t.needs_rekey_receiving(True, 166.0, True)
    assert not t.needs_rekey_receiving(False, 170.0, False)
    assert t.expired_keypair(0, 180.0) and t.expired_keypair(t.REJECT_AFTER_MESSAGES, 0.0)
    assert not t.expired_keypair(0, 179.9)
