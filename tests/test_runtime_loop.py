"""The per-queue I/O loop in every mode, against the real kernel: answers arrive, counters are
exact (they reconcile with IFLA_STATS64), bad input is counted and survived, a deleted
device ends the loop cleanly."""

from __future__ import annotations

import contextlib
import errno
import os
import socket
import subprocess
import threading
import time
from collections.abc import Callable

import pytest

import mqtun
from mqtun.errors import DeviceGoneError, InvalidArgumentError
from mqtun.runtime.loop import MODES, IOLoop, LoopConfig, Route, SpinWindow

LOCAL, PEER = "198.18.1.1", "198.18.1.2"


def udp_echo(pkt: bytes) -> bytes | None:
    """Answer an IPv4/UDP packet by swapping addresses and ports: both checksums stay valid
    (the sums are commutative), so nothing needs recomputing."""
    if len(pkt) < 28 or pkt[0] >> 4 != 4 or pkt[9] != 17:
        return None
    ihl = (pkt[0] & 15) * 4
    return (pkt[:12] + pkt[16:20] + pkt[12:16] + pkt[20:ihl]
            + pkt[ihl + 2:ihl + 4] + pkt[ihl:ihl + 2] + pkt[ihl + 4:])


def _device(queues: int = 1) -> mqtun.Device:
    dev = mqtun.Device.create("lp%d", queues)
    dev.link.add_address(f"{LOCAL}/24")
    dev.link.up()
    return dev


def _ping(sock: socket.socket, n: int, payload: bytes = b"ping") -> int:
    got = 0
    for i in range(n):
        sock.sendto(payload + str(i).encode(), (PEER, 7))
        try:
            data = sock.recv(2048)
        except TimeoutError:
            continue
        got += data == payload + str(i).encode()
    return got


class _Running:
    def __init__(self, loop: IOLoop) -> None:
        self.loop = loop
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            self.loop.run()
        except BaseException as exc:
            self.error = exc

    def stop(self) -> None:
        self.loop.stop()
        self.thread.join(5)
        assert not self.thread.is_alive()
        self.loop.close()


# uring runs in a worker process (test_runtime_workers): the liburing binding holds the GIL
# while it waits for completions, which would starve this test's own thread.
@pytest.mark.parametrize("mode", [m for m in MODES if m != "uring"])
def test_every_mode_answers_and_counts_exactly(mode: str) -> None:
    dev = _device()
    q = dev.queues[0]
    run = _Running(IOLoop([Route(q, handler=udp_echo)], LoopConfig(mode=mode)))
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.bind((LOCAL, 0))
            s.settimeout(1.0)
            assert _ping(s, 200) == 200
    finally:
        run.stop()
    assert run.error is None
    st, k = q.stats, dev.link.stats()
    # the kernel's tx is what userspace read, its rx what userspace wrote
    assert st.read_packets == k["tx_packets"] and st.read_bytes == k["tx_bytes"]
    assert st.written_packets == k["rx_packets"] and st.written_bytes == k["rx_bytes"]
    # whatever was read and not answered was counted as a drop (IPv6 noise, for instance)
    assert st.read_packets == st.written_packets + st.dropped_total
    dev.close()


def test_bad_input_and_handler_errors_are_counted_not_fatal() -> None:
    dev = _device()
    q = dev.queues[0]

    def handler(pkt: bytes) -> object:
        if b"boom" in pkt:
            raise RuntimeError("handler bug")
        if b"junk" in pkt:
            return b"\x00" * 3  # not IPv4/IPv6: judged before the kernel sees it
        if b"many" in pkt:
            return [udp_echo(pkt), udp_echo(pkt)]
        return udp_echo(pkt)

    run = _Running(IOLoop([Route(q, handler=handler)], LoopConfig(batch=4)))
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.bind((LOCAL, 0))
            s.settimeout(1.0)
            for word in (b"boom", b"junk", b"boom"):
                s.sendto(word, (PEER, 7))
            assert _ping(s, 5) == 5  # still answering
            s.sendto(b"many", (PEER, 7))
            assert s.recv(100) == b"many" and s.recv(100) == b"many"
    finally:
        run.stop()
    assert run.error is None
    d = q.stats.dropped
    assert d.get("handler-error") == 2 and d.get("bad-result") == 1
    assert q.stats.write_errors == 0  # the path refused it: nothing the kernel had to refuse
    dev.close()


def test_device_deleted_ends_the_loop_with_device_gone() -> None:
    dev = _device()
    run = _Running(IOLoop([Route(dev.queues[0], handler=udp_echo)], LoopConfig(mode="epoll")))
    subprocess.run(["ip", "link", "del", dev.name], check=True, timeout=10)
    run.thread.join(3)
    assert not run.thread.is_alive()
    assert isinstance(run.error, DeviceGoneError)
    run.loop.close()
    dev.close()


def test_adaptive_spin_then_sleep_and_stop_is_prompt() -> None:
    dev = _device()
    loop = IOLoop([Route(dev.queues[0], handler=udp_echo)], LoopConfig(spin_us=2000))
    run = _Running(loop)
    time.sleep(0.2)  # idle: it must be asleep in epoll, not spinning
    t0 = time.monotonic()
    run.stop()
    assert time.monotonic() - t0 < 0.5
    dev.close()


def test_two_routes_reading_one_queue_are_refused() -> None:
    """A queue has one reader: a second route on it would never be drained (epoll holds an
    fd once), so the loop says so instead of failing with EEXIST."""
    dev = _device(2)
    try:
        with pytest.raises(InvalidArgumentError, match="two routes read the same queue"):
            IOLoop([Route(dev.queues[0], handler=udp_echo),
                    Route(dev.queues[0], dev.queues[1])])
    finally:
        dev.close()


def test_flow_table_follows_the_answering_queue() -> None:
    """Why workers answer on the queue they read from, measured: the kernel steers a flow to
    the queue that last wrote it. Answer every flow on queue 0 and all flows end up there."""
    dev = _device(4)
    socks = []
    for _ in range(32):
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.bind((LOCAL, 0))
        s.settimeout(1.0)
        socks.append(s)

    def reads_per_queue(routes: list[Route]) -> list[int]:
        run = _Running(IOLoop(routes, LoopConfig(mode="epoll")))
        try:
            before = [q.stats.read_packets for q in dev.queues]
            for _ in range(3):
                for s in socks:
                    assert _ping(s, 1) == 1
        finally:
            run.stop()
        return [q.stats.read_packets - b for q, b in zip(dev.queues, before, strict=True)]

    try:
        own = reads_per_queue([Route(q, handler=udp_echo) for q in dev.queues])
        assert sum(1 for n in own if n) >= 3, own  # spread over the queues, and stays so
        q0 = dev.queues[0]
        moved = reads_per_queue([Route(q, dst=q0, handler=udp_echo) for q in dev.queues])
        # after the first answer on queue 0, every later packet of every flow arrives there
        assert moved[0] >= 2 * 32 and sum(moved[1:]) <= 32, moved
    finally:
        for s in socks:
            s.close()
        dev.close()


def test_config_and_route_validation() -> None:
    with pytest.raises(InvalidArgumentError, match="choose one of"):
        LoopConfig(mode="fastest")
    with pytest.raises(InvalidArgumentError):
        LoopConfig(batch=0)
    dev = _device()
    q = dev.queues[0]
    with pytest.raises(InvalidArgumentError):
        Route(q)
    with pytest.raises(InvalidArgumentError):
        IOLoop([])
    dev.close()


@pytest.mark.parametrize("mode", [m for m in MODES if m != "uring"])
def test_results_that_are_not_packets_are_drops_and_faults_are_reported(mode: str) -> None:
    dev = _device()
    q = dev.queues[0]

    def handler(pkt: bytes) -> object:
        if pkt.endswith(b"str"):
            return "a str"
        if pkt.endswith(b"gen"):
            return (udp_echo(pkt) for _ in range(2))  # a generator of two answers
        if pkt.endswith(b"none"):
            return [udp_echo(pkt), None, 7]
        if pkt.endswith(b"empty"):
            return []
        return udp_echo(pkt)

    faults: list[tuple[str, str]] = []
    run = _Running(IOLoop([Route(q, handler=handler)], LoopConfig(mode=mode),
                          on_fault=lambda key, text: faults.append((key, text))))
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.bind((LOCAL, 0))
            s.settimeout(1.0)
            for word in (b"str", b"str", b"empty"):
                s.sendto(word, (PEER, 7))
            s.sendto(b"gen", (PEER, 7))
            assert s.recv(100) == b"gen" and s.recv(100) == b"gen"
            s.sendto(b"none", (PEER, 7))
            assert s.recv(100) == b"none"
            assert _ping(s, 3) == 3
    finally:
        run.stop()
    assert run.error is None
    d = q.stats.dropped
    assert d.get("bad-result") == 4 and d.get("filtered", 0) >= 1, d  # 2 str, None, 7
    assert [k.rsplit(" ", 1)[-1] for k, _ in faults] == ["str", "NoneType"], faults
    assert "test_runtime_loop.py" in faults[0][1]
    dev.close()


@pytest.mark.parametrize("mode", ["busy", "adaptive", "epoll", "naive"])
def test_a_closed_queue_is_not_a_deleted_device(mode: str) -> None:
    """A queue closed under a running loop ends it with EBADF, also while it sleeps (a closed
    fd leaves epoll's set without a word: the queue's close watch wakes the loop)."""
    dev = _device()
    q = dev.queues[0]
    with pytest.raises(mqtun.MqtunError, match="closed"), \
            IOLoop([Route(_closed_queue(), handler=udp_echo)]) as lp:
        lp.run()  # closed before: refused at once
    run = _Running(IOLoop([Route(q, handler=udp_echo)], LoopConfig(mode=mode)))
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind((LOCAL, 0))
        s.settimeout(1.0)
        assert _ping(s, 2) == 2  # running
    time.sleep(0.05)  # past any spin: asleep, except in busy mode
    q.close()  # the application's own close
    run.thread.join(3)
    assert not run.thread.is_alive()
    assert isinstance(run.error, mqtun.MqtunError) and run.error.errno == errno.EBADF
    assert not isinstance(run.error, DeviceGoneError) and "closed" in str(run.error)
    run.loop.close()
    dev.close()


def test_the_spin_window_adapts_as_halt_polling_does() -> None:
    """Sans-IO: a sleep that ended within the most a spin may take grows the window (a longer
    spin would have met the packet); one that outlasted it shrinks it, down to no spin."""
    w = SpinWindow(200)
    assert w.seconds == pytest.approx(50e-6)  # where a loop starts
    assert w.slept(80e-6) == pytest.approx(100e-6)
    assert w.slept(150e-6) == pytest.approx(200e-6)
    assert w.slept(190e-6) == pytest.approx(200e-6)  # never past the most
    sparse = [w.slept(0.01) for _ in range(8)]  # a packet every 10 ms: no spin pays
    assert sparse[-1] == 0.0 and sparse == sorted(sparse, reverse=True)
    assert w.slept(0.01) == 0.0  # stays off while traffic stays sparse
    assert w.slept(60e-6) == pytest.approx(10e-6)  # a quick packet again: grows from 10 us
    assert w.slept(60e-6) == pytest.approx(20e-6)
    off = SpinWindow(0)  # spin_us=0: never spins
    assert off.seconds == 0.0 and off.slept(1e-6) == 0.0 and off.slept(1.0) == 0.0
    tiny = SpinWindow(4)  # a most below the grow start: grows straight to it
    assert tiny.seconds == pytest.approx(4e-6) and tiny.slept(1.0) == 0.0
    assert tiny.slept(2e-6) == pytest.approx(4e-6)


def _closed_queue() -> mqtun.Queue:
    other = mqtun.Device.create("lpc%d")
    q = other.queues[0]
    other.close()
    return q


def test_an_unclosed_loop_does_not_leak_its_wake_pipe() -> None:
    import gc

    dev = _device()
    gc.collect()  # the garbage of earlier tests (their fds) is not this test's to count
    before = len(os.listdir("/proc/self/fd"))
    for _ in range(50):
        IOLoop([Route(dev.queues[0], handler=udp_echo)])  # never closed
    gc.collect()
    assert len(os.listdir("/proc/self/fd")) == before
    dev.close()


def _read_drains() -> list[object]:
    from mqtun import queue

    c = getattr(queue, "_read_drain_c", None)
    return [queue.read_drain_python] + ([c] if c is not None else [])


@pytest.mark.parametrize("read_drain", _read_drains(), ids=lambda f: getattr(f, "__module__", ""))
def test_a_drain_reads_until_empty_or_the_limit_and_reports_a_failed_read(
        read_drain: object) -> None:  # fmt: skip
    """The drain's read loop (C where it is built, else Python): every datagram queued, each
    in a buffer of its own of at most `size`, up to `limit`; an empty queue is no error; any
    other failure is its errno, with what was read before it."""

    assert callable(read_drain)
    fn: Callable[[int, int, int], tuple[list[bytes], int, int]] = read_drain  # type: ignore[assignment]
    here, there = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    with here, there:
        here.setblocking(False)
        assert fn(here.fileno(), 100, 64) == ([], 0, 0)
        sent = [os.urandom(n) for n in (1, 50, 100, 7)]
        for d in [*sent, b"x" * 300]:
            there.send(d)
        assert fn(here.fileno(), 100, 2) == (sent[:2], 51, 0)
        assert fn(here.fileno(), 100, 64) == ([*sent[2:], b"x" * 100], 207, 0)  # cut at size
        assert fn(here.fileno(), 100, 0) == ([], 0, 0)
        fd = here.fileno()
    assert fn(fd, 100, 64) == ([], 0, errno.EBADF)  # closed: a failure, not "empty"


def _write_eaches() -> list[object]:
    from mqtun import queue

    c = getattr(queue, "_write_each_c", None)
    return [queue.write_each_python] + ([c] if c is not None else [])


@pytest.mark.parametrize("write_each", _write_eaches(), ids=lambda f: getattr(f, "__module__", ""))
def test_a_drain_is_written_in_order_until_a_write_fails(write_each: object) -> None:
    """The drain's write loop (C where it is built, else Python): every buffer from `start`
    on, any bytes-like kind, one write each; a write that fails stops it at its index with
    its errno, the bytes of those before it counted, so that the caller goes on after it."""
    from collections.abc import Sequence

    assert callable(write_each)
    fn: Callable[[int, Sequence[object], int], tuple[int, int, int]] = write_each  # type: ignore[assignment]
    here, there = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    with here, there:
        there.setblocking(False)
        bufs = [b"one", bytearray(b"two!"), memoryview(b"three")]
        assert fn(here.fileno(), bufs, 0) == (3, 12, 0)
        assert [there.recv(100) for _ in range(3)] == [b"one", b"two!", b"three"]
        assert fn(here.fileno(), bufs, 2) == (3, 5, 0) and there.recv(100) == b"three"
        assert fn(here.fileno(), bufs, 3) == (3, 0, 0)
        too_big = bytes(1 << 22)  # larger than a datagram may be: EMSGSIZE
        assert fn(here.fileno(), [b"a", too_big, b"c"], 0) == (1, 1, errno.EMSGSIZE)
        assert fn(here.fileno(), [b"a", too_big, b"c"], 2) == (3, 1, 0)
        assert [there.recv(100) for _ in range(2)] == [b"a", b"c"]
        fd = here.fileno()
    assert fn(fd, bufs, 1) == (1, 0, errno.EBADF)


def _relay_drains() -> list[object]:
    from mqtun import queue

    c = getattr(queue, "_RelayDrain_c", None)
    return [queue.RelayDrainPython] + ([c] if c is not None else [])


@pytest.mark.parametrize("relay_drain", _relay_drains(), ids=lambda t: getattr(t, "__module__", ""))
def test_a_small_plain_drain_is_written_in_the_call_that_read_it(relay_drain: object) -> None:
    """RelayDrain (C where it is built, else Python): the drain as read_drain reads it, its
    reads counted; written to `out_fd` in order only when it holds 1 to `relay_max` buffers
    and none has a gso_type at `gso_at`, counted as written; anything else, or a failed read
    or write, goes to `rest` with what was done (a failed write is not tried again)."""
    from mqtun.queue import RELAY_SLOTS
    from mqtun.stats import (
        READ_BYTES,
        READ_PACKETS,
        READ_WIRE_PACKETS,
        WRITTEN_BYTES,
        WRITTEN_PACKETS,
        WRITTEN_WIRE_PACKETS,
        Counters,
    )

    assert callable(relay_drain)
    src_r, src_w = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    out_r, out_w = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    rested: list[tuple[list[bytes], int, int, int]] = []

    def rest(bufs: list[bytes], failed: int, sent: int, werr: int) -> int:
        rested.append((bufs, failed, sent, werr))
        return -len(bufs)

    def make(in_fd: int, out_fd: int, relay_max: int, gso_at: int,
             rc: Counters, wc: Counters) -> Callable[[], int]:  # fmt: skip
        return relay_drain(in_fd, 100, 64, out_fd, relay_max, gso_at,  # type: ignore[no-any-return]
                           rc.slots, wc.slots, RELAY_SLOTS, 2, 1, rest)

    def written() -> list[bytes]:
        got = []
        with contextlib.suppress(BlockingIOError):
            while True:
                got.append(out_r.recv(1000))
        return got

    def figures(c: Counters, *slots: int) -> tuple[int, ...]:
        return tuple(c.slots[i] for i in slots)

    read, wrote = Counters(), Counters()
    with src_r, src_w, out_r, out_w:
        src_r.setblocking(False)
        out_r.setblocking(False)
        drain = make(src_r.fileno(), out_w.fileno(), 3, 1, read, wrote)
        assert drain() == 0 and rested == []  # nothing queued: nothing to do, no rest
        plain = [b"\0\0" + os.urandom(n) for n in (10, 40, 5)]
        for d in plain:
            src_w.send(d)
        assert drain() == 3 and rested == [] and written() == plain
        assert figures(read, READ_PACKETS, READ_BYTES, READ_WIRE_PACKETS) == (3, 61 - 6, 3)
        assert figures(wrote, WRITTEN_PACKETS, WRITTEN_BYTES, WRITTEN_WIRE_PACKETS) == (3, 58, 3)
        for d in [*plain, b"x"]:  # four: more than relay_max, read and handed on unwritten
            src_w.send(d)
        assert drain() == -4 and rested.pop() == ([*plain, b"x"], 0, 0, 0)
        assert written() == [] and figures(read, READ_PACKETS, READ_WIRE_PACKETS) == (7, 3)
        for d in [plain[0], b"\0\1" + bytes(8)]:  # a super-packet among them: not written
            src_w.send(d)
        assert drain() == -2 and rested.pop()[1:] == (0, 0, 0)
        src_w.send(b"\0")  # shorter than gso_at: not known plain, not written
        assert drain() == -1 and rested.pop()[1:] == (0, 0, 0) and written() == []
        for d in plain:
            src_w.send(d)
        dead = os.open("/dev/null", os.O_RDONLY)  # writing fails (EBADF): nothing is sent
        try:
            assert make(src_r.fileno(), dead, 3, -1, read, wrote)() == -3
            assert rested.pop() == (plain, 0, 0, errno.EBADF)
        finally:
            os.close(dead)
        assert figures(wrote, WRITTEN_PACKETS, WRITTEN_WIRE_PACKETS) == (3, 3)
        many = [b"\0\0" + bytes([i]) * (i + 1) for i in range(12)]  # longer than C's spares
        for d in many:
            src_w.send(d)
        wide = make(src_r.fileno(), out_w.fileno(), 64, 1, read, wrote)
        assert wide() == 12 and rested == [] and written() == many
        for d in [*many[:10], b"\0\4" + bytes(8), many[10]]:  # a super-packet 11th: the rest
            src_w.send(d)
        assert wide() == -12 and rested.pop() == ([*many[:10], b"\0\4" + bytes(8), many[10]],
                                                  0, 0, 0)
        assert figures(read, READ_PACKETS) == (3 + 4 + 2 + 1 + 3 + 12 + 12,)
        fd = src_r.fileno()
    assert make(fd, 1, 3, -1, read, wrote)() == 0 and rested.pop() == ([], errno.EBADF, 0, 0)
    with pytest.raises(ValueError, match="slots"):
        relay_drain(0, 100, 64, 1, 3, -1, read.slots, wrote.slots, (0, 1), 0, 0, rest)


@pytest.mark.parametrize("relay_drain", _relay_drains(), ids=lambda t: getattr(t, "__module__", ""))
def test_a_small_drain_of_super_packets_is_relayed_and_counted_by_their_segments(
        relay_drain: object) -> None:
    """Given `supers`, a drain of reads that are plain or super-packets whose segments it
    counts (a TCP stream's drain), at most `relay_max` of them plain, is written as read: the
    read and written wire packets are the segments (what gso.segment_count says), and a
    failed write is handed on with them counted read. Without `supers` the same drain is
    Python's, as before."""
    import sys

    from scapy.layers.inet import IP, TCP, UDP
    from scapy.layers.inet6 import IPv6
    from scapy.packet import Raw

    from mqtun import _uapi
    from mqtun.packet.vnet import VnetHeader, encode
    from mqtun.queue import RELAY_SLOTS, relay_supers
    from mqtun.stats import READ_WIRE_PACKETS, WRITTEN_PACKETS, WRITTEN_WIRE_PACKETS, Counters

    assert callable(relay_drain)
    little = sys.byteorder == "little"
    csum = _uapi.VIRTIO_NET_HDR_F_NEEDS_CSUM

    def read_of(gso_type: int, size: int, packet: bytes) -> bytes:
        return encode(VnetHeader(csum, gso_type, 0, size, 0, 0), 12, little_endian=little) + (
            packet)  # fmt: skip

    tso = read_of(_uapi.VIRTIO_NET_HDR_GSO_TCPV4, 1000, bytes(
        IP(src="198.18.0.1", dst="198.18.0.2") / TCP(flags="A") / Raw(bytes(3000))))
    uso = read_of(_uapi.VIRTIO_NET_HDR_GSO_UDP_L4, 100, bytes(
        IPv6(src="fd00::1", dst="fd00::2") / UDP() / Raw(bytes(201))))
    plain = read_of(0, 0, bytes(IP(src="198.18.0.1", dst="198.18.0.2") / UDP() / Raw(b"x")))
    drain = [tso, uso, plain]  # 3 + 3 + 1 wire packets
    rested: list[tuple[list[bytes], int, int, int]] = []

    def rest(bufs: list[bytes], failed: int, sent: int, werr: int) -> int:
        rested.append((bufs, failed, sent, werr))
        return -len(bufs)

    src_r, src_w = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    out_r, out_w = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    with src_r, src_w, out_r, out_w:
        src_r.setblocking(False)
        out_r.setblocking(False)

        def run(out_fd: int, supers: object) -> tuple[int, Counters, Counters]:
            read, wrote = Counters(), Counters()
            for d in drain:
                src_w.send(d)
            relay = relay_drain(src_r.fileno(), 12000, 64, out_fd, 3, 1,  # type: ignore[operator]
                                read.slots, wrote.slots, RELAY_SLOTS, 12, 12, rest,
                                supers=supers)
            return relay(), read, wrote

        supers = relay_supers(12, 0, tap=False, little_endian=little)
        got, read, wrote = run(out_w.fileno(), supers)
        assert got == 3 and rested == [] and [out_r.recv(12000) for _ in drain] == drain
        assert read.slots[READ_WIRE_PACKETS] == 7
        assert [wrote.slots[i] for i in (WRITTEN_PACKETS, WRITTEN_WIRE_PACKETS)] == [3, 7]
        got, read, wrote = run(out_w.fileno(), None)  # plain packets only: Python's drain
        assert got == -3 and rested.pop() == (drain, 0, 0, 0)
        assert read.slots[READ_WIRE_PACKETS] == wrote.slots[WRITTEN_PACKETS] == 0
        dead = os.open("/dev/null", os.O_RDONLY)  # writing fails (EBADF): handed on, counted
        try:
            got, read, wrote = run(dead, supers)
        finally:
            os.close(dead)
        assert got == -3 and rested.pop() == (drain, 0, 0, errno.EBADF)
        assert read.slots[READ_WIRE_PACKETS] == 7 and wrote.slots[WRITTEN_WIRE_PACKETS] == 0
        drain = [tso] * 10 + [plain] * 3 + [uso]  # longer than C's spares, 3 plain reads
        got, read, wrote = run(out_w.fileno(), supers)
        assert got == 14 and rested == [] and [out_r.recv(12000) for _ in drain] == drain
        assert read.slots[READ_WIRE_PACKETS] == wrote.slots[WRITTEN_WIRE_PACKETS] == 36
        big = read_of(_uapi.VIRTIO_NET_HDR_GSO_TCPV4, 1000, bytes(  # handed over in its spare
            IP(src="198.18.0.1", dst="198.18.0.2") / TCP(flags="A") / Raw(os.urandom(9000))))
        drain = [plain] * 4 + [tso, big] + [plain] * 9  # more plain reads than relay_max
        got, read, wrote = run(out_w.fileno(), supers)  # ... and no join: Python's
        assert got == -15 and rested.pop() == (drain, 0, 0, 0) and wrote.slots[WRITTEN_PACKETS] == 0
        assert read.slots[READ_WIRE_PACKETS] == 0  # (Python counts what it joins and writes)
        with pytest.raises(ValueError, match="gso_at"):
            relay_drain(0, 100, 64, 1, 3, 5, read.slots, wrote.slots,  # type: ignore[operator]
                        RELAY_SLOTS, 12, 12, rest, supers=supers)


@pytest.mark.parametrize("relay_drain", _relay_drains(), ids=lambda t: getattr(t, "__module__", ""))
def test_a_drain_of_many_plain_reads_is_joined_then_written(relay_drain: object) -> None:
    """Given `join`, a drain with more plain reads than `relay_max` is joined (the forwarder's
    reads_joiner) and what it returns is written in the same call: a joined buffer counted as
    the reads it holds, a read as it came as its own; nothing joined, the reads as read. A
    failed write hands the joined buffers to `rest`; the drain returns the number read."""
    import sys

    from mqtun.queue import RELAY_SLOTS, relay_supers
    from mqtun.stats import READ_WIRE_PACKETS, WRITTEN_PACKETS, WRITTEN_WIRE_PACKETS, Counters

    assert callable(relay_drain)
    plain = [bytes(12) + bytes([i]) * 30 for i in range(5)]
    joined = b"J" * 50  # stands for a USO packet of the first four reads
    answers: list[tuple[list[bytes], list[int] | None]] = []
    rested: list[tuple[list[bytes], int, int, int]] = []

    def join(bufs: list[bytes]) -> tuple[list[bytes], list[int] | None]:
        assert bufs == plain
        return answers.pop()

    def rest(bufs: list[bytes], failed: int, sent: int, werr: int) -> int:
        rested.append((bufs, failed, sent, werr))
        return -1

    supers = relay_supers(12, 0, tap=False, little_endian=sys.byteorder == "little")
    src_r, src_w = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    out_r, out_w = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    with src_r, src_w, out_r, out_w:
        src_r.setblocking(False)
        out_r.setblocking(False)

        def run(out_fd: int, answer: tuple[list[bytes], list[int] | None]) -> tuple[
                int, Counters, Counters]:  # fmt: skip
            read, wrote = Counters(), Counters()
            answers.append(answer)
            for d in plain:
                src_w.send(d)
            got = relay_drain(src_r.fileno(), 100, 64, out_fd, 3, 1,  # type: ignore[operator]
                              read.slots, wrote.slots, RELAY_SLOTS, 12, 12, rest,
                              supers=supers, join=join)()
            assert answers == []
            return got, read, wrote

        got, read, wrote = run(out_w.fileno(), (plain, None))  # nothing joined: as read
        assert got == 5 and rested == [] and [out_r.recv(100) for _ in plain] == plain
        assert read.slots[READ_WIRE_PACKETS] == wrote.slots[WRITTEN_WIRE_PACKETS] == 5
        got, read, wrote = run(out_w.fileno(), ([joined, plain[4]], [4, 0]))
        assert got == 5 and rested == [] and [out_r.recv(100) for _ in "ab"] == [joined, plain[4]]
        assert read.slots[READ_WIRE_PACKETS] == wrote.slots[WRITTEN_WIRE_PACKETS] == 5
        assert wrote.slots[WRITTEN_PACKETS] == 2
        dead = os.open("/dev/null", os.O_RDONLY)
        try:
            got, read, wrote = run(dead, ([joined, plain[4]], [4, 0]))
        finally:
            os.close(dead)
        assert got == 5 and rested.pop() == ([joined, plain[4]], 0, 0, errno.EBADF)
        assert read.slots[READ_WIRE_PACKETS] == 5 and wrote.slots[WRITTEN_WIRE_PACKETS] == 0


def test_the_c_loop_serves_ready_fds_until_stopped_and_ends_on_a_callback_error() -> None:
    """`serve` (C, where it is built) is serve_ready's loop: each ready fd's callback, a
    RelayDrain among them without a Python frame, until `stopping()`; a callback's exception
    ends it and is raised; an fd it has no callback for is a KeyError."""
    import select

    from mqtun.queue import RELAY_SLOTS, serve
    from mqtun.stats import READ_PACKETS, Counters

    if serve is None:
        pytest.skip("mqtun._reads is not built")
    src_r, src_w = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    out_r, out_w = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    with src_r, src_w, out_r, out_w, select.epoll() as ep:
        src_r.setblocking(False)
        counters = Counters()
        drain = queue_module().RelayDrain(  # type: ignore[attr-defined]
            src_r.fileno(), 100, 64, out_w.fileno(), 64, -1, counters.slots, counters.slots,
            RELAY_SLOTS, 0, 0, lambda *rest: 0)
        ep.register(src_r.fileno(), select.EPOLLIN)
        turns = []

        def stopping() -> bool:
            turns.append(1)
            return counters.slots[READ_PACKETS] >= 3 or len(turns) > 100_000

        for d in (b"a", b"b", b"c"):
            src_w.send(d)
        serve(ep.fileno(), {src_r.fileno(): drain}, stopping, SpinWindow(50), False)
        assert counters.slots[READ_PACKETS] == 3 and [out_r.recv(10) for _ in range(3)] == [
            b"a", b"b", b"c"]
        src_w.send(b"d")

        def fail() -> None:
            raise RuntimeError("a callback's fault")

        with pytest.raises(RuntimeError, match="fault"):
            serve(ep.fileno(), {src_r.fileno(): fail}, lambda: False, None, False)
        with pytest.raises(KeyError):
            serve(ep.fileno(), {}, lambda: False, None, True)


_OTHER_THREAD = """
import functools, os, select, sys, threading, time, types
from mqtun.queue import serve
from mqtun.runtime.loop import SpinWindow, drain_pipe, stop_flag
stop = types.SimpleNamespace(_stopping=False)  # read in C (stop_flag): no Python frame
wake_r, wake_w = os.pipe2(os.O_NONBLOCK)
ep = select.epoll()
ep.register(wake_r, select.EPOLLIN)
loop = threading.Thread(target=serve, args=(ep.fileno(), {wake_r: functools.partial(
    drain_pipe, wake_r)}, stop_flag(stop), SpinWindow(200), sys.argv[1] == "busy"))
loop.start()
counted, deadline = 0, time.monotonic() + 0.3
while time.monotonic() < deadline:  # this thread runs Python beside the loop
    counted += 1
stop._stopping = True
os.write(wake_w, b"\\0")  # as IOLoop.stop wakes a sleeping loop
loop.join(5)
print(counted, loop.is_alive())
"""


@pytest.mark.parametrize("busy", [True, False], ids=["busy", "spin"])
def test_a_loop_in_c_lets_other_threads_run(busy: bool) -> None:
    """`serve` keeps the GIL only for asks that cannot sleep: a busy or spinning loop with
    nothing to do must not stop the process's other threads (its stop comes from one). In a
    child process: a loop that kept the GIL would hang this one, where no timeout can run."""
    import sys

    from mqtun.queue import serve

    if serve is None:
        pytest.skip("mqtun._reads is not built")
    try:
        done = subprocess.run([sys.executable, "-c", _OTHER_THREAD, "busy" if busy else "spin"],
                              capture_output=True, text=True, timeout=20, check=True)
    except subprocess.TimeoutExpired:
        pytest.fail("the thread beside a loop in C never ran again (the loop kept the GIL)")
    counted, alive = done.stdout.split()
    assert int(counted) > 1000 and alive == "False"


def queue_module() -> object:
    from mqtun import queue

    return queue


def test_a_batch_handler_that_changes_its_list_in_place_is_taken_at_its_word() -> None:
    """A batch handler may change the list it is given and return it: a packet it put in
    is written (not mistaken for "unchanged", which writes the reads as they came), one that
    is no packet is a counted bad-result drop, and the caller's list is never touched."""
    from mqtun.runtime.loop import HandlerFaults, run_handler
    from mqtun.runtime.path import Layout, PacketPath, WireCounts
    from mqtun.stats import DropReason

    path = PacketPath(Layout())
    given: list[object] = [bytes.fromhex("4500001c000100004011") + bytes(10), b"\x45" + bytes(27)]
    kept = list(given)

    def swap(packets: list[object]) -> list[object]:
        packets[0] = bytearray(packets[0])  # type: ignore[arg-type]
        return packets

    out: list[object] = []
    assert run_handler(swap, given, path, HandlerFaults(), out, 2) == 2  # type: ignore[arg-type]
    assert given == kept and all(a is b for a, b in zip(given, kept, strict=True))
    assert type(out[0]) is bytearray and out[1] is given[1]  # the new packet, then the same

    def unchanged(packets: list[object]) -> list[object]:
        return packets

    out = []
    assert run_handler(unchanged, given, path, HandlerFaults(), out, 2) == 2  # type: ignore[arg-type]
    assert all(a is b for a, b in zip(out, given, strict=True))

    def spoil(packets: list[object]) -> list[object]:
        packets[1] = "not a packet"
        return packets

    out = []
    faults: list[object] = []
    run_handler(spoil, given, path, HandlerFaults(lambda *a: faults.append(a)), out,  # type: ignore[arg-type]
                2)  # fmt: skip
    assert out == [given[0]] and faults
    assert isinstance(path.counter, WireCounts)
    assert path.counter.dropped.get(DropReason.BAD_RESULT) == 1
