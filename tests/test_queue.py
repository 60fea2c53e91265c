"""Queues: reading and writing real packets, batches, waiting, counters, closing."""

from __future__ import annotations

import errno
import select
import socket
import threading
import time
from collections.abc import Callable, Iterator

import pytest
from nettools import ADDR_A, ADDR_B, NET, drain, echo_request, udp_flows, udp_packet, wait_for
from pyroute2 import IPRoute
from scapy.layers.inet import ICMP, IP

from mqtun import Device, DeviceGoneError, MqtunError, Queue
from mqtun.errors import QueueFullError


def _up(dev: Device) -> Device:
    dev.link.up()
    dev.link.add_address(NET)
    return dev


def test_write_an_echo_request_and_read_the_kernels_reply() -> None:
    with _up(Device.create()) as dev:
        dev.write(echo_request(ADDR_B, ADDR_A, ident=0x77, seq=3, payload=b"mqtun!"))
        reply = IP(dev.read(timeout=5))
        assert reply.src == ADDR_A and reply.dst == ADDR_B
        assert reply[ICMP].type == 0 and reply[ICMP].id == 0x77 and reply[ICMP].seq == 3
        assert bytes(reply[ICMP].payload) == b"mqtun!"


def test_write_accepts_bytes_bytearray_and_memoryview_without_copies() -> None:
    with _up(Device.create()) as dev:
        pkt = echo_request(ADDR_B, ADDR_A)
        big = bytearray(b"\0" * 7 + pkt + b"\0" * 9)
        for data in (pkt, bytearray(pkt), memoryview(big)[7:7 + len(pkt)]):
            assert dev.write(data) == len(pkt)
            assert dev.read(timeout=5) is not None
        assert dev.queues[0].writev([pkt[:20], memoryview(pkt)[20:]]) == len(pkt)
        assert dev.read(timeout=5) is not None


def test_read_timeouts_and_nonblocking() -> None:
    with Device.create() as dev, Device.create(blocking=False) as nb:
        t0 = time.monotonic()
        assert dev.read(timeout=0.2) is None
        assert 0.15 < time.monotonic() - t0 < 2
        assert dev.read(timeout=0) is None
        assert nb.queues[0].read() is None, "a non-blocking device never waits"
        buf = bytearray(100)
        assert nb.queues[0].read_into(buf) == 0


@pytest.mark.parametrize("rwf_nowait", [True, False], ids=["preadv2", "poll-first"])
def test_a_read_that_must_not_wait_does_not_wait_on_a_blocking_fd(
        monkeypatch: pytest.MonkeyPatch, rwf_nowait: bool) -> None:
    """`read_into(timeout=0)` never blocks, even after the fd was set blocking (as
    mqtun.compat's is): an empty queue answers 0 at once, a queued packet is read. Both
    ways: preadv2(RWF_NOWAIT), and poll first (a kernel that refuses that flag)."""
    import os

    import mqtun.queue

    monkeypatch.setattr(mqtun.queue, "_rwf_nowait", rwf_nowait)
    with _up(Device.create()) as dev:
        q = dev.queues[0]
        os.set_blocking(q.fd, True)
        got: list[int] = []
        t = threading.Thread(target=lambda: got.append(q.read_into(bytearray(2048), timeout=0)),
                             daemon=True)
        t.start()
        t.join(2)
        if t.is_alive():
            q.close()  # wakes nothing stuck in read(2), but ends the test's device
            pytest.fail("read_into(timeout=0) blocked on an empty queue")
        assert got == [0]
        dev.write(echo_request(ADDR_B, ADDR_A))
        buf = bytearray(2048)
        assert wait_for(lambda: q.read_into(buf, timeout=0) > 0, 5)


def test_read_batch_drains_many_packets_in_one_call() -> None:
    with _up(Device.create()) as dev:
        q = dev.queues[0]
        assert q.read_batch(10) == []
        udp_flows(ADDR_B, range(2000, 2050))
        wait_for(lambda: select.select([q], [], [], 0.05)[0])
        first = q.read_batch(20)
        assert len(first) == 20
        rest = q.read_batch(1000, timeout=1.0)
        assert len(rest) == 30
        assert q.stats.read_packets == 50


def test_read_into_a_caller_buffer_truncates_like_the_kernel() -> None:
    with _up(Device.create()) as dev:
        udp_flows(ADDR_B, [9], payload=b"p" * 100)
        buf = bytearray(50)
        assert dev.queues[0].read_into(buf, timeout=5) == 50
        assert buf[:1] == b"\x45"


def test_write_batch_counts_refused_packets_and_goes_on() -> None:
    with _up(Device.create()) as dev:
        q = dev.queues[0]
        good = echo_request(ADDR_B, ADDR_A)
        sent = q.write_batch([good, b"\x00garbage", good, b"", good])
        assert sent == 3
        s = q.stats
        assert s.written_packets == 3 and s.write_errors == 2
        assert s.dropped == {"refused": 2}
        replies = drain({q.fd: q}, lambda qq: qq.read_batch(10), 3)
        assert len(replies[q]) == 3


def test_garbage_write_is_explained() -> None:
    with _up(Device.create("gb0")) as dev:
        with pytest.raises(MqtunError) as exc:
            dev.write(b"\x99" * 40)
        assert exc.value.errno == errno.EINVAL and "gb0" in str(exc.value)
        assert "not IPv4/IPv6" in str(exc.value)
    with Device.create("tp%d", tap=True) as tap:
        tap.link.up()
        with pytest.raises(MqtunError) as exc:
            tap.write(b"\x01" * 10)
        assert exc.value.errno == errno.EINVAL and "14 bytes" in str(exc.value)


def test_write_while_the_link_is_down() -> None:
    with Device.create("dn0") as dev:
        with pytest.raises(MqtunError) as exc:
            dev.write(echo_request(ADDR_B, ADDR_A))
        assert exc.value.errno == errno.EIO and "dn0 is down" in str(exc.value)
        assert dev.queues[0].stats.dropped == {"link-down": 1}


def test_queues_work_with_select_poll_and_epoll() -> None:
    with _up(Device.create(queues=2)) as dev:
        q0, q1 = dev.queues
        ep = select.epoll()
        ep.register(q0.fileno(), select.EPOLLIN)
        ep.register(q1.fileno(), select.EPOLLIN)
        udp_flows(ADDR_B, range(3000, 3064))
        seen = 0
        deadline = time.monotonic() + 5
        while seen < 64 and time.monotonic() < deadline:
            for fd, _ in ep.poll(0.1):
                seen += len((q0 if fd == q0.fd else q1).read_batch(64))
        ep.close()
        assert seen == 64
        assert select.select([q0, q1], [], [], 0) == ([], [], [])


def test_close_from_another_thread_wakes_a_blocked_read() -> None:
    dev = Device.create()
    q = dev.queues[0]
    outcome: list[object] = []

    def reader() -> None:
        try:
            outcome.append(q.read(timeout=None))
        except MqtunError as exc:
            outcome.append(exc)

    t = threading.Thread(target=reader)
    t.start()
    time.sleep(0.2)
    q.close()
    t.join(timeout=2)
    assert not t.is_alive(), "the blocked read woke up"
    assert isinstance(outcome[0], MqtunError) and outcome[0].errno == errno.EBADF
    with pytest.raises(ValueError, match="closed"):
        q.fileno()
    with pytest.raises(MqtunError):
        q.write(b"x")
    q.close()  # idempotent


def test_counters_reconcile_with_the_kernel() -> None:
    with _up(Device.create(queues=4)) as dev:
        n = udp_flows(ADDR_B, range(4000, 4200), payload=b"c" * 33)
        fds = {q.fd: q for q in dev.queues}
        got = drain(fds, lambda q: q.read_batch(64), n)
        assert sum(map(len, got.values())) == n
        replies = 0
        for q in dev.queues:  # answer some on each queue: echo requests the kernel answers
            for i in range(5):
                q.write(echo_request(ADDR_B, ADDR_A, seq=i))
                replies += 1
        drain(fds, lambda q: q.read_batch(64), replies)
        ours = dev.stats()
        kernel = dev.link.stats()
        assert ours.read_packets == kernel["tx_packets"] == n + replies
        assert ours.read_bytes == kernel["tx_bytes"]
        assert ours.written_packets == kernel["rx_packets"] == replies
        assert ours.written_bytes == kernel["rx_bytes"]
        per_queue = [q.stats.read_packets for q in dev.queues]
        assert sum(per_queue) == n + replies and all(per_queue)


def test_counters_exclude_headers_like_the_kernel() -> None:
    with Device.create(vnet_hdr=True, packet_info=True) as dev:
        _up(dev)
        udp_flows(ADDR_B, [7])
        pkt = dev.read(timeout=5)
        assert pkt is not None
        assert dev.stats().read_bytes == len(pkt) - 14 == dev.link.stats()["tx_bytes"]


def test_ipv6_traffic() -> None:
    with Device.create() as dev:
        dev.link.up()
        dev.link.add_address("fd00:6d71::1/64")
        udp_flows("fd00:6d71::2", [5353, 5354])
        got = [dev.read(timeout=5) for _ in range(2)]
        assert all(p is not None and p[0] >> 4 == 6 for p in got)


def test_device_deleted_while_a_queue_reads() -> None:
    dev = _up(Device.create("gone0", 2))
    q = dev.queues[0]
    outcome: list[object] = []

    def reader() -> None:
        try:
            outcome.append(q.read(timeout=10))
        except MqtunError as exc:
            outcome.append(exc)

    t = threading.Thread(target=reader)
    t.start()
    time.sleep(0.2)
    from mqtun import delete_link

    delete_link("gone0")
    t.join(timeout=2)
    assert not t.is_alive(), "deletion woke the reader"
    assert isinstance(outcome[0], DeviceGoneError), outcome
    assert "gone0" in str(outcome[0])
    with pytest.raises(DeviceGoneError):
        dev.queues[1].write(echo_request(ADDR_B, ADDR_A))
    with pytest.raises(DeviceGoneError):
        dev.set_carrier(True)
    with pytest.raises(DeviceGoneError):
        dev.queues[1].read(timeout=0)
    dev.close()


def test_persistent_device_with_zero_queues_drops_without_error() -> None:
    dev = _up(Device.create("z0", persist=True))
    dev.close()
    udp_flows(ADDR_B, [1, 2, 3])  # no queue: the kernel drops, the sender sees nothing
    with Device.attach("z0") as again:
        assert again.read(timeout=0.1) is None
        again.delete()


def test_packet_info_header_is_returned_when_asked() -> None:
    with _up(Device.create(packet_info=True)) as dev:
        udp_flows(ADDR_B, [9])
        pkt = dev.read(timeout=5)
        assert pkt is not None and pkt[2:4] == b"\x08\x00" and pkt[4] == 0x45


def test_tap_frames_carry_ethernet() -> None:
    with Device.create("tp%d", tap=True) as dev:
        dev.link.set_hwaddr("02:00:00:00:00:01")
        dev.link.up()
        dev.link.add_address(NET)
        udp_flows(ADDR_B, [9])  # the kernel asks for ADDR_B's MAC first (ARP)
        frame = dev.read(timeout=5)
        assert frame is not None and frame[6:12] == bytes.fromhex("020000000001")
        assert frame[12:14] in (b"\x08\x06", b"\x08\x00")


def test_single_queue_helpers_refuse_many_queues() -> None:
    from mqtun import InvalidArgumentError

    with Device.create(queues=2) as dev, pytest.raises(InvalidArgumentError, match="2 open"):
        dev.read(timeout=0)


def test_udp_payload_arrives_byte_exact() -> None:
    with _up(Device.create()) as dev:
        payload = bytes(range(256)) * 3
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.bind((ADDR_A, 4444))
            s.sendto(payload, (ADDR_B, 5555))
        pkt = dev.read(timeout=5)
        assert pkt is not None and pkt[28:] == payload
        # and the other way: a packet written to the device reaches a socket
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as r:
            r.bind((ADDR_A, 6666))
            r.settimeout(5)
            dev.write(udp_packet(ADDR_B, ADDR_A, 7777, 6666, payload))
            data, peer = r.recvfrom(4096)
            assert data == payload and peer == (ADDR_B, 7777)


def test_queues_come_and_go_while_others_move_packets() -> None:
    """Adding, disabling, enabling and closing queues never disturbs a queue in use."""
    with _up(Device.create("ch%d", 2)) as dev:
        busy = dev.queues[0]
        stop = threading.Event()
        errors: list[BaseException] = []
        answered = [0]

        def worker() -> None:  # writes echo requests on its queue; replies land anywhere
            seq = 0
            try:
                while not stop.is_set():
                    seq = (seq + 1) & 0xFFFF
                    busy.write(echo_request(ADDR_B, ADDR_A, seq=seq))
                    answered[0] += 1
                    time.sleep(0.001)
            except BaseException as exc:
                errors.append(exc)

        t = threading.Thread(target=worker)
        t.start()
        try:
            for _ in range(5):
                before = answered[0]
                extra = dev.add_queue()
                other = dev.queues[1]
                if other.enabled:
                    other.disable()
                else:
                    other.enable()
                time.sleep(0.05)
                dev.remove_queue(extra)
                time.sleep(0.05)
                assert answered[0] > before, "the busy queue kept writing"
        finally:
            stop.set()
            t.join(timeout=5)
        assert not errors, errors
        assert busy.stats.written_packets == answered[0]
        assert dev.link.stats()["rx_packets"] == answered[0]


# ---- closed queues (issue 11) -------------------------------------------------------------------
def test_add_remove_churn_never_fills_the_device() -> None:
    """Closed queues leave the device's lists: the only cap is the kernel's 256 live queues."""
    with Device.create("cq%d", 2) as dev:
        for _ in range(300):
            dev.remove_queue(dev.add_queue())
        assert len(dev.queues) == 2 and len(dev.active_queues) == 2
        assert dev.info().num_queues == 2


def test_a_closed_queue_raises_and_never_reaches_a_reused_fd() -> None:
    import os

    with _up(Device.create("cq%d", 2)) as dev:
        q, other = dev.queues
        q.write(echo_request(ADDR_B, ADDR_A))
        old_fd = q.fd
        q.close()
        assert q not in dev.queues and q.index is None and not q.enabled
        assert dev.active_queues == [other]
        assert dev.stats().written_packets == 1, "a closed queue's counts stay in the total"
        r, w = os.pipe()
        os.write(w, b"not a packet")
        os.dup2(r, old_fd)  # the old number now names a pipe
        try:
            for op in (lambda: q.read(timeout=0), lambda: q.read_into(bytearray(64), 0),
                       lambda: q.read_batch(8), lambda: q.write(b"x"), lambda: q.writev([b"x"]),
                       lambda: q.write_batch([b"x"]), q.disable, q.enable,
                       lambda: q.wait_readable(0), lambda: q.flags):
                with pytest.raises(MqtunError) as exc:
                    op()
                assert exc.value.errno == errno.EBADF and "closed" in str(exc.value)
            assert os.read(old_fd, 100) == b"not a packet", "nothing read the reused fd"
        finally:
            for fd in {r, w, old_fd}:
                os.close(fd)


# ---- short reads (issue 11) ---------------------------------------------------------------------
@pytest.mark.parametrize("kwargs", [{"packet_info": True}, {"vnet_hdr": True},
                                    {"vnet_hdr": True, "packet_info": True}])
def test_a_read_shorter_than_the_headers_is_a_counted_explained_error(kwargs: dict[str, bool]
                                                                      ) -> None:
    """The kernel refuses (EINVAL) a read buffer shorter than the PI/virtio-net header, and the
    packet is gone: a read error with the reason, never a crash of the counters."""
    with _up(Device.create(**kwargs)) as dev:
        q = dev.queues[0]
        udp_flows(ADDR_B, [7])
        assert q.wait_readable(5)
        with pytest.raises(MqtunError, match="too small for the headers") as exc:
            q.read_into(bytearray(2), timeout=5)
        assert exc.value.errno == errno.EINVAL
        s = q.stats
        assert (s.read_packets, s.read_bytes, s.read_errors) == (0, 0, 1)
        assert q.read(timeout=0) is None, "the kernel consumed that packet"


def test_a_truncated_read_counts_what_it_got() -> None:
    with _up(Device.create()) as dev:
        q = dev.queues[0]
        udp_flows(ADDR_B, [7, 8])
        assert q.read_into(bytearray(2), timeout=5) == 2
        q.read_size = 3
        assert wait_for(lambda: q.read_batch(4, timeout=1)) and q.stats.read_packets == 2
        assert q.stats.read_bytes == 5


# ---- detached and deleted (issue 11) ------------------------------------------------------------
def test_a_disabled_queue_never_looks_like_a_deleted_device() -> None:
    with _up(Device.create("dd0", 2)) as dev:
        q, other = dev.queues
        q.disable()
        assert q.read(timeout=0) is None and q.read_batch(4) == []
        assert q.wait_readable(0.05) is False
        assert q.write(echo_request(ADDR_B, ADDR_A)) > 0, "a detached queue still injects"
        assert dev.name == "dd0"
        with pytest.raises(MqtunError, match="already"):
            q.disable()
        q.enable()
        with pytest.raises(MqtunError, match="already"):
            q.enable()
        q.disable()
        from mqtun import delete_link

        delete_link("dd0")
        for op in (lambda: q.read(timeout=0), lambda: q.read_batch(4),
                   lambda: other.read(timeout=1), lambda: q.wait_readable(1),
                   lambda: other.wait_readable(1), lambda: q.write(b"\x45" + bytes(19)),
                   lambda: other.write_batch([b"\x45" + bytes(19)]), q.enable, other.disable,
                   lambda: dev.name, lambda: dev.set_carrier(True)):
            with pytest.raises(DeviceGoneError):
                op()
        assert dev.known_name == "dd0"


# ---- EAGAIN: one rule for write, writev and write_batch (issue 11) -----------------------------
@pytest.fixture(params=[False], ids=["plain"])
def full_send_buffer(request: pytest.FixtureRequest,
                     ) -> Iterator[tuple[Device, bytes, Callable[[], None]]]:
    """A TAP whose frames are forwarded by a bridge to a port with a nearly stopped qdisc:
    the frames stay charged to the queue's socket, so a small send buffer fills (EAGAIN).
    Parametrized indirectly with True: the TAP has a virtio-net header."""
    import subprocess

    dev = Device.create("fb%d", tap=True, blocking=False, vnet_hdr=request.param)
    name = dev.name
    with IPRoute() as ipr:
        ipr.link("add", ifname="fbbr", kind="bridge")
        ipr.link("add", ifname="fbv0", kind="veth", peer="fbv1")
        br = ipr.link_lookup(ifname="fbbr")[0]
        for port in (name, "fbv0"):
            ipr.link("set", index=ipr.link_lookup(ifname=port)[0], master=br)
        for link in ("fbbr", "fbv0", "fbv1", name):
            ipr.link("set", index=ipr.link_lookup(ifname=link)[0], state="up")
    subprocess.run(["tc", "qdisc", "add", "dev", "fbv0", "root", "tbf", "rate", "8bit",
                    "burst", "1600", "limit", "1000000"], check=True, timeout=10)
    dev.set_sndbuf(4096)

    def unblock() -> None:
        subprocess.run(["tc", "qdisc", "del", "dev", "fbv0", "root"], check=False, timeout=10)

    frame = bytes.fromhex("020000000009" "020000000001" "88b5") + b"x" * 1000
    try:
        yield dev, frame, unblock
    finally:
        unblock()
        dev.close()


def _fill(q: Queue, frame: bytes) -> int:
    for n in range(1000):
        try:
            q.write(frame)
        except QueueFullError:
            return n
    raise AssertionError("the send buffer never filled")


def test_eagain_is_not_a_drop_and_does_not_recurse(
    full_send_buffer: tuple[Device, bytes, Callable[[], None]],
) -> None:
    dev, frame, unblock = full_send_buffer
    q = dev.queues[0]
    outcome: list[object] = []

    def fill() -> None:
        try:
            outcome.append(_fill(q, frame))
        except BaseException as exc:
            outcome.append(exc)

    t = threading.Thread(target=fill)
    t.start()
    t.join(timeout=5)
    if t.is_alive():  # the old recursion: let it finish before failing
        unblock()
        t.join(timeout=10)
        pytest.fail("a non-blocking write on a full send buffer waited instead of raising")
    written = outcome[0]
    assert isinstance(written, int) and written > 0, outcome
    with pytest.raises(QueueFullError) as exc:
        q.writev([frame[:14], frame[14:]])
    assert exc.value.errno == errno.EAGAIN and exc.value.written == 0
    assert "send buffer" in str(exc.value)
    with pytest.raises(QueueFullError) as bexc:
        q.write_batch([frame, frame])
    assert bexc.value.written == 0
    s = q.stats
    assert (s.written_packets, s.write_errors, s.dropped) == (written, 0, {}), s


@pytest.mark.parametrize("full_send_buffer", [True], ids=["vnet"], indirect=True)
def test_a_full_send_buffer_is_no_drop_for_the_offload_writers(
    full_send_buffer: tuple[Device, bytes, Callable[[], None]],
) -> None:
    """write_packet of a super-frame, and write_split, on a full send buffer: QueueFullError
    with how many were written, and not one of its wire packets counted as dropped."""
    from scapy.layers.inet import TCP
    from scapy.layers.l2 import Ether
    from scapy.packet import Raw

    from mqtun.offload import write_packet, write_split
    from mqtun.packet import ZERO_HEADER, coalesce

    dev, frame, _unblock = full_send_buffer
    q = dev.queues[0]
    for _ in range(1000):
        try:
            write_packet(q, ZERO_HEADER, frame)
        except QueueFullError:
            break
    else:
        pytest.fail("the send buffer never filled")
    segs = [bytes(Ether(src="02:00:00:00:00:01", dst="02:00:00:00:00:09")
                  / IP(src=ADDR_A, dst=ADDR_B, id=i, flags="DF")
                  / TCP(sport=4000, dport=5000, seq=1 + 1000 * i, flags="A")
                  / Raw(b"s" * 1000)) for i in range(3)]
    ((hdr, sp),) = coalesce(segs, tap=True)
    assert hdr.gso_type
    before = q.stats
    with pytest.raises(QueueFullError):
        write_packet(q, hdr, sp)
    with pytest.raises(QueueFullError) as exc:
        write_split(q, hdr, sp)
    assert exc.value.written == 0
    s = q.stats
    assert (s.dropped, s.write_errors, s.written_packets) == (
        {}, 0, before.written_packets), s


def test_a_worker_counts_what_a_full_send_buffer_refuses_as_queue_full(
    full_send_buffer: tuple[Device, bytes, Callable[[], None]],
) -> None:
    """A worker cannot keep a packet the kernel could not take (EAGAIN): it is dropped as
    `queue-full`, not as a generic write error (the kernel counts no rx_dropped for it)."""
    from mqtun.runtime.loop import IOLoop, LoopConfig, Route

    dev, frame, _unblock = full_send_buffer
    q = dev.queues[0]
    _fill(q, frame)
    before = q.stats.written_packets
    loop = IOLoop([Route(q, handler=lambda pkt: pkt)], LoopConfig(mode="epoll"))
    thread = threading.Thread(target=loop.run, daemon=True)
    thread.start()
    try:  # frames into the bridge's other port reach the TAP; its worker answers each one
        with socket.socket(socket.AF_PACKET, socket.SOCK_RAW) as raw:
            raw.bind(("fbv1", 0))
            broadcast = bytes.fromhex("ffffffffffff" "020000000007" "88b5") + b"q" * 100
            for _ in range(20):
                raw.send(broadcast)
        assert wait_for(lambda: q.stats.dropped.get("queue-full", 0) >= 20, timeout=5), (
            q.stats)
    finally:
        loop.stop()
        thread.join(5)
        loop.close()
    s = q.stats
    assert set(s.dropped) == {"queue-full"} and s.written_packets == before, s


def test_a_blocking_write_waits_for_room(
    full_send_buffer: tuple[Device, bytes, Callable[[], None]],
) -> None:
    dev, frame, unblock = full_send_buffer
    q = dev.queues[0]
    _fill(q, frame)
    q.timeout = None  # as a blocking device's queue
    threading.Timer(0.3, unblock).start()
    t0 = time.monotonic()
    assert q.write_batch([frame, frame]) == 2
    assert 0.2 < time.monotonic() - t0 < 10
    assert q.stats.dropped == {}
