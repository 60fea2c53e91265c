"""asyncio for queues: `await aq.recv()`, `await aq.send(pkt)`, `async for pkt in aq`.

Everything runs on the running event loop through `loop.add_reader`/`add_writer` on the
queue's (non-blocking) fd; no thread is involved. Reading is readiness-driven and bounded:
the fd is watched only while a coroutine waits in `recv()`, and one wake-up drains at most
`batch` packets into a buffer of at most `max_buffered` packets. Past that nothing is read,
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
import errno
import os
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING

from mqtun.errors import DeviceGoneError, InvalidArgumentError, MqtunError, kernel_error
from mqtun.packet.headers import Buffer
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

    def __init__(self, queue: Queue, *, max_buffered: int = 64, batch: int = 32) -> None:
        if not 1 <= batch <= max_buffered:
            raise InvalidArgumentError("need 1 <= batch <= max_buffered")
        self.queue = queue
        self.max_buffered = max_buffered
        self.batch = batch
        self._loop = asyncio.get_running_loop()
        self._fd = queue.fileno()
        self._buffer: collections.deque[bytes] = collections.deque()
        self._waiters: collections.deque[asyncio.Future[bytes]] = collections.deque()
        self._reading = False
        self._error: BaseException | None = None
        self._closed = False

    # ---- receiving --------------------------------------------------------------------------
    async def recv(self) -> bytes:
        """The next packet (with its PI/virtio-net header if the device has one)."""
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

    def _read_one(self) -> bytes | None:
        try:
            pkt = os.read(self._fd, self.queue.read_size)
        except BlockingIOError:
            return None
        except OSError as exc:
            raise self._read_failed(exc) from None
        s = self.queue.counters.slots
        s[READ_PACKETS] += 1
        s[READ_BYTES] += len(pkt) - self.queue.header_size
        return pkt

    def _on_readable(self) -> None:
        room = min(self.batch, self.max_buffered - len(self._buffer))
        got: list[bytes] = []
        size = self.queue.read_size
        try:
            while len(got) < room:
                try:
                    got.append(os.read(self._fd, size))
                except BlockingIOError:
                    break
        except OSError as exc:
            self._error = self._read_failed(exc)
        if got:
            s = self.queue.counters.slots
            s[READ_PACKETS] += len(got)
            s[READ_BYTES] += sum(map(len, got)) - self.queue.header_size * len(got)
        self._buffer.extend(got)
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
        if on and not self._reading and not self._closed:
            self._loop.add_reader(self._fd, self._on_readable)
            self._reading = True
        elif not on and self._reading:
            self._loop.remove_reader(self._fd)
            self._reading = False

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
        name = self.queue.device.name
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
        """Inject one packet (not copied). Waits only if the kernel says EAGAIN.

        A packet the kernel refuses is counted as a write error and a drop, then raised as
        MqtunError (as Queue.write does).
        """
        while True:
            if self._closed or self.queue.closed:
                raise MqtunError(errno.EBADF, "the async queue is closed", op="write")
            try:
                n = os.write(self._fd, packet)
            except BlockingIOError:
                await self._writable()
                continue
            except OSError as exc:
                c = self.queue.counters
                c.slots[WRITE_ERRORS] += 1
                c.drop(drop_reason(exc.errno))
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


def async_queues(device: Device, **kwargs: int) -> list[AsyncQueue]:
    """An AsyncQueue for each open queue of `device` (call inside a coroutine)."""
    return [AsyncQueue(q, **kwargs) for q in device.queues if not q.closed]
