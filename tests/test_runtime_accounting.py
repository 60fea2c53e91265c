"""Every packet read and not delivered is counted, at the seams: offload writes that fail part
way, a batch with one undecodable header, refused super-packets (one drop per wire packet),
counters that wrap past 2**64, a worker SIGKILLed in the middle of a batch."""

from __future__ import annotations

import contextlib
import fcntl
import socket
import struct

import pytest
from scapy.all import IP, TCP, Raw

import mqtun
from mqtun import _uapi
from mqtun.errors import MqtunError
from mqtun.offload import read_packets, write_coalesced, write_split
from mqtun.packet import MalformedPacket, VnetHeader, coalesce

LOCAL, PEER = "198.18.1.1", "198.18.1.2"


def _segments(n: int, sport: int = 1000) -> list[bytes]:
    """`n` in-order TCP segments of one flow (valid checksums): a super-packet's worth."""
    return [bytes(IP(src=LOCAL, dst=PEER, id=100 + i, flags="DF")
                  / TCP(sport=sport, dport=2000, seq=1000 + i * 100, flags="A")
                  / Raw(b"x" * 100)) for i in range(n)]


def test_write_split_tries_every_segment_and_counts_each_refusal() -> None:
    with mqtun.Device.create("acs%d") as dev:  # never brought up: every write gives EIO
        q = dev.queues[0]
        [(hdr, superpacket)] = coalesce(_segments(4))
        with pytest.raises(MqtunError) as err:
            write_split(q, hdr, superpacket)
        assert "down" in str(err.value)
        st = q.stats
        assert st.dropped == {"link-down": 4} and st.write_errors == 4
        # a super-packet that cannot be split: one OFFLOAD drop per wire packet it claims
        bogus = VnetHeader(gso_type=hdr.gso_type, hdr_len=40, gso_size=100)
        with pytest.raises(MalformedPacket):
            write_split(q, bogus, b"\x45" + b"\0" * 339)
        assert q.stats.dropped.get("offload") == 3


def test_a_refused_super_packet_counts_every_wire_packet_it_held() -> None:
    with mqtun.Device.create("acc%d", vnet_hdr=True) as dev:  # down: EIO
        q = dev.queues[0]
        packets = _segments(4, sport=1000) + _segments(3, sport=1001)
        assert len(coalesce(packets)) == 2
        with pytest.raises(MqtunError):
            write_coalesced(q, packets)
        assert q.stats.dropped == {"link-down": 7}  # both writes tried, 4 + 3 wire packets
        assert q.stats.write_errors == 2


def test_one_undecodable_header_does_not_lose_the_batch() -> None:
    with mqtun.Device.create("acr%d", vnet_hdr=True) as dev:
        dev.link.add_address(f"{LOCAL}/24")
        dev.link.up()
        with open(f"/proc/sys/net/ipv6/conf/{dev.name}/disable_ipv6", "w") as f:
            f.write("1")
        q = dev.queues[0]
        # the device object expects 64-byte headers, the kernel writes 10: a short packet's
        # read is shorter than the header it should start with
        dev.set_vnet_hdr_size(64)
        fcntl.ioctl(q.fd, _uapi.TUNSETVNETHDRSZ, struct.pack("i", 10))
        if dev.vnet_hdr_size != 64:
            pytest.skip("the device reads its header size from the kernel: no mismatch")
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            for payload in (b"a", b"b", b"c" * 40):
                s.sendto(payload, (PEER, 9))
        got = read_packets(q, 8, timeout=1.0)
        assert len(got) == 1  # the long one decodes (wrongly, but it decodes)
        st = q.stats
        assert st.read_packets == 3 and st.dropped == {"malformed": 2}


def _udp_echo(pkt: bytes) -> bytes | None:
    if len(pkt) < 28 or pkt[0] != 0x45 or pkt[9] != 17:
        return None
    return pkt[:12] + pkt[16:20] + pkt[12:16] + pkt[22:24] + pkt[20:22] + pkt[24:]


def test_counters_wrap_past_2_to_the_64() -> None:
    import threading

    from mqtun.runtime import IOLoop, LoopConfig, Route
    from mqtun.stats import READ_BYTES, READ_PACKETS, WRITTEN_PACKETS, Counters

    top = 2**64
    with mqtun.Device.create("acw%d") as dev:
        dev.link.add_address(f"{LOCAL}/24")
        dev.link.up()
        with open(f"/proc/sys/net/ipv6/conf/{dev.name}/disable_ipv6", "w") as f:
            f.write("1")
        q = dev.queues[0]
        for slot in (READ_PACKETS, READ_BYTES, WRITTEN_PACKETS):
            q.counters.slots[slot] = top - 2
        errors: list[BaseException] = []
        loop = IOLoop([Route(q, handler=_udp_echo)], LoopConfig(mode="epoll", batch=1))

        def run() -> None:
            try:
                loop.run()
            except BaseException as exc:
                errors.append(exc)

        t = threading.Thread(target=run, daemon=True)
        t.start()
        try:
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
                s.bind((LOCAL, 0))
                s.settimeout(1.0)
                for i in range(5):
                    s.sendto(b"w%d" % i, (PEER, 7))
                    assert s.recv(100) == b"w%d" % i
        finally:
            loop.stop()
            t.join(5)
            loop.close()
        assert not errors and not t.is_alive()
        st = q.stats
        assert st.read_packets == 3 and st.written_packets == 3  # (2**64 - 2 + 5) mod 2**64
        assert st.read_bytes == (top - 2 + 5 * 30) % top
        c = Counters()
        c.drop(mqtun.DropReason.FILTERED, top - 1)
        c.drop(mqtun.DropReason.FILTERED, 2)
        assert c.snapshot().dropped == {"filtered": 1}


def _stalling(info: object):  # type: ignore[no-untyped-def]
    import time

    def handler(pkt: bytes) -> bytes | None:
        if pkt.endswith(b"stall"):
            time.sleep(60)  # killed here
        return _udp_echo(pkt)

    return handler


def test_a_sigkilled_worker_loses_the_counts_of_at_most_one_batch() -> None:
    import os
    import signal
    import time

    from mqtun.runtime import LoopConfig, WorkerPool

    batch = 4
    with mqtun.Device.create("ack%d") as dev:
        dev.link.add_address(f"{LOCAL}/24")
        dev.link.up()
        with open(f"/proc/sys/net/ipv6/conf/{dev.name}/disable_ipv6", "w") as f:
            f.write("1")
        pool = WorkerPool.serve(dev, make_handler=_stalling,
                                loop=LoopConfig(mode="epoll", batch=batch))
        pool.start()
        try:
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
                s.bind((LOCAL, 0))
                s.settimeout(2.0)
                for word in (b"a", b"b", b"c", b"stall", b"d", b"e"):
                    s.sendto(word, (PEER, 7))
                for word in (b"a", b"b", b"c"):
                    assert s.recv(100) == word
                time.sleep(0.1)  # the worker sits in the handler, mid-batch
                os.kill(pool.workers[0].pid, signal.SIGKILL)
                deadline = time.monotonic() + 5
                while (time.monotonic() < deadline
                       and "restarted" not in {e.kind for e in pool.poll(0.05)}):
                    pass
                for i in range(5):
                    s.sendto(b"after%d" % i, (PEER, 7))
                got = set()
                with contextlib.suppress(TimeoutError):
                    while not {b"after%d" % i for i in range(5)} <= got:
                        got.add(s.recv(100))  # (d and e too, if still queued at the kill)
                assert {b"after%d" % i for i in range(5)} <= got
            time.sleep(0.2)
            kernel = dev.link.stats()["tx_packets"]  # every packet userspace read
            counted = dev.queues[0].stats.read_packets
            assert 1 <= kernel - counted <= batch  # the stalled batch, never more
        finally:
            pool.stop()
