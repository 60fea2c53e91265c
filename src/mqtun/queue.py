"""Queue: one file descriptor of a tun/tap device, and the packets that move through it.

Each read returns exactly one packet and each write injects exactly one (the kernel's rule).
The fd is always non-blocking underneath; a "blocking" read waits in poll(2) so that a timeout,
a close from another thread and the deletion of the device all wake it. Counters are kept per
queue (the kernel keeps none) in a `Counters` buffer that the runtime may place in shared memory.
"""

from __future__ import annotations

import enum
import errno
import fcntl
import os
import select
import struct
import threading
import time
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING

from mqtun import _uapi
from mqtun.errors import DeviceGoneError, MqtunError, kernel_error
from mqtun.stats import (
    DROP_FOR_ERRNO,
    READ_BYTES,
    READ_ERRORS,
    READ_PACKETS,
    WRITE_ERRORS,
    WRITTEN_BYTES,
    WRITTEN_PACKETS,
    Counters,
    DropReason,
    QueueStats,
)

if TYPE_CHECKING:
    from mqtun.device import Device

__all__ = ["BytesLike", "Queue"]

# What a packet may be: anything os.write takes without a copy (collections.abc.BytesLike is 3.12+).
BytesLike = bytes | bytearray | memoryview

# Largest packet a queue may hand over: a 64 KiB super-packet plus the biggest headers.
DEFAULT_READ_SIZE = 65536 + _uapi.VIRTIO_NET_HDR_V1_HASH_TUNNEL_SIZE + _uapi.TUN_PI_SIZE + 64

_WRITE_DROP_REASON = DROP_FOR_ERRNO  # the one errno -> DropReason map (mqtun.stats)


class _Default(enum.Enum):
    DEFAULT = 0


DEFAULT = _Default.DEFAULT  # "use the queue's own timeout"
_POLL_IN = select.POLLIN | select.POLLERR | select.POLLHUP | select.POLLNVAL
_POLL_OUT = select.POLLOUT | select.POLLERR | select.POLLHUP | select.POLLNVAL


class Queue:
    """One queue of a device. Usable with select/poll/epoll/asyncio through `fileno()`."""

    def __init__(self, device: Device, fd: int, counters: Counters | None = None) -> None:
        self.device = device
        self.fd = fd
        self.counters = counters if counters is not None else Counters()
        self.header_size = device.header_size  # PI + virtio-net header bytes before each packet
        self.read_size = DEFAULT_READ_SIZE
        self.timeout: float | None = None if device.blocking else 0.0
        self._enabled = True
        self._closed = False
        self._lock = threading.Lock()
        self._wake_r = -1
        self._wake_w = -1
        self._waiters = 0

    # ---- identity ---------------------------------------------------------------------------
    def fileno(self) -> int:
        """The queue's fd (non-blocking), for select/poll/epoll/asyncio."""
        if self._closed:
            raise ValueError("I/O on a closed queue")
        return self.fd

    @property
    def index(self) -> int | None:
        """This queue's current kernel index (None while disabled or closed).

        The kernel renumbers on detach and close: the last active queue moves into the freed
        slot. The device tracks that for every queue it opened.
        """
        return self.device._index_of(self)

    @property
    def enabled(self) -> bool:
        return self._enabled and not self._closed

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def stats(self) -> QueueStats:
        """A snapshot of this queue's counters."""
        return self.counters.snapshot()

    # ---- reading ----------------------------------------------------------------------------
    def read(self, timeout: float | _Default | None = DEFAULT) -> bytes | None:
        """Read one packet (with its PI/virtio-net header if the device has one).

        `timeout` in seconds: None waits forever, 0 never waits. Default: the device's
        `blocking` choice. Returns None when nothing arrived in time.
        """
        wait = self.timeout if isinstance(timeout, _Default) else timeout
        deadline = None if wait is None else time.monotonic() + wait
        while True:
            try:
                data = os.read(self.fd, self.read_size)
            except BlockingIOError:
                if wait == 0 or not self._wait(_POLL_IN, deadline):
                    return None
                continue
            except OSError as exc:
                raise self._read_failed(exc) from None
            c = self.counters.slots
            c[READ_PACKETS] += 1
            c[READ_BYTES] += len(data) - self.header_size
            return data

    def read_into(self, buffer: BytesLike, timeout: float | _Default | None = DEFAULT) -> int:
        """Read one packet into `buffer`; return its length (0 when nothing arrived in time).

        A buffer shorter than the packet truncates it silently (the kernel's rule).
        """
        wait = self.timeout if isinstance(timeout, _Default) else timeout
        deadline = None if wait is None else time.monotonic() + wait
        while True:
            try:
                n = os.readv(self.fd, [buffer])
            except BlockingIOError:
                if wait == 0 or not self._wait(_POLL_IN, deadline):
                    return 0
                continue
            except OSError as exc:
                raise self._read_failed(exc) from None
            c = self.counters.slots
            c[READ_PACKETS] += 1
            c[READ_BYTES] += n - self.header_size
            return n

    def wait_readable(self, timeout: float | None = None) -> bool:
        """Wait until a packet can be read (True) or `timeout` seconds pass (False).

        For callers that read the fd their own way (mqtun.compat reads a blocking fd, as
        python-pytun did): a close() from another thread wakes the wait with EBADF.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        return self._wait(_POLL_IN, deadline)

    def read_batch(
        self, max_packets: int = 64, timeout: float | _Default | None = 0.0
    ) -> list[bytes]:
        """Drain up to `max_packets` packets in one call (waits only for the first one).

        By default it does not wait at all: an empty list means nothing is queued.
        """
        out: list[bytes] = []
        if isinstance(timeout, _Default):
            timeout = self.timeout
        deadline = None if timeout is None else time.monotonic() + timeout
        fd, size, read = self.fd, self.read_size, os.read
        append = out.append
        try:
            while len(out) < max_packets:
                try:
                    append(read(fd, size))
                except BlockingIOError:
                    if out or timeout == 0 or not self._wait(_POLL_IN, deadline):
                        break
        except OSError as exc:
            if not out:
                raise self._read_failed(exc) from None
        if out:
            c = self.counters.slots
            c[READ_PACKETS] += len(out)
            c[READ_BYTES] += sum(map(len, out)) - self.header_size * len(out)
        return out

    # ---- writing ----------------------------------------------------------------------------
    def write(self, packet: BytesLike) -> int:
        """Inject one packet (bytes, bytearray or memoryview; not copied). Returns its length.

        A refused packet raises MqtunError after being counted as a write error and a drop.
        """
        try:
            n = os.write(self.fd, packet)
        except BlockingIOError:
            self._wait(_POLL_OUT, time.monotonic() + 1.0)
            return self.write(packet)
        except OSError as exc:
            raise self._write_failed(exc) from None
        c = self.counters.slots
        c[WRITTEN_PACKETS] += 1
        c[WRITTEN_BYTES] += n - self.header_size
        return n

    def writev(self, parts: Sequence[BytesLike]) -> int:
        """Inject one packet gathered from several buffers (e.g. a header and a payload)."""
        try:
            n = os.writev(self.fd, parts)
        except BlockingIOError:
            self._wait(_POLL_OUT, time.monotonic() + 1.0)
            return self.writev(parts)
        except OSError as exc:
            raise self._write_failed(exc) from None
        c = self.counters.slots
        c[WRITTEN_PACKETS] += 1
        c[WRITTEN_BYTES] += n - self.header_size
        return n

    def write_batch(self, packets: Iterable[BytesLike]) -> int:
        """Inject many packets; return how many the kernel took.

        A packet the kernel refuses is counted as dropped with its reason and the batch goes
        on; only the loss of the device stops it (DeviceGoneError).
        """
        fd, write = self.fd, os.write
        sent = 0
        nbytes = 0
        hs = self.header_size
        for pkt in packets:
            try:
                nbytes += write(fd, pkt) - hs
                sent += 1
            except OSError as exc:
                err = self._write_failed(exc)
                if isinstance(err, DeviceGoneError) or exc.errno == errno.EBADF:
                    self._count_written(sent, nbytes)
                    raise err from None
        self._count_written(sent, nbytes)
        return sent

    def _count_written(self, packets: int, nbytes: int) -> None:
        c = self.counters.slots
        c[WRITTEN_PACKETS] += packets
        c[WRITTEN_BYTES] += nbytes

    # ---- queue state (TUNSETQUEUE) ------------------------------------------------------------
    def disable(self) -> None:
        """Detach this queue from the device (IFF_DETACH_QUEUE); the fd stays open.

        The kernel purges its ring and moves the last active queue into this slot.
        """
        self.device._set_queue_enabled(self, False)

    def enable(self) -> None:
        """Re-attach a disabled queue (IFF_ATTACH_QUEUE); it takes the last index."""
        self.device._set_queue_enabled(self, True)

    # ---- lifecycle --------------------------------------------------------------------------
    def close(self) -> None:
        """Close the fd. Wakes a thread blocked in read(). Idempotent."""
        self.device._forget_queue(self)

    def _close_fd(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            os.close(self.fd)
            if self._wake_w >= 0:
                os.close(self._wake_w)  # POLLHUP on the read end wakes every waiter
                self._wake_w = -1
            if self._wake_r >= 0 and self._waiters == 0:
                os.close(self._wake_r)
                self._wake_r = -1

    def __enter__(self) -> Queue:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self._closed else ("enabled" if self._enabled else "disabled")
        return f"<Queue {self.device.name} fd={self.fd} index={self.index} {state}>"

    # ---- ioctl on this fd ---------------------------------------------------------------------
    def _ioctl(self, request: int, arg: int | bytes, op: str) -> int | bytes:
        try:
            return fcntl.ioctl(self.fd, request, arg)
        except OSError as exc:
            raise kernel_error(exc, op, self.device.name) from None

    def _ioctl_int(self, request: int, value: int, op: str) -> None:
        self._ioctl(request, struct.pack("i", value), op)

    # ---- internals --------------------------------------------------------------------------
    def _wait(self, events: int, deadline: float | None) -> bool:
        """Poll until the fd is ready (True), the deadline passes or the queue closes."""
        with self._lock:
            if self._closed:
                raise MqtunError(errno.EBADF, f"queue of {self.device.name} is closed", op="read")
            if self._wake_r < 0:
                self._wake_r, self._wake_w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
            self._waiters += 1
            wake_r = self._wake_r
        try:
            poller = select.poll()
            poller.register(self.fd, events)
            poller.register(wake_r, select.POLLIN)
            while True:
                if deadline is None:
                    ms = -1
                else:
                    ms = max(0, int((deadline - time.monotonic()) * 1000 + 0.999))
                ready = poller.poll(ms)
                if self._closed:
                    raise MqtunError(
                        errno.EBADF, f"queue of {self.device.name} was closed", op="read"
                    )
                if ready:
                    return True
                if deadline is not None and time.monotonic() >= deadline:
                    return False
        finally:
            with self._lock:
                self._waiters -= 1
                if self._closed and self._waiters == 0 and self._wake_r >= 0:
                    os.close(self._wake_r)
                    self._wake_r = -1

    def _read_failed(self, exc: OSError) -> MqtunError:
        self.counters.slots[READ_ERRORS] += 1
        if self._closed or exc.errno == errno.EBADF:
            return MqtunError(errno.EBADF, f"queue of {self.device.name} is closed", op="read")
        return kernel_error(exc, "read", self.device.name)

    def _write_failed(self, exc: OSError) -> MqtunError:
        c = self.counters
        c.slots[WRITE_ERRORS] += 1
        c.drop(_WRITE_DROP_REASON.get(exc.errno or 0, DropReason.WRITE_ERROR))
        if self._closed or exc.errno == errno.EBADF:
            return MqtunError(errno.EBADF, f"queue of {self.device.name} is closed", op="write")
        return kernel_error(exc, "write", self.device.name)
