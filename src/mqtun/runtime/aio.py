"""asyncio for queues: `await aq.recv()`, `await aq.send(pkt)`, `async for pkt in aq`,
`await aq.recv_batch()`, `await aq.send_batch(pkts)`.

Packets are wire packets, as a handler sees them (`mqtun.runtime.path`): no PI or virtio-net
header, super-packets split, checksums complete, within the MTU; what is sent is converted
for the device and, in `send_batch`, coalesced into TSO/USO super-packets where the device
takes them. `raw=True` gives the bytes the fd reads and writes them as given (headers and all).

Everything runs on the running event loop through `loop.add_reader`/`add_writer` on the
queue's (non-blocking) fd; no thread is involved. Reading is readiness-driven and bounded:
the fd is watched only while a coroutine waits in `recv()`, and one wake-up drains at most
`batch` reads into a buffer of at most `max_buffered` packets (a super-packet split may pass
that bound by its own segments, once). Past that nothing is read,
so a slow consumer leaves packets in the kernel's ring, which drops what overflows
(`tx_dropped`) -- backpressure the way the kernel does it, never unbounded buffering here.
`send()` writes at once; if the kernel ever says EAGAIN it waits for writability instead of
queueing. Counters are the queue's own (exact, like Queue.read/write).

A `recv()` cancelled after its packet was handed to it but before it resumed (a `wait_for`
timeout in the same loop iteration) puts the packet back at the head of the buffer, as
asyncio.Queue keeps an item its cancelled getter never took: a packet read is delivered or
counted, never lost. A deleted device fails every waiter with DeviceGoneError; a detached
queue is only a quiet one.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import contextlib
import errno
import os
from collections.abc import AsyncIterator, Iterable
from typing import TYPE_CHECKING, Any

from mqtun.errors import DeviceGoneError, InvalidArgumentError, MqtunError, kernel_error
from mqtun.packet.headers import Buffer
from mqtun.queue import read_drain
from mqtun.runtime.path import Layout, Packet, PacketPath
from mqtun.stats import (
    READ_BYTES,
    READ_ERRORS,
    READ_PACKETS,
    WRITE_ERRORS,
    WRITTEN_BYTES,
    WRITTEN_PACKETS,
    drop_reason,
)

if TYPE_CHECKING:
    from mqtun.device import Device
    from mqtun.queue import Queue

__all__ = ["AsyncQueue", "async_queues"]


class AsyncQueue:
    """An asyncio face of one Queue. Create it inside a coroutine (it binds the running loop)."""

    def __init__(self, queue: Queue, *, max_buffered: int = 64, batch: int = 32,
                 raw: bool = False, coalesce: bool = True,
                 layout: Layout | None = None) -> None:
        if not 1 <= batch <= max_buffered:
            raise InvalidArgumentError("need 1 <= batch <= max_buffered")
        from mqtun.runtime.loop import QueueCounter, layout_of

        self.queue = queue
        self.raw = raw
        if layout is None:  # netlink (pyroute2) cannot run inside a running event loop
            with concurrent.futures.ThreadPoolExecutor(1) as pool:
                layout = pool.submit(layout_of, queue.device).result()
        self.path: PacketPath = PacketPath(layout, counter=QueueCounter(queue),
                                           coalesce=coalesce, views=False)
        self.max_buffered = max_buffered
        self.batch = batch
        self._loop = asyncio.get_running_loop()
        self._fd = queue.fileno()
        self._buffer: collections.deque[bytes] = collections.deque()
        self._waiters: collections.deque[asyncio.Future[bytes]] = collections.deque()
        self._reading = False
        self._error: BaseException | None = None
        self._closed = False
        self._close_watch = contextlib.ExitStack()  # entered while the fd is watched

    # ---- receiving --------------------------------------------------------------------------
    async def recv(self) -> bytes:
        """The next wire packet (raw: the bytes read, with PI/virtio-net header if any)."""
        if self._buffer:
            return self._buffer.popleft()
        self._check()
        pkt = self._read_one()
        if pkt is not None:
            return pkt
        fut: asyncio.Future[bytes] = self._loop.create_future()
        self._waiters.append(fut)
        self._watch(True)
        try:
            return await fut
        except asyncio.CancelledError:
            if fut.done() and not fut.cancelled() and fut.exception() is None:
                self._buffer.appendleft(fut.result())  # handed over, never taken: keep it
                self._hand_out()
            raise
        finally:
            if not self._waiters or all(w.done() for w in self._waiters):
                self._waiters.clear()
                self._watch(False)

    def recv_nowait(self) -> bytes | None:
        """A packet if one is buffered or queued in the kernel, else None."""
        if self._buffer:
            return self._buffer.popleft()
        self._check()
        return self._read_one()

    def __aiter__(self) -> AsyncIterator[bytes]:
        return self

    async def __anext__(self) -> bytes:
        if self._closed:
            raise StopAsyncIteration
        try:
            return await self.recv()
        except DeviceGoneError:
            raise
        except MqtunError as exc:
            if self._closed or exc.errno == errno.EBADF:
                raise StopAsyncIteration from None
            raise

    @property
    def buffered(self) -> int:
        """Packets read from the kernel and not yet handed out (<= max_buffered)."""
        return len(self._buffer)

    async def recv_batch(self, max_packets: int | None = None) -> list[bytes]:
        """Wait for at least one packet, then return every packet buffered or queued in the
        kernel, up to `max_packets` (default: `batch`) -- one drain, for vectorized work."""
        limit = max_packets or self.batch
        out = [await self.recv()]
        while len(out) < limit:
            pkt = self.recv_nowait()
            if pkt is None:
                break
            out.append(pkt)
        return out

    def _read_one(self) -> bytes | None:
        """Read until one packet is buffered or the kernel has none; hand out the first."""
        while not self._buffer:
            try:
                buf = os.read(self._fd, self.queue.read_size)
            except BlockingIOError:
                return None
            except OSError as exc:
                raise self._read_failed(exc) from None
            s = self.queue.counters.slots
            s[READ_PACKETS] += 1
            s[READ_BYTES] += len(buf) - self.queue.header_size
            self._take([buf])
        return self._buffer.popleft()

    def _take(self, bufs: list[bytes]) -> None:
        """Put what a drain read into the buffer: as read (raw) or as wire packets."""
        if self.raw:
            self._buffer.extend(bufs)
            if bufs:
                self.queue.counters.wire_read(len(bufs))
            return
        wire: list[Buffer] = []
        for b in bufs:
            self.path.decode(b, wire)
        self._buffer.extend(wire)  # type: ignore[arg-type]  # views=False: bytes

    def _on_readable(self) -> None:
        room = min(self.batch, self.max_buffered - len(self._buffer))
        got, nbytes, failed = read_drain(self._fd, self.queue.read_size, room)
        if failed:
            self._error = self._read_failed(OSError(failed, os.strerror(failed)))
        if got:
            s = self.queue.counters.slots
            s[READ_PACKETS] += len(got)
            s[READ_BYTES] += nbytes - self.queue.header_size * len(got)
        self._take(got)
        self._hand_out()
        if self._error is not None:
            self._fail_waiters(self._error)
        if not any(not w.done() for w in self._waiters) or len(self._buffer) >= self.max_buffered:
            self._watch(False)

    def _hand_out(self) -> None:
        """Give buffered packets to the waiters, oldest first."""
        while self._waiters and self._buffer:
            fut = self._waiters.popleft()
            if not fut.done():
                fut.set_result(self._buffer.popleft())

    def _watch(self, on: bool) -> None:
        """Watch the fd while somebody waits, and the queue's close watch beside it: a Queue
        closed under a waiting recv() fails it with EBADF (its fd would only leave the
        event loop's epoll, and the waiter wait on)."""
        if on and not self._reading and not self._closed:
            watch = self._close_watch
            fd, shared = watch.enter_context(self.queue.close_watch("read"))
            closed_fd = os.dup(shared)  # its own number: one reader per fd in an event loop
            watch.callback(os.close, closed_fd)
            self._loop.add_reader(closed_fd, self._on_queue_closed)
            watch.callback(self._loop.remove_reader, closed_fd)
            self._loop.add_reader(fd, self._on_readable)
            self._reading = True
        elif not on and self._reading:
            self._loop.remove_reader(self._fd)
            self._reading = False
            self._close_watch.close()

    def _on_queue_closed(self) -> None:
        self._fail_waiters(self._failure(OSError(errno.EBADF, "closed"), "read"))

    def _fail_waiters(self, exc: BaseException) -> None:
        while self._waiters:
            fut = self._waiters.popleft()
            if not fut.done():
                fut.set_exception(exc)
        self._watch(False)

    def _read_failed(self, exc: OSError) -> MqtunError:
        self.queue.counters.slots[READ_ERRORS] += 1
        return self._failure(exc, "read")

    def _failure(self, exc: OSError, op: str) -> MqtunError:
        """A deleted device: DeviceGoneError (kernel_error decides); a closed queue: EBADF."""
        name = self.queue.device.known_name
        if exc.errno == errno.EBADF or self.queue.closed:
            return MqtunError(errno.EBADF, f"the queue of {name} is closed", device=name, op=op)
        return kernel_error(exc, op, name)

    def _check(self) -> None:
        if self._error is not None:
            raise self._error
        if self._closed or self.queue.closed:
            raise MqtunError(errno.EBADF, "the async queue is closed", op="read")

    # ---- sending ----------------------------------------------------------------------------
    async def send(self, packet: Buffer) -> int:
        """Inject one wire packet (raw: the bytes as given). Waits only if the kernel says
        EAGAIN. Returns the bytes written (headers included).

        A packet the kernel refuses is counted as a write error and a drop, then raised as
        MqtunError (as Queue.write does); one that is not a packet of the device's kind is
        a BAD_RESULT drop and InvalidArgumentError.
        """
        if self.raw:
            n = await self._write((packet,))
            self.queue.counters.wire_written(1)
            return n
        return sum(await self._send_items([packet]))

    async def send_batch(self, packets: Iterable[Buffer]) -> int:
        """Inject wire packets, coalesced into TSO/USO super-packets where the device takes
        them (datagram boundaries and order kept). Returns how many wire packets were
        written. Every write is tried; the first refusal is raised after the others."""
        if self.raw:
            count = 0
            for p in packets:
                await self.send(p)
                count += 1
            return count
        return len(await self._send_items(list(packets)))

    async def _send_items(self, packets: list[Buffer]) -> list[int]:
        path = self.path
        accepted: list[Packet] = []
        for p in packets:
            if not path.accept(p, accepted):
                raise InvalidArgumentError(
                    f"not a packet for {self.queue.device.name}: {bytes(p)[:16]!r}...")
        written: list[int] = []
        first: MqtunError | None = None
        for item in path.encode(accepted):
            try:
                written.append(await self._write(item.parts, item.packets))
            except MqtunError as exc:
                if exc.errno == errno.EBADF or isinstance(exc, DeviceGoneError):
                    raise
                first = first or exc
                continue
            path.sent(item)
            written.extend([0] * (item.packets - 1))  # one entry per wire packet
        if first is not None:
            raise first
        return written

    async def _write(self, parts: tuple[Buffer, ...] | list[Buffer], packets: int = 1) -> int:
        """One writev of `parts`, counted; waits on EAGAIN."""
        while True:
            if self._closed or self.queue.closed:
                raise MqtunError(errno.EBADF, "the async queue is closed", op="write")
            try:
                n = os.writev(self._fd, parts)
            except BlockingIOError:
                await self._writable()
                continue
            except OSError as exc:
                c = self.queue.counters
                c.slots[WRITE_ERRORS] += 1
                c.drop(drop_reason(exc.errno), packets)
                raise self._failure(exc, "write") from None
            s = self.queue.counters.slots
            s[WRITTEN_PACKETS] += 1
            s[WRITTEN_BYTES] += n - self.queue.header_size
            return n

    async def _writable(self) -> None:
        fut: asyncio.Future[None] = self._loop.create_future()

        def ready() -> None:
            if not fut.done():
                fut.set_result(None)

        self._loop.add_writer(self._fd, ready)
        try:
            await fut
        finally:
            self._loop.remove_writer(self._fd)

    # ---- lifecycle --------------------------------------------------------------------------
    def close(self) -> None:
        """Stop watching the fd and wake every waiter (the Queue itself stays open)."""
        if self._closed:
            return
        self._closed = True
        self._watch(False)
        self._fail_waiters(MqtunError(errno.EBADF, "the async queue was closed", op="read"))

    async def __aenter__(self) -> AsyncQueue:
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<AsyncQueue {self.queue!r} buffered={len(self._buffer)}>"


def async_queues(device: Device, **kwargs: Any) -> list[AsyncQueue]:
    """An AsyncQueue for each open queue of `device` (call inside a coroutine)."""
    return [AsyncQueue(q, **kwargs) for q in device.queues if not q.closed]
