"""asyncio on queues: recv/send/async-for on the running loop, bounded buffering, clean close."""

from __future__ import annotations

import asyncio
import errno
import socket

import pytest

import mqtun
from mqtun.errors import MqtunError
from mqtun.runtime.aio import AsyncQueue, async_queues

LOCAL, PEER = "198.18.1.1", "198.18.1.2"


def udp_echo(pkt: bytes) -> bytes:
    ihl = (pkt[0] & 15) * 4
    return (pkt[:12] + pkt[16:20] + pkt[12:16] + pkt[20:ihl]
            + pkt[ihl + 2:ihl + 4] + pkt[ihl:ihl + 2] + pkt[ihl + 4:])


def _is_udp(pkt: bytes) -> bool:
    return len(pkt) >= 28 and pkt[0] == 0x45 and pkt[9] == 17


@pytest.fixture
def dev():
    d = mqtun.Device.create("aio%d", 2)
    d.link.add_address(f"{LOCAL}/24")
    d.link.up()
    # the kernel's own IPv6 chatter would interleave with the test's packets
    with open(f"/proc/sys/net/ipv6/conf/{d.name}/disable_ipv6", "w") as f:
        f.write("1")
    yield d
    d.close()


def _sock() -> socket.socket:
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind((LOCAL, 0))
    s.setblocking(False)
    return s


def test_recv_send_and_async_for(dev) -> None:
    async def main() -> None:
        loop = asyncio.get_running_loop()
        s = _sock()
        try:
            aqs = async_queues(dev)
            assert len(aqs) == 2

            async def echo(aq: AsyncQueue, n: int) -> int:
                done = 0
                async for pkt in aq:
                    if _is_udp(pkt):
                        await aq.send(udp_echo(pkt))
                        done += 1
                        if done == n:
                            return done
                return done

            # one flow lands on one queue: serve both, count the answers
            servers = [asyncio.create_task(echo(aq, 50)) for aq in aqs]
            for i in range(50):
                await loop.sock_sendto(s, b"msg%d" % i, (PEER, 7))
                data = await asyncio.wait_for(loop.sock_recv(s, 100), 2)
                assert data == b"msg%d" % i
            for aq in aqs:
                aq.close()  # ends the `async for` of the queue that saw no traffic
            counts = await asyncio.wait_for(asyncio.gather(*servers), 2)
            assert sorted(counts) == [0, 50]
        finally:
            s.close()

    asyncio.run(main())
    st = dev.stats()
    assert st.written_packets == 50
    assert st.read_packets == dev.link.stats()["tx_packets"]


def test_backpressure_bounds_buffering(dev) -> None:
    sent = 300

    async def main() -> None:
        loop = asyncio.get_running_loop()
        s = _sock()
        try:
            aqs = [AsyncQueue(q, max_buffered=16, batch=8) for q in dev.queues]
            for i in range(sent):
                await loop.sock_sendto(s, b"%d" % i, (PEER, 7))
            first = await asyncio.wait_for(_first_of(aqs), 2)
            assert _is_udp(first)
            # one wake-up read at most `batch` packets, never more than max_buffered
            assert all(aq.buffered <= 16 for aq in aqs)
            assert sum(q.stats.read_packets for q in dev.queues) <= 1 + 8
            got = 1
            while got < sent:
                for aq in aqs:
                    while True:
                        pkt = aq.recv_nowait()
                        if pkt is None:
                            break
                        assert aq.buffered <= 16
                        got += 1
                await asyncio.sleep(0)
            assert got == sent
            assert all(aq.recv_nowait() is None for aq in aqs)
            for aq in aqs:
                aq.close()
        finally:
            s.close()

    asyncio.run(main())
    assert dev.link.stats()["tx_dropped"] == 0  # the ring (500) held what we did not read


async def _first_of(aqs: list[AsyncQueue]) -> bytes:
    tasks = [asyncio.create_task(aq.recv()) for aq in aqs]
    done, pending = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    for t in pending:
        t.cancel()
    await asyncio.gather(*pending, return_exceptions=True)
    return next(iter(done)).result()


def test_close_wakes_waiters_and_refused_send_raises(dev) -> None:
    async def main() -> None:
        aq = AsyncQueue(dev.queues[0])
        waiter = asyncio.create_task(aq.recv())
        await asyncio.sleep(0.05)
        assert not waiter.done()
        aq.close()
        with pytest.raises(MqtunError):
            await asyncio.wait_for(waiter, 1)
        aq2 = AsyncQueue(dev.queues[1])
        with pytest.raises(MqtunError):
            await aq2.send(b"\x00\x01\x02")  # not an IP packet: judged before the kernel
        assert dev.queues[1].stats.dropped.get("bad-result") == 1
        raw = AsyncQueue(dev.queues[1], raw=True)
        with pytest.raises(MqtunError):
            await raw.send(b"\x00\x01\x02")  # as given: the kernel refuses it (EINVAL)
        assert dev.queues[1].stats.dropped.get("refused") == 1
        raw.close()
        aq2.close()
        with pytest.raises(MqtunError):
            await aq2.recv()

    asyncio.run(main())


def test_device_deleted_fails_the_waiter(dev) -> None:
    import subprocess

    async def main() -> None:
        aq = AsyncQueue(dev.queues[0])
        waiter = asyncio.create_task(aq.recv())
        await asyncio.sleep(0.05)
        await asyncio.to_thread(subprocess.run, ["ip", "link", "del", dev.name], check=True)
        with pytest.raises(mqtun.DeviceGoneError):
            await asyncio.wait_for(waiter, 2)

    asyncio.run(main())


def test_a_recv_cancelled_as_its_packet_arrives_keeps_the_packet() -> None:
    d = mqtun.Device.create("aic%d", 1)
    d.link.add_address(f"{LOCAL}/24")
    d.link.up()
    with open(f"/proc/sys/net/ipv6/conf/{d.name}/disable_ipv6", "w") as f:
        f.write("1")

    async def main() -> None:
        loop = asyncio.get_running_loop()
        aq = AsyncQueue(d.queues[0])
        s = _sock()
        try:
            for i in range(5):
                waiter = asyncio.create_task(aq.recv())
                await asyncio.sleep(0)  # the waiter runs: nothing queued, it waits
                s.sendto(b"pkt%d" % i, (PEER, 7))  # queued on the tun ring at once
                await asyncio.sleep(0)  # we run first in the iteration that sees the fd ready,
                loop.call_soon(waiter.cancel)  # so this runs after the packet was handed over
                with pytest.raises(asyncio.CancelledError):
                    await waiter  # (a wait_for timeout firing in that same iteration)
                pkt = await asyncio.wait_for(aq.recv(), 2)
                assert _is_udp(pkt) and pkt.endswith(b"pkt%d" % i)
            st = d.queues[0].stats
            assert st.read_packets == 5 and aq.buffered == 0
        finally:
            s.close()
            aq.close()

    try:
        asyncio.run(main())
    finally:
        d.close()


def test_a_queue_closed_under_a_waiting_recv_fails_it(dev) -> None:
    """Closing the Queue itself (not the AsyncQueue) wakes every recv() waiting on it with
    EBADF: its fd would only leave the event loop's epoll set, and the waiters wait forever.
    Two AsyncQueues of one Queue are both woken."""
    async def main() -> None:
        q = dev.queues[0]
        first, second = AsyncQueue(q), AsyncQueue(q)
        waiters = [asyncio.create_task(first.recv()), asyncio.create_task(second.recv())]
        await asyncio.sleep(0.05)
        assert not any(w.done() for w in waiters)
        q.close()
        for w in waiters:
            with pytest.raises(MqtunError, match="closed") as err:
                await asyncio.wait_for(w, 2)
            assert err.value.errno == errno.EBADF
        with pytest.raises(MqtunError):
            await first.recv()
        first.close()
        second.close()

    asyncio.run(main())
