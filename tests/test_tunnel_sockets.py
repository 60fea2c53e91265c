"""runtime.sockets: GSO send runs (pure), and a real UDP GSO send / GRO read on loopback in
the test's namespace: what one sendmsg sends is what the reads give back, datagram by datagram."""

from __future__ import annotations

import select
import socket
import subprocess

import pytest

from mqtun.errors import MqtunError
from mqtun.packet import vxlan
from mqtun.runtime.sockets import SourcePorts, UdpEndpoint, gso_runs, path_mtu, reuseport_group


def test_gso_runs() -> None:
    assert gso_runs([100] * 5) == [(0, 5, 100)]
    assert gso_runs([100, 100, 50, 100]) == [(0, 3, 100), (3, 1, 100)]
    assert gso_runs([50, 100]) == [(0, 1, 50), (1, 1, 100)]
    assert gso_runs([1466] * 50) == [(0, 44, 1466), (44, 6, 1466)]  # 65507 bytes at most
    assert gso_runs([10] * 70) == [(0, 64, 10), (64, 6, 10)]
    assert gso_runs([]) == []


@pytest.mark.parametrize("family", ["ipv4", "ipv6"])
def test_gso_send_gro_receive(family: str) -> None:
    subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
    addr = "127.0.0.1" if family == "ipv4" else "::1"
    group = reuseport_group(addr, 4789, 2)
    sender = UdpEndpoint.bind(addr, 0, reuseport=False, gro=False)
    try:
        frames = [bytes([i]) * 1000 for i in range(9)] + [b"\xee" * 300]
        hdr = vxlan.header(7)
        dest = (addr, 4789) if family == "ipv4" else (addr, 4789, 0, 0)
        sent, err = sender.send(dest, [(hdr, f) for f in frames], [8 + len(f) for f in frames])
        assert (sent, err) == (10, 0)
        got: list[bytes] = []
        for _ in range(50):
            ready, _, _ = select.select([ep.sock for ep in group], [], [], 0.2)
            for ep in group:
                if ep.sock in ready:
                    while (r := ep.recv()) is not None:
                        data, seg, source = r
                        assert source[1] == sender.port
                        got += [bytes(d) for d in vxlan.datagrams(memoryview(data), seg)]
            if len(got) >= 10:
                break
        assert got == [hdr + f for f in frames]
    finally:
        for ep in (*group, sender):
            ep.close()


def test_source_ports_and_errors() -> None:
    subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
    main = UdpEndpoint.bind("127.0.0.1", 4789)
    taken = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    taken.bind(("127.0.0.1", 40001))  # not in a reuseport group
    try:
        ports = SourcePorts("127.0.0.1", main, limit=2)
        assert ports.get(40000).port == 40000
        assert ports.get(40001) is main  # taken: the endpoint's own port instead
        for p in range(40002, 40006):
            assert ports.get(p).port == p  # beyond the limit the cache starts over
        ports.close(keep_fallback=True)
        with pytest.raises(MqtunError, match="taken"):
            UdpEndpoint.bind("127.0.0.1", 40001)
        with pytest.raises(MqtunError, match="not an address"):
            UdpEndpoint.bind("198.18.99.1", 4789)
        subprocess.run(["ip", "link", "set", "lo", "mtu", "9000"], check=True)
        assert path_mtu("127.0.0.1", "127.0.0.1", 4789) == 9000
        with pytest.raises(MqtunError, match="no route"):
            path_mtu("127.0.0.1", "198.18.99.1", 4789)
    finally:
        taken.close()
        main.close()


def test_receive_buffer_overflows_are_counted() -> None:
    """A socket nobody reads with a tiny receive buffer: what does not fit is dropped by the
    kernel, and the next datagram queued after the drops says how many (SO_RXQ_OVFL)."""
    subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
    receiver = UdpEndpoint.bind("127.0.0.1", 4789, gro=False)
    receiver.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1)  # the kernel's minimum
    sender = UdpEndpoint.bind("127.0.0.1", 0, reuseport=False, gro=False)
    try:
        sent = 200
        for i in range(sent):
            sender.sock.sendto(b"%d" % i, ("127.0.0.1", 4789))
        got = 0
        while receiver.recv() is not None:
            got += 1
        assert 0 < got < sent  # some fitted, the rest were dropped
        assert receiver.overflows == 0  # queued before any drop: nothing to say yet
        sender.sock.sendto(b"after", ("127.0.0.1", 4789))
        r = receiver.recv()
        assert r is not None and r[0] == b"after"
        assert receiver.overflows == sent - got
    finally:
        receiver.close()
        sender.close()


def test_a_queue_closed_under_a_sleeping_socket_loop_ends_it() -> None:
    """The tunnel's loop waits as the forward loop does (`serve_ready`, the queue's close
    watch in its epoll): a queue closed while it sleeps ends it with EBADF at once (it used to
    notice on its next one-second tick), after it has served traffic."""
    import errno
    import threading
    import time

    from mqtun import Device
    from mqtun.apps.tunnel import VxlanCodec
    from mqtun.runtime.sockets import SocketLoop, SocketRoute

    subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
    dev = Device.create("sl%d", tap=True, vnet_hdr=True, offloads=0)
    dev.link.up()
    q = dev.queues[0]
    endpoint = UdpEndpoint.bind("127.0.0.1", 4789)
    loop = SocketLoop(SocketRoute(q, endpoint, "127.0.0.1", 4790, VxlanCodec(7),
                                  max_frame=1450, mtu=1400))
    errors: list[BaseException] = []

    def serve() -> None:
        try:
            loop.run()
        except BaseException as exc:  # handed to the test
            errors.append(exc)

    thread = threading.Thread(target=serve, daemon=True)
    peer = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        peer.bind(("127.0.0.1", 4790))
        thread.start()
        frame = b"\x02" * 6 + b"\x04" * 6 + b"\x08\x00" + bytes(46)  # to the TAP's queue
        peer.sendto(vxlan.encapsulate(frame, 7), ("127.0.0.1", 4789))
        deadline = time.monotonic() + 2
        while q.counters.snapshot().written_packets < 1 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert q.counters.snapshot().written_packets == 1  # served: decapsulated, written
        time.sleep(0.2)  # past any spin: asleep
        closed_at = time.monotonic()
        q.close()
        thread.join(2)
        assert not thread.is_alive()
        assert time.monotonic() - closed_at < 0.5
        assert len(errors) == 1 and isinstance(errors[0], MqtunError)
        assert errors[0].errno == errno.EBADF and "closed" in str(errors[0])
    finally:
        loop.stop()
        thread.join(2)
        loop.close()
        peer.close()
        endpoint.close()
        dev.close()
