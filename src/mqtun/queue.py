"""Queue: one file descriptor of a tun/tap device, and the packets that move through it.

Each read returns exactly one packet and each write injects exactly one (the kernel's rule).
The fd is always non-blocking underneath; a "blocking" read waits in poll(2) so that a timeout,
a close from another thread and the deletion of the device all wake it. Counters are kept per
queue (the kernel keeps none) in a `Counters` buffer that the runtime may place in shared memory.
"""

from __future__ import annotations

import contextlib
import enum
import errno
import fcntl
import os
import select
import struct
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import TYPE_CHECKING, Any

from mqtun import _uapi
from mqtun.errors import DeviceGoneError, MqtunError, QueueFullError, kernel_error
from mqtun.packet import accel, gso
from mqtun.packet.vnet import decode as decode_vnet
from mqtun.stats import (
    READ_BYTES,
    READ_ERRORS,
    READ_PACKETS,
    READ_WIRE_PACKETS,
    WRITE_ERRORS,
    WRITTEN_BYTES,
    WRITTEN_PACKETS,
    WRITTEN_WIRE_PACKETS,
    Counters,
    QueueStats,
    drop_reason,
)

if TYPE_CHECKING:
    from mqtun.device import Device

__all__ = ["BytesLike", "Queue"]

# What a packet may be: anything os.write takes without a copy (collections.abc.BytesLike is 3.12+).
BytesLike = bytes | bytearray | memoryview

# Largest packet a queue may hand over: a 64 KiB super-packet plus the biggest headers.
DEFAULT_READ_SIZE = 65536 + _uapi.VIRTIO_NET_HDR_V1_HASH_TUNNEL_SIZE + _uapi.TUN_PI_SIZE + 64

class _Default(enum.Enum):
    DEFAULT = 0


DEFAULT = _Default.DEFAULT  # "use the queue's own timeout"
_POLL_IN = select.POLLIN | select.POLLERR | select.POLLHUP | select.POLLNVAL
_rwf_nowait = True  # until a kernel refuses preadv2(RWF_NOWAIT) on a TUN fd (EOPNOTSUPP)
_POLL_OUT = select.POLLOUT | select.POLLERR | select.POLLHUP | select.POLLNVAL
_CLOSED_FD = -1  # what `fd` holds once closed: no syscall can reach a reused fd number


def read_drain_python(fd: int, size: int, limit: int) -> tuple[list[bytes], int, int]:
    """Read a non-blocking `fd` until it is empty or `limit` buffers were read: (the buffers,
    their total length, 0), or the errno of a read that failed otherwise in place of 0 (the
    buffers before it are returned all the same). `read_drain` is this loop in C where it is
    built (`mqtun._reads`): no call per read, no BlockingIOError at the end. The one read loop
    of a drain: `Queue.read_batch`, the worker loop's drains and asyncio's use it."""
    bufs: list[bytes] = []
    nbytes = 0
    read = os.read
    try:
        while len(bufs) < limit:
            b = read(fd, size)
            bufs.append(b)
            nbytes += len(b)
    except BlockingIOError:
        pass
    except OSError as exc:
        return bufs, nbytes, exc.errno or errno.EIO
    return bufs, nbytes, 0


def write_each_python(fd: int, bufs: Sequence[Any], start: int) -> tuple[int, int, int]:
    """Write bufs[start:] to `fd` in order until one write fails: (the index it stopped at,
    len(bufs) if none failed; the bytes written; the failed write's errno or 0). `write_each`
    is this loop in C where it is built: a drain's writes in one call."""
    nbytes = 0
    write = os.write
    for i in range(max(start, 0), len(bufs)):
        try:
            nbytes += write(fd, bufs[i])
        except OSError as exc:
            return i, nbytes, exc.errno or errno.EIO
    return len(bufs), nbytes, 0


# The rest of a drain that RelayDrain did not finish: (the buffers read, the errno of a read
# that failed or 0, how many were relayed, the errno of the relayed write that failed or 0).
DrainRest = Callable[[list[bytes], int, int, int], int]

# A forwarder's join of a drain's reads (runtime.path.PacketPath.reads_joiner): (the buffers
# to write, how many reads each holds, 0 for a read as it came), or (the reads, None).
DrainJoin = Callable[[list[bytes]], tuple[list[Any], list[int] | None]]

# The slots a RelayDrain counts, in its order: (read packets, read bytes, read wire packets,
# written packets, written bytes, written wire packets).
RELAY_SLOTS: tuple[int, ...] = (READ_PACKETS, READ_BYTES, READ_WIRE_PACKETS, WRITTEN_PACKETS,
                                WRITTEN_BYTES, WRITTEN_WIRE_PACKETS)

# Where a route's reads hold their super-packets, for RelayDrain to count their segments:
# (packet_at, vnet_at, tap, little_endian, ETH_P_IP, ETH_P_IPV6, IPPROTO_TCP, IPPROTO_UDP, the
# gso_type bits of a UDP tunnel); None: it relays plain packets only. See relay_supers().
RelaySupers = tuple[int, int, bool, bool, int, int, int, int, int]


def relay_supers(packet_at: int, vnet_at: int, *, tap: bool, little_endian: bool) -> RelaySupers:
    """The `supers` of a RelayDrain whose reads hold a virtio-net header at `vnet_at` and the
    packet (an Ethernet frame if `tap`) at `packet_at`."""
    return (packet_at, vnet_at, tap, little_endian, _uapi.ETH_P_IP, _uapi.ETH_P_IPV6,
            _uapi.IPPROTO_TCP, _uapi.IPPROTO_UDP, _uapi.VIRTIO_NET_HDR_GSO_UDP_TUNNEL)


def is_plain(buf: Any, gso_at: int) -> bool:
    """Whether a read is a plain packet, no super-packet: with `gso_at` >= 0 it is longer than
    that and has 0 there (the virtio-net header's gso_type); `_reads.is_plain` in C."""
    return gso_at < 0 or (len(buf) > gso_at and not buf[gso_at])


def count_segments_python(buf: Any, gso_at: int, supers: RelaySupers | None) -> int:
    """The wire packets a RelayDrain counts for one read: 1 for a plain packet (`is_plain`),
    a super-packet's segments (gso.segment_count), or -1 for a read it leaves to the route's
    `rest`: with `supers` None every super-packet, else one that gso.segment_count would only
    estimate (`rest` counts it, or drops it). The C loop's twin, `mqtun._reads.count_segments`,
    also leaves to `rest` the rarer shapes (IPv6 extension headers, fragments, VLAN tags,
    transports other than TCP and UDP): which drains are relayed may differ, never what is
    written and counted."""
    if is_plain(buf, gso_at):
        return 1
    if supers is None or len(buf) <= supers[0]:
        return -1
    packet_at, vnet_at, tap, little, *_ = supers
    view = memoryview(buf)
    hdr = decode_vnet(view[vnet_at:packet_at], packet_at - vnet_at, little_endian=little)
    exact = gso.exact_segment_count(hdr, view[packet_at:], tap=tap)
    return -1 if exact is None else exact


class RelayDrainPython:
    """One drain of a route, called with no arguments: read `in_fd` (`read_drain`), count the
    reads, and when each is a plain packet (`gso_at` >= 0: each is longer than that and has 0
    there) or, given `supers`, a super-packet whose segments it counts (`count_segments`),
    write them to `out_fd` in order, counted too, as the C forwarder writes: at once when at
    most `relay_max` are plain (request/response traffic, a TCP stream's super-packets), else
    joined first by `join` (a UDP flood's datagrams into USO packets) when it is given.
    Returns the number read when all were written and no read failed, else what `rest(bufs,
    read_errno, sent, write_errno)` returns: the rest of the drain (decode, a handler, a
    failure to count) is its caller's; after a join, `bufs` are the joined buffers (and the
    drain returns the number read). `mqtun._reads.RelayDrain` is this in C where it is built,
    and `serve` calls it without a Python frame."""

    __slots__ = ("gso_at", "in_fd", "join", "limit", "out_fd", "read_header", "read_slots",
                 "relay_max", "rest", "size", "slots", "supers", "written_header",
                 "written_slots")

    def __init__(self, in_fd: int, size: int, limit: int, out_fd: int, relay_max: int,
                 gso_at: int, read_slots: Any, written_slots: Any, slots: tuple[int, ...],
                 read_header: int, written_header: int, rest: DrainRest, *,
                 supers: RelaySupers | None = None, join: DrainJoin | None = None) -> None:
        if size <= 0 or limit < 0:
            raise ValueError("RelayDrain: size must be > 0 and limit >= 0")
        if len(slots) != len(RELAY_SLOTS):
            raise ValueError(f"RelayDrain: slots must name {len(RELAY_SLOTS)} slots")
        if supers is not None and gso_at != supers[1] + 1:
            raise ValueError("RelayDrain: gso_at must be supers' vnet_at + 1")
        self.in_fd, self.size, self.limit, self.out_fd = in_fd, size, limit, out_fd
        self.relay_max, self.gso_at, self.slots, self.rest = relay_max, gso_at, slots, rest
        self.read_slots, self.written_slots = read_slots, written_slots
        self.read_header, self.written_header = read_header, written_header
        self.supers, self.join = supers, join

    def __call__(self) -> int:
        bufs, nbytes, failed = read_drain(self.in_fd, self.size, self.limit)
        n = len(bufs)
        sent = werr = 0
        out: list[Any] = bufs  # what is written: the reads, or the reads joined
        if n:
            r = self.read_slots
            rp, rb, rw, wp, wb, ww = self.slots
            r[rp] += n
            r[rb] += nbytes - self.read_header * n
            at, supers = self.gso_at, self.supers
            wire = [count_segments_python(b, at, supers) for b in bufs]
            plain = sum(is_plain(b, at) for b in bufs)
            counts: list[int] | None = None  # the wire packets of each joined buffer
            if min(wire) >= 0 and plain > self.relay_max and self.join is not None:
                out, joined = self.join(bufs)
                if joined is None:  # nothing joined: relayed as read
                    out, plain = bufs, 0
                else:
                    counts = [c or count_segments_python(b, at, supers)
                              for b, c in zip(out, joined, strict=True)]
            if min(wire) >= 0 and (counts is not None or plain <= self.relay_max):
                sent, sbytes, werr = write_each(self.out_fd, out, 0)
                w = self.written_slots
                r[rw] += sum(wire)
                w[wp] += sent
                w[wb] += sbytes - self.written_header * sent
                w[ww] += sum((wire if counts is None else counts)[:sent])
        if failed or sent < len(out):
            result = self.rest(out, failed, sent, werr)
            return result if out is bufs else n  # (a joined drain's rest: its buffers)
        return n


try:
    from mqtun._reads import RelayDrain as _RelayDrain_c
    from mqtun._reads import count_segments as _count_segments_c
    from mqtun._reads import read_drain as _read_drain_c
    from mqtun._reads import serve as _serve_c
    from mqtun._reads import write_each as _write_each_c
except ImportError:  # built without a C compiler
    _read_drain_c = None  # type: ignore[assignment]
    _RelayDrain_c = None  # type: ignore[assignment,misc]
    _count_segments_c = None  # type: ignore[assignment]
    _serve_c = None  # type: ignore[assignment]
    _write_each_c = None  # type: ignore[assignment]

_C = accel.ACCELERATE and _read_drain_c is not None

write_each: Callable[[int, Sequence[Any], int], tuple[int, int, int]] = (
    _write_each_c if _C else write_each_python)

read_drain: Callable[[int, int, int], tuple[list[bytes], int, int]] = (
    _read_drain_c if _C else read_drain_python)

RelayDrain: type[RelayDrainPython] = (
    _RelayDrain_c if _C else RelayDrainPython)  # type: ignore[assignment]

# An I/O loop's turns in C (see runtime.loop.serve_ready); None where it is not built.
serve: Callable[[int, dict[int, Callable[[], object]], Callable[[], bool], object, bool],
                None] | None = _serve_c if _C else None


class Queue:
    """One queue of a device. Usable with select/poll/epoll/asyncio through `fileno()`.

    Queues are made by their Device (create, attach, add_queue). The device keeps the kernel
    order of its queues; the queue keeps its fd, its counters and the waits on it.
    """

    def __init__(self, device: Device, fd: int, counters: Counters | None = None) -> None:
        self.device = device
        self.fd = fd
        self.counters = counters if counters is not None else Counters()
        self.header_size = device.header_size  # PI + virtio-net header bytes before each packet
        self.read_size = DEFAULT_READ_SIZE
        self.timeout: float | None = None if device.blocking else 0.0
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
        return self.device.index_of(self)

    @property
    def enabled(self) -> bool:
        """Attached (not disabled, not closed), as this process last set it."""
        return self.device.index_of(self) is not None

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def flags(self) -> int:
        """The IFF_* flags the kernel reports for this fd (TUNGETIFF).

        IFF_DETACH_QUEUE is set while the queue is disabled. Raises DeviceGoneError when the
        device was deleted. (IFF_NO_PI cannot be read here: the kernel sets that bit whenever
        no classic filter is attached; `Device.packet_info` comes from netlink instead.)
        """
        out = self.ioctl(_uapi.TUNGETIFF, bytes(_uapi.IFREQ_SIZE), "get_flags")
        return _uapi.unpack_ifreq(out)[1]  # type: ignore[arg-type]

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
            self._require_open("read")
            try:
                data = os.read(self.fd, self.read_size)
            except BlockingIOError:
                if wait == 0 or not self._wait(_POLL_IN, deadline, "read"):
                    return None
                continue
            except OSError as exc:
                raise self._read_failed(exc) from None
            self._count_read(1, len(data))
            return data

    def read_into(self, buffer: BytesLike, timeout: float | _Default | None = DEFAULT) -> int:
        """Read one packet into `buffer`; return its length (0 when nothing arrived in time).

        A buffer shorter than the packet truncates it silently (the kernel's rule); one shorter
        than the headers is counted as a packet of 0 payload bytes.
        """
        wait = self.timeout if isinstance(timeout, _Default) else timeout
        if wait == 0:  # never waits, even on an fd someone set blocking (compat)
            if self._closed:
                raise self._closed_error("read")
            try:
                n = self._read_nowait(buffer)
            except BlockingIOError:
                return 0
            except OSError as exc:
                raise self._read_failed(exc) from None
            self._count_read(1, n)
            return n
        deadline = None if wait is None else time.monotonic() + wait
        while True:
            self._require_open("read")
            try:
                n = os.readv(self.fd, [buffer])
            except BlockingIOError:
                if not self._wait(_POLL_IN, deadline, "read"):
                    return 0
                continue
            except OSError as exc:
                raise self._read_failed(exc) from None
            self._count_read(1, n)
            return n

    def _read_nowait(self, buffer: BytesLike) -> int:
        """One read(2) that never blocks: preadv2(RWF_NOWAIT), one syscall whatever the fd's
        mode; where the kernel does not take that flag for this fd, a poll(0) first."""
        global _rwf_nowait
        if _rwf_nowait:
            try:
                return os.preadv(self.fd, [buffer], -1, os.RWF_NOWAIT)
            except OSError as exc:
                if exc.errno != errno.EOPNOTSUPP:
                    raise
                _rwf_nowait = False
        if not self._poll(_POLL_IN, time.monotonic(), "read") & _POLL_IN:
            raise BlockingIOError(errno.EAGAIN, "nothing queued")
        return os.readv(self.fd, [buffer])

    def wait_readable(self, timeout: float | None = None) -> bool:
        """Wait until a packet can be read (True) or `timeout` seconds pass (False).

        For callers that read the fd their own way (mqtun.compat reads a blocking fd, as
        python-pytun did): a close() from another thread wakes the wait with EBADF, the
        deletion of the device with DeviceGoneError. A disabled queue simply waits.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        revents = self._poll(_POLL_IN, deadline, "wait_readable")
        if revents & select.POLLERR:
            self._raise_if_gone("wait_readable")
        return bool(revents)

    def read_batch(
        self, max_packets: int = 64, timeout: float | _Default | None = 0.0
    ) -> list[bytes]:
        """Drain up to `max_packets` packets in one call (waits only for the first one).

        By default it does not wait at all: an empty list means nothing is queued.
        """
        self._require_open("read")
        if isinstance(timeout, _Default):
            timeout = self.timeout
        deadline = None if timeout is None else time.monotonic() + timeout
        size = self.read_size
        while True:
            out, nbytes, failed = read_drain(self.fd, size, max_packets)
            if out or failed or timeout == 0 or not self._wait(_POLL_IN, deadline, "read"):
                break
            self._require_open("read")
        if failed and not out:  # (with packets read first, the next call reports it)
            raise self._read_failed(OSError(failed, os.strerror(failed))) from None
        if out:
            if size > self.header_size:  # no packet can be shorter than its headers
                self._count_read(len(out), nbytes)
            else:
                for pkt in out:
                    self._count_read(1, len(pkt))
        return out

    def _count_read(self, packets: int, nbytes: int) -> None:
        """The one place reads are counted. Bytes exclude the headers, as the kernel's do; a
        read cut shorter than its headers (a small buffer) counts as 0 bytes, never less."""
        c = self.counters.slots
        c[READ_PACKETS] += packets
        payload = nbytes - self.header_size * packets
        if payload > 0:
            c[READ_BYTES] += payload

    # ---- writing ----------------------------------------------------------------------------
    # One rule for EAGAIN (the socket's send buffer is full, see set_sndbuf) in write, writev
    # and write_batch: it is not a drop, the packet is still the caller's. Wait until the fd is
    # writable within the queue's `timeout` (None: as long as it takes, 0: not at all) and try
    # again; when the time is up, raise QueueFullError, which says how many were written.

    def write(self, packet: BytesLike) -> int:
        """Inject one packet (bytes, bytearray or memoryview; not copied). Returns its length.

        A refused packet raises MqtunError after being counted as a write error and a drop.
        """
        n = self._write_one(os.write, packet, DEFAULT, 0)
        self._count_written(1, n - self.header_size)
        return n

    def writev(self, parts: Sequence[BytesLike]) -> int:
        """Inject one packet gathered from several buffers (e.g. a header and a payload)."""
        n = self._write_one(os.writev, parts, DEFAULT, 0)
        self._count_written(1, n - self.header_size)
        return n

    def write_batch(self, packets: Iterable[BytesLike]) -> int:
        """Inject many packets; return how many the kernel took.

        A packet the kernel refuses is counted as dropped with its reason and the batch goes
        on; only the loss of the device (DeviceGoneError), a close, or a send buffer that
        stays full past the queue's timeout (QueueFullError, see `write`) stop it.
        """
        self._require_open("write")
        fd, write = self.fd, os.write
        sent = 0
        nbytes = 0
        hs = self.header_size
        deadline: float | _Default | None = DEFAULT
        try:
            for pkt in packets:
                try:
                    nbytes += write(fd, pkt) - hs
                    sent += 1
                except BlockingIOError:
                    if isinstance(deadline, _Default):
                        deadline = self._write_deadline()
                    nbytes += self._write_one(write, pkt, deadline, sent) - hs
                    sent += 1
                except OSError as exc:
                    err = self._write_failed(exc)
                    if isinstance(err, DeviceGoneError) or err.errno == errno.EBADF:
                        raise err from None
        finally:
            self._count_written(sent, nbytes)
        return sent

    def _write_deadline(self) -> float | None:
        return None if self.timeout is None else time.monotonic() + self.timeout

    def _write_one(self, write: Callable[[int, Any], int], packet: Any,
                   deadline: float | _Default | None, written: int) -> int:
        """One packet through `write` (os.write or os.writev), EAGAIN handled by the rule
        (`deadline` DEFAULT: the queue's timeout from the first EAGAIN)."""
        while True:
            self._require_open("write")
            try:
                return write(self.fd, packet)
            except BlockingIOError:
                if isinstance(deadline, _Default):
                    deadline = self._write_deadline()
                if not self._wait(_POLL_OUT, deadline, "write"):
                    raise QueueFullError(
                        f"the send buffer of {self.device.known_name} stayed full "
                        f"({written} packet(s) of this call were written, this one was not): "
                        "write it again later, or raise the queue's timeout or "
                        "Device.set_sndbuf", device=self.device.known_name, written=written,
                    ) from None
            except OSError as exc:
                raise self._write_failed(exc) from None

    def _count_written(self, packets: int, nbytes: int) -> None:
        c = self.counters.slots
        c[WRITTEN_PACKETS] += packets
        if nbytes > 0:
            c[WRITTEN_BYTES] += nbytes

    # ---- queue state (TUNSETQUEUE) ------------------------------------------------------------
    def disable(self) -> None:
        """Detach this queue from the device (IFF_DETACH_QUEUE); the fd stays open.

        The kernel purges its ring and moves the last active queue into this slot.
        """
        self.device.disable_queue(self)

    def enable(self) -> None:
        """Re-attach a disabled queue (IFF_ATTACH_QUEUE); it takes the last index."""
        self.device.enable_queue(self)

    # ---- lifecycle --------------------------------------------------------------------------
    def close(self) -> None:
        """Close the fd. Wakes a thread blocked in read(). Idempotent.

        The queue then leaves its device's lists; every later operation on it raises.
        """
        with self._lock:
            if self._closed:
                return
            self._closed = True
            fd, self.fd = self.fd, _CLOSED_FD
            os.close(fd)
            if self._wake_w >= 0:
                os.close(self._wake_w)  # POLLHUP on the read end wakes every waiter
                self._wake_w = -1
            if self._wake_r >= 0 and self._waiters == 0:
                os.close(self._wake_r)
                self._wake_r = -1
        self.device.queue_closed(self)

    def __enter__(self) -> Queue:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self._closed else ("enabled" if self.enabled else "disabled")
        return f"<Queue {self.device.known_name} fd={self.fd} index={self.index} {state}>"

    # ---- ioctl on this fd ---------------------------------------------------------------------
    def ioctl(self, request: int, arg: int | bytes, op: str) -> int | bytes:
        """One ioctl on this queue's fd; a refusal becomes the MqtunError that explains it.

        `op` names the operation for the message (see mqtun.errors). A closed queue raises.
        """
        self._require_open(op)
        try:
            return fcntl.ioctl(self.fd, request, arg)
        except OSError as exc:
            raise kernel_error(exc, op, self.device.known_name) from None

    def ioctl_int(self, request: int, value: int, op: str) -> int:
        """An ioctl whose argument is a pointer to a C int; returns the int it holds after."""
        out = self.ioctl(request, struct.pack("i", value), op)
        return int(struct.unpack("i", out)[0])  # type: ignore[arg-type]

    # ---- internals --------------------------------------------------------------------------
    def _require_open(self, op: str) -> None:
        if self._closed:
            raise self._closed_error(op)

    def _closed_error(self, op: str) -> MqtunError:
        return MqtunError(errno.EBADF, f"this queue of {self.device.known_name} is closed",
                          device=self.device.known_name, op=op)

    def _wait(self, events: int, deadline: float | None, op: str) -> bool:
        """Poll until the fd is ready (True) or the deadline passes (False)."""
        return bool(self._poll(events, deadline, op))

    @contextlib.contextmanager
    def close_watch(self, op: str) -> Iterator[tuple[int, int]]:
        """(fd, closed_fd) for a waiter: `closed_fd` (a pipe's read end) turns readable
        (POLLHUP) when the queue is closed, so a poll on both wakes then; a closed fd would
        only leave the poll set without a word. Raises EBADF if the queue is closed."""
        with self._lock:
            if self._closed:
                raise self._closed_error(op)
            if self._wake_r < 0:
                self._wake_r, self._wake_w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
            self._waiters += 1
            wake_r = self._wake_r
            fd = self.fd
        try:
            yield fd, wake_r
        finally:
            with self._lock:
                self._waiters -= 1
                if self._closed and self._waiters == 0 and self._wake_r >= 0:
                    os.close(self._wake_r)
                    self._wake_r = -1

    def _poll(self, events: int, deadline: float | None, op: str) -> int:
        """The fd's poll events once ready, 0 when the deadline passed. A close wakes it with
        EBADF. (A deleted device shows as POLLERR: the read or write that follows says so.)"""
        with self.close_watch(op) as (fd, wake_r):
            poller = select.poll()
            poller.register(fd, events)
            poller.register(wake_r, select.POLLIN)
            while True:
                if deadline is None:
                    ms = -1
                else:
                    ms = max(0, int((deadline - time.monotonic()) * 1000 + 0.999))
                ready = poller.poll(ms)
                if self._closed:
                    raise self._closed_error(op)
                for rfd, revents in ready:
                    if rfd == fd:
                        return revents
                if deadline is not None and time.monotonic() >= deadline:
                    return 0

    def _raise_if_gone(self, op: str) -> None:
        """Ask the kernel whether the device still exists (TUNGETIFF gives EBADFD if not)."""
        try:
            fcntl.ioctl(self.fd, _uapi.TUNGETIFF, bytes(_uapi.IFREQ_SIZE))
        except OSError as exc:
            if exc.errno == errno.EBADFD:
                raise kernel_error(exc, op, self.device.known_name) from None

    def _read_failed(self, exc: OSError) -> MqtunError:
        self.counters.slots[READ_ERRORS] += 1
        if self._closed or exc.errno == errno.EBADF:
            return self._closed_error("read")
        return kernel_error(exc, "read", self.device.known_name)

    def _write_failed(self, exc: OSError) -> MqtunError:
        c = self.counters
        c.slots[WRITE_ERRORS] += 1
        c.drop(drop_reason(exc.errno))
        if self._closed or exc.errno == errno.EBADF:
            return self._closed_error("write")
        return kernel_error(exc, "write", self.device.known_name)
