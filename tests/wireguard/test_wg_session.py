"""Keypair slots, disjoint send counters across workers, replay and message/time limits."""

from __future__ import annotations

import os
import struct
import threading

import pytest

from mqtun.wireguard import messages as m
from mqtun.wireguard.noise import Keypair
from mqtun.wireguard.session import (
    CounterBlocks,
    Session,
    SharedCounterBlocks,
    TransportKeys,
    pad,
)
from mqtun.wireguard.timers import REJECT_AFTER_MESSAGES, REJECT_AFTER_TIME

pytestmark = pytest.mark.sans_io  # pure: no device, no namespace


def _pair(index_a: int = 1, index_b: int = 2, now: float = 0.0) -> tuple[Keypair, Keypair]:
    k1, k2 = os.urandom(32), os.urandom(32)
    return (Keypair(k1, k2, index_a, index_b, True, now),
            Keypair(k2, k1, index_b, index_a, False, now))


def _parse(data: bytes | m.Drop) -> m.Transport:
    assert isinstance(data, bytes)
    msg = m.parse(data)
    assert isinstance(msg, m.Transport)
    return msg


def test_responder_promotes_next_on_first_message() -> None:
    a, b = Session(), Session()
    ka, kb = _pair()
    a.install(ka)
    b.install(kb)
    assert b.current is None and b.next is not None   # responder may not send yet
    assert isinstance(b.encrypt(b"x", 0.0), m.Drop)
    opened = b.decrypt(_parse(a.encrypt(b"", 0.0)), 0.0)   # keepalive = key confirmation
    assert not isinstance(opened, m.Drop) and opened[0] == b""
    assert b.current is not None and b.current.keypair is kb and b.next is None
    back = a.decrypt(_parse(b.encrypt(b"hi", 0.0)), 0.0)
    assert not isinstance(back, m.Drop) and back[0] == pad(b"hi")


def test_rotation_keeps_previous_for_late_packets() -> None:
    a, b = Session(), Session()
    k1a, k1b = _pair(1, 2)
    a.install(k1a)
    b.install(k1b)
    assert not isinstance(b.decrypt(_parse(a.encrypt(b"", 0.0)), 0.0), m.Drop)
    late = _parse(a.encrypt(b"old", 0.0))  # delivered only after the rekey
    k2a, k2b = _pair(3, 4)
    a.install(k2a)                          # initiator: the old current becomes previous
    assert a.previous is not None and a.previous.keypair is k1a
    b.install(k2b)                          # responder: new keys wait in next
    assert b.next is not None and b.next.keypair is k2b
    assert b.current is not None and b.current.keypair is k1b
    assert not isinstance(b.decrypt(_parse(a.encrypt(b"new", 1.0)), 1.0), m.Drop)
    assert b.current is not None and b.current.keypair is k2b
    assert b.previous is not None and b.previous.keypair is k1b
    assert not isinstance(b.decrypt(late, 1.0), m.Drop)


def test_replay_forgery_and_unknown_index() -> None:
    a, b = Session(), Session()
    ka, kb = _pair()
    a.install(ka)
    b.install(kb)
    wire = a.encrypt(b"payload", 0.0)
    assert isinstance(wire, bytes)
    assert not isinstance(b.decrypt(_parse(wire), 0.0), m.Drop)
    assert b.decrypt(_parse(wire), 0.0) == m.Drop(m.DropReason.REPLAY)
    forged = wire[:8] + (99).to_bytes(8, "little") + wire[16:]
    assert b.decrypt(_parse(forged), 0.0) == m.Drop(m.DropReason.DECRYPT_FAILED)
    assert b.current is not None and b.current.window.last == 0   # the forgery moved nothing
    other = wire[:4] + (77).to_bytes(4, "little") + wire[8:]
    assert b.decrypt(_parse(other), 0.0) == m.Drop(m.DropReason.UNKNOWN_INDEX)


def test_limits() -> None:
    a, b = Session(), Session()
    ka, kb = _pair()
    a.install(ka)
    b.install(kb)
    assert a.encrypt(b"x", REJECT_AFTER_TIME) == m.Drop(m.DropReason.KEY_EXPIRED)
    wire = _parse(a.encrypt(b"x", 1.0))
    assert b.decrypt(wire, REJECT_AFTER_TIME + 1) == m.Drop(m.DropReason.KEY_EXPIRED)
    assert a.current is not None
    a.current.counters._next = REJECT_AFTER_MESSAGES  # as if that many had been sent
    assert a.encrypt(b"x", 1.0) == m.Drop(m.DropReason.KEY_EXPIRED)
    too_high = m.Transport(kb.local_index, REJECT_AFTER_MESSAGES, wire.packet)
    assert b.decrypt(too_high, 1.0) == m.Drop(m.DropReason.REPLAY)


def test_workers_never_share_a_counter() -> None:
    """Four threads, each with its own view of one keypair, draw counters at once."""
    ka, _ = _pair()
    blocks = CounterBlocks()
    drawn: list[list[int]] = [[] for _ in range(4)]

    def worker(i: int) -> None:
        keys = TransportKeys(ka, counters=blocks)
        drawn[i] = [keys.next_counter() for _ in range(5000)]

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    every = [c for d in drawn for c in d]
    assert len(every) == 20000 and len(set(every)) == 20000
    assert all(d == sorted(d) for d in drawn)  # each worker's own counters increase


def test_an_idle_worker_stays_inside_the_window() -> None:
    """Two workers share a keypair's counters; one sends a packet, the other thousands, then
    the first sends again: the peer takes it (an idle worker once kept a block of counters
    from far behind, every packet it sent then was a replay and its TCP flow stalled)."""
    ka, kb = _pair()
    blocks = CounterBlocks()
    busy, idle, peer = Session(), Session(), Session()
    busy.install(ka, blocks)
    idle.install(ka, blocks)
    peer.install(kb)
    first = idle.encrypt(b"first", 1.0)
    assert isinstance(first, bytes) and not isinstance(peer.decrypt(_parse(first), 1.0), m.Drop)
    for _ in range(10000):
        data = busy.encrypt(b"x", 1.0)
        assert isinstance(data, bytes)
        assert not isinstance(peer.decrypt(_parse(data), 1.0), m.Drop)
    later = idle.encrypt(b"later", 1.0)
    assert isinstance(later, bytes)
    opened = peer.decrypt(_parse(later), 1.0)
    assert not isinstance(opened, m.Drop) and opened[0].startswith(b"later")


def test_a_batch_is_numbered_from_one_block() -> None:
    ka, kb = _pair()
    a, b = Session(), Session()
    a.install(ka)
    b.install(kb)
    sealed = a.encrypt_many([b"p%d" % i for i in range(45)], 1.0)
    assert isinstance(sealed, list) and len(sealed) == 45
    counters = [_parse(d).counter for d in sealed]
    assert counters == list(range(45))
    for i, d in enumerate(sealed):
        opened = b.decrypt(_parse(d), 1.0)
        assert not isinstance(opened, m.Drop) and opened[0].startswith(b"p%d" % i)


def test_a_run_opens_once_and_a_forgery_in_it_moves_nothing() -> None:
    """A batch in order is taken by the window at once: replayed whole, in part or inside
    itself it is refused; a forged message in it is refused and its counter stays free for
    the genuine one; a keepalive in it is no forgery."""
    ka, kb = _pair()
    a, b = Session(), Session()
    a.install(ka)
    b.install(kb)
    sealed = a.encrypt_many([b"p%d" % i for i in range(10)] + [b""], 1.0)
    assert isinstance(sealed, list)
    first = b.open_many(kb.local_index, [sealed[0]], 1.0)  # counter 0: the window's start
    assert not isinstance(first, m.Drop) and len(first[1]) == 1
    run = sealed[1:]
    forged = run[4][:20] + bytes([run[4][20] ^ 1]) + run[4][21:]
    opened = b.open_many(kb.local_index, [*run[:4], forged, *run[5:]], 1.0)
    assert not isinstance(opened, m.Drop)
    _, plains, refused = opened
    assert [p[:2] for p in plains] == [b"p1", b"p2", b"p3", b"p4", b"p6", b"p7", b"p8", b"p9",
                                       b""]
    assert refused == [m.Drop(m.DropReason.DECRYPT_FAILED)]
    again = b.open_many(kb.local_index, run, 1.0)  # the genuine 5th gets in, the rest not
    assert not isinstance(again, m.Drop)
    assert [p[:2] for p in again[1]] == [b"p5"] and len(again[2]) == 9
    more = a.encrypt_many([b"q%d" % i for i in range(5)], 1.0)
    assert isinstance(more, list)
    doubled = b.open_many(kb.local_index, more[:3] + more[2:], 1.0)  # a replay inside the run
    assert not isinstance(doubled, m.Drop)
    assert [p[:2] for p in doubled[1]] == [b"q0", b"q1", b"q2", b"q3", b"q4"]
    assert doubled[2] == [m.Drop(m.DropReason.REPLAY)]
    window = b.current.window if b.current is not None else None
    assert window is not None and window.last == 15
    assert all(not window.check(c, REJECT_AFTER_MESSAGES) for c in range(16))


def test_a_batch_is_sealed_as_gso_trains() -> None:
    """seal_many: equal messages, then one shorter, make one train; a longer one, or any after
    the shorter, starts the next; every message opens in order from its train."""
    ka, kb = _pair()
    a, b = Session(), Session()
    a.install(ka)
    b.install(kb)
    sizes = [1420] * 5 + [700, 1420, 1420, 100, 100, 300]
    packets = [bytes([i]) * n for i, n in enumerate(sizes)]
    trains = a.seal_many(packets, 1.0, mtu=1420)
    assert not isinstance(trains, m.Drop)
    # (1420 needs no padding, 700 -> 704, 100 -> 112, 300 -> 304; each message 32 more)
    assert [(len(t), seg) for t, seg in trains] == [
        (5 * 1452 + 736, 1452), (2 * 1452 + 144, 1452), (144, 144), (336, 336)]
    wire = [bytes(t[k:k + seg]) for t, seg in trains for k in range(0, len(t), seg)]
    assert [m.parse(d).counter for d in wire] == list(range(11))  # type: ignore[union-attr]
    opened = b.open_many(kb.local_index, wire, 1.0)
    assert not isinstance(opened, m.Drop) and not opened[2]
    assert [p[:n] for p, n in zip(opened[1], sizes, strict=True)] == packets


def test_padding() -> None:
    assert len(pad(b"x" * 17)) == 32 and pad(b"") == b""
    assert len(pad(b"x" * 1419, mtu=1420)) == 1420


def test_worker_processes_never_share_a_counter() -> None:
    """Three forked workers draw from one SharedCounterBlocks at once; their counters,
    reported through pipes, are all distinct."""
    ka, _ = _pair()
    blocks = SharedCounterBlocks()
    readers, pids = [], []
    for _ in range(3):
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:  # the worker
            try:
                os.close(r)
                keys = TransportKeys(ka, counters=blocks)
                drawn = [keys.next_counter() for _ in range(3000)]
                os.write(w, struct.pack(f"<{len(drawn)}Q", *drawn))
            finally:
                os._exit(0)
        os.close(w)
        readers.append(r)
        pids.append(pid)
    every: list[int] = []
    for r, pid in zip(readers, pids, strict=True):
        data = b""
        while chunk := os.read(r, 1 << 16):
            data += chunk
        os.close(r)
        os.waitpid(pid, 0)
        every += struct.unpack(f"<{len(data) // 8}Q", data)
    assert len(every) == 9000 and len(set(every)) == 9000
    assert blocks.issued >= 9000
