"""The per-queue I/O loop: drain queues in batches, move or answer packets, sleep adaptively.

A loop serves a few *routes*. A route reads packets from one queue and either writes them
unchanged to another queue (a forwarder: zero-copy, the buffer read into is the one written
from) or hands each one to a handler whose answer is written back **on the queue it was read
from** (flow affinity: the kernel's flow table learns a flow's queue from the queue that
writes it, so each flow stays on one worker).

Modes (`LoopConfig.mode`), all with exact per-queue counters:

- ``adaptive`` (the default): drain every ready queue up to `batch` packets, then keep polling
  with non-blocking reads for `spin_us` microseconds (yielding the CPU between polls) before
  sleeping in epoll. Cuts the wake-up latency of request/response traffic at the price of a
  little CPU after each burst.
- ``epoll``: drain in batches, sleep in epoll as soon as nothing is queued.
- ``busy``: never sleep (burns a core; for latency benchmarks).
- ``naive``: one packet per epoll wake-up through the plain Queue API: the baseline.
- ``uring``: io_uring through the `liburing` binding, if importable: one read in flight per
  queue (more would reorder packets of a flow), each write submitted with the next read.

The loop never dies from bad input: a packet that cannot be written is counted as dropped
with its reason (`mqtun.stats.DropReason`) and the loop goes on. The loss of a device ends
`run()` with DeviceGoneError.
"""

from __future__ import annotations

import contextlib
import errno
import io
import os
import select
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from mqtun import _uapi
from mqtun.errors import DeviceGoneError, InvalidArgumentError, MqtunError, kernel_error
from mqtun.stats import (
    READ_BYTES,
    READ_ERRORS,
    READ_PACKETS,
    WRITE_ERRORS,
    WRITTEN_BYTES,
    WRITTEN_PACKETS,
    Counters,
    DropReason,
)

if TYPE_CHECKING:
    from collections.abc import Buffer

    from mqtun.queue import Queue

__all__ = [
    "DEFAULT_MODE",
    "MODES",
    "Handler",
    "IOLoop",
    "LoopConfig",
    "Route",
    "uring_available",
]

MODES = ("adaptive", "epoll", "busy", "naive", "uring")
DEFAULT_MODE = "adaptive"
DEFAULT_BATCH = 64
DEFAULT_SPIN_US = 50
_READ_SIZE = 65536 + _uapi.VIRTIO_NET_HDR_V1_HASH_TUNNEL_SIZE + _uapi.TUN_PI_SIZE + 64

# What a handler may return: nothing (drop), one packet, or several packets.
Handler = Callable[[bytes], "Buffer | Iterable[Buffer] | None"]

_DROP_FOR_ERRNO = {
    errno.EINVAL: DropReason.REFUSED,
    errno.EIO: DropReason.LINK_DOWN,
    errno.EMSGSIZE: DropReason.TOO_BIG,
    errno.EBUSY: DropReason.NO_PEER,  # a detached NAPI queue
}
_GONE = (_uapi.EBADFD, errno.EBADF, errno.ENODEV, errno.ENXIO)


def uring_available() -> bool:
    """Whether the io_uring mode can run here (the `liburing` binding imports)."""
    try:
        import liburing  # noqa: F401
    except Exception:
        return False
    return True


@dataclass(frozen=True)
class LoopConfig:
    """How a loop waits and drains. `mode` is one of MODES."""

    mode: str = DEFAULT_MODE
    batch: int = DEFAULT_BATCH  # most packets drained from one queue before looking at others
    spin_us: int = DEFAULT_SPIN_US  # adaptive: poll this long after the last packet, then sleep

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise InvalidArgumentError(
                f"loop mode {self.mode!r}: choose one of {', '.join(MODES)}"
            )
        if not 1 <= self.batch <= 4096:
            raise InvalidArgumentError(f"batch must be 1..4096, not {self.batch}")
        if not 0 <= self.spin_us <= 1_000_000:
            raise InvalidArgumentError(f"spin_us must be 0..1000000, not {self.spin_us}")
        if self.mode == "uring" and not uring_available():
            raise InvalidArgumentError(
                "loop mode 'uring' needs the liburing binding (pip install liburing); "
                "the default mode needs nothing"
            )


@dataclass
class Route:
    """Packets read from `src` go to `dst` unchanged, or through `handler` back to `src`
    (or to `dst` when both are given).

    A handler returns None (the packet is dropped and counted as FILTERED), one packet, or a
    list/tuple of packets; it may raise, which counts the packet as a HANDLER_ERROR drop.
    Answering on another queue than `src` moves the flow there: the kernel's flow table
    follows the queue that writes a flow.
    """

    src: Queue
    dst: Queue | None = None
    handler: Handler | None = None

    def __post_init__(self) -> None:
        if self.dst is None and self.handler is None:
            raise InvalidArgumentError("a route needs a destination queue, a handler, or both")

    @property
    def out(self) -> Queue:
        return self.dst if self.dst is not None else self.src


class IOLoop:
    """Runs routes until `stop()` is called (safe from a signal handler or another thread)."""

    def __init__(self, routes: Sequence[Route], config: LoopConfig | None = None) -> None:
        if not routes:
            raise InvalidArgumentError("an I/O loop needs at least one route")
        self.routes = list(routes)
        self.config = config or LoopConfig()
        self._stopping = False
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)

    @property
    def wake_fd(self) -> int:
        """A pipe's write end: a byte written here wakes a sleeping loop (signal.set_wakeup_fd
        may point at it)."""
        return self._wake_w

    def stop(self) -> None:
        self._stopping = True
        with contextlib.suppress(OSError):
            os.write(self._wake_w, b"\0")

    @property
    def stopping(self) -> bool:
        return self._stopping

    def close(self) -> None:
        for fd in (self._wake_r, self._wake_w):
            with contextlib.suppress(OSError):
                os.close(fd)
        self._wake_r = self._wake_w = -1

    def run(self) -> None:
        """Serve the routes until stopped. Raises DeviceGoneError if a device disappears."""
        mode = self.config.mode
        if mode == "uring":
            _run_uring(self)
        elif mode == "naive":
            _run_naive(self)
        else:
            _run_polling(self)

    # ---- helpers shared by the modes ------------------------------------------------------
    def _epoll(self) -> select.epoll:
        ep = select.epoll()
        for r in self.routes:
            ep.register(r.src.fd, select.EPOLLIN)
        ep.register(self._wake_r, select.EPOLLIN)
        return ep

    def _drain_wake(self) -> None:
        try:
            while os.read(self._wake_r, 512):
                pass
        except OSError:
            pass


# ---- errors --------------------------------------------------------------------------------
def _device_of(q: Queue) -> str:
    return q.device._name


def _read_error(q: Queue, exc: OSError) -> None:
    """A read failed with something other than EAGAIN: raise if the device is gone."""
    q.counters.slots[READ_ERRORS] += 1
    err = exc.errno
    if err in _GONE or err == errno.EFAULT:
        raise DeviceGoneError(err or _uapi.EBADFD,
                              f"{_device_of(q)} is gone (deleted while its queue was read)",
                              device=_device_of(q), op="read")
    if err == errno.EINTR:
        return
    # anything else (e.g. ENOMEM) is counted; the loop goes on


def _write_error(q: Queue, err: int | None) -> None:
    """Count a failed write on the writing queue; raise if its device is gone."""
    c: Counters = q.counters
    c.slots[WRITE_ERRORS] += 1
    if err in _GONE:
        c.drop(DropReason.DEVICE_GONE)
        raise DeviceGoneError(err or _uapi.EBADFD, f"{_device_of(q)} is gone",
                              device=_device_of(q), op="write")
    c.drop(_DROP_FOR_ERRNO.get(err or 0, DropReason.WRITE_ERROR))


# ---- drainers: one closure per route, locals bound for speed -------------------------------
def _forward_drainer(route: Route, batch: int) -> Callable[[], int]:
    """src -> dst unchanged: read into a reused buffer, write a view of it (no copy)."""
    src, dst = route.src, route.dst
    assert dst is not None
    readinto = io.FileIO(src.fd, "r", closefd=False).readinto
    write = os.write
    out_fd = dst.fd
    buf = bytearray(_READ_SIZE)
    view = memoryview(buf)
    rslots = src.counters.slots
    wslots = dst.counters.slots
    rh = src.header_size
    wh = dst.header_size

    def drain() -> int:
        n = nbytes = sent = sbytes = 0
        try:
            while n < batch:
                k = readinto(view)
                if k is None:
                    break
                n += 1
                nbytes += k
                try:
                    write(out_fd, view[:k])
                    sent += 1
                    sbytes += k
                except OSError as exc:
                    _write_error(dst, exc.errno)
        except DeviceGoneError:
            raise
        except OSError as exc:
            _read_error(src, exc)
        finally:
            if n:
                rslots[READ_PACKETS] += n
                rslots[READ_BYTES] += nbytes - rh * n
            if sent:
                wslots[WRITTEN_PACKETS] += sent
                wslots[WRITTEN_BYTES] += sbytes - wh * sent
        return n

    return drain


def _handler_drainer(route: Route, batch: int) -> Callable[[], int]:
    """src -> handler -> back to src (or dst): the handler gets a bytes object it may keep."""
    src = route.src
    out = route.out
    handler = route.handler
    assert handler is not None
    read = os.read
    write = os.write
    in_fd, out_fd = src.fd, out.fd
    rslots = src.counters.slots
    wslots = out.counters.slots
    rcount = src.counters
    rh = src.header_size
    wh = out.header_size
    single = (bytes, bytearray, memoryview)

    def drain() -> int:
        n = nbytes = sent = sbytes = 0
        try:
            while n < batch:
                try:
                    pkt = read(in_fd, _READ_SIZE)
                except BlockingIOError:
                    break
                n += 1
                nbytes += len(pkt)
                try:
                    res = handler(pkt)
                except Exception:
                    rcount.drop(DropReason.HANDLER_ERROR)
                    continue
                if res is None:
                    rcount.drop(DropReason.FILTERED)
                    continue
                for p in ((res,) if isinstance(res, single) else res):
                    try:
                        sbytes += write(out_fd, p)
                        sent += 1
                    except OSError as exc:
                        _write_error(out, exc.errno)
        except DeviceGoneError:
            raise
        except OSError as exc:
            _read_error(src, exc)
        finally:
            if n:
                rslots[READ_PACKETS] += n
                rslots[READ_BYTES] += nbytes - rh * n
            if sent:
                wslots[WRITTEN_PACKETS] += sent
                wslots[WRITTEN_BYTES] += sbytes - wh * sent
        return n

    return drain


def _drainer(route: Route, batch: int) -> Callable[[], int]:
    if route.handler is None:
        return _forward_drainer(route, batch)
    return _handler_drainer(route, batch)


# ---- epoll / adaptive / busy --------------------------------------------------------------
def _run_polling(loop: IOLoop) -> None:
    cfg = loop.config
    drains = [_drainer(r, cfg.batch) for r in loop.routes]
    by_fd = {r.src.fd: d for r, d in zip(loop.routes, drains, strict=True)}
    ep = loop._epoll()
    wake = loop._wake_r
    busy = cfg.mode == "busy"
    spin = 0.0 if cfg.mode == "epoll" else cfg.spin_us / 1e6
    clock = time.perf_counter
    yield_cpu = os.sched_yield
    poll = ep.poll
    try:
        while not loop._stopping:
            # drain everything that is queued, round-robin, `batch` packets per queue per turn
            moved = 0
            for d in drains:
                moved += d()
            if moved:
                continue
            if busy:
                continue
            if spin:
                until = clock() + spin
                while clock() < until and not loop._stopping:
                    for d in drains:
                        moved += d()
                    if moved:
                        break
                    # anything else runnable on this CPU goes first: on a busy machine the
                    # programs at both ends of a flow need the CPU more than the spin does
                    # (measured: 1-connection request/response +17% with another core busy)
                    yield_cpu()
                if moved:
                    continue
            # nothing queued: sleep until a queue is readable (or a stop/wake byte arrives)
            for fd, _ev in poll(-1):
                if fd == wake:
                    loop._drain_wake()
                else:
                    by_fd[fd]()
    finally:
        ep.close()


# ---- naive: the baseline -----------------------------------------------------------------
def _run_naive(loop: IOLoop) -> None:
    """One packet per wake-up through the plain Queue API (read, then write)."""
    ep = loop._epoll()
    routes = {r.src.fd: r for r in loop.routes}
    wake = loop._wake_r
    try:
        while not loop._stopping:
            for fd, _ev in ep.poll(-1):
                if fd == wake:
                    loop._drain_wake()
                    continue
                r = routes[fd]
                try:
                    pkt = r.src.read(timeout=0)
                except DeviceGoneError:
                    raise
                except MqtunError as exc:
                    if exc.errno in _GONE:
                        raise DeviceGoneError(exc.errno, str(exc), device=_device_of(r.src),
                                              op="read") from None
                    continue
                if pkt is None:
                    continue
                if r.handler is not None:
                    try:
                        res = r.handler(pkt)
                    except Exception:
                        r.src.counters.drop(DropReason.HANDLER_ERROR)
                        continue
                    if res is None:
                        r.src.counters.drop(DropReason.FILTERED)
                        continue
                    outs: Iterable[Any] = (
                        (res,) if isinstance(res, (bytes, bytearray, memoryview)) else res
                    )
                else:
                    outs = (pkt,)
                for p in outs:
                    try:
                        r.out.write(p)
                    except MqtunError as exc:  # counted by Queue.write
                        if exc.errno in _GONE:
                            raise DeviceGoneError(exc.errno, str(exc),
                                                  device=_device_of(r.out), op="write") from None
    finally:
        ep.close()


# ---- io_uring ----------------------------------------------------------------------------
def _run_uring(loop: IOLoop) -> None:
    """io_uring through liburing: one read in flight per route; writes ride with re-arms."""
    import liburing as L

    cfg = loop.config
    routes = loop.routes
    nroutes = len(routes)
    ring = L.Ring()
    cqe = L.Cqe()
    depth = 1 << max(6, (nroutes * (cfg.batch + 2)).bit_length())
    rc = L.io_uring_queue_init(min(depth, 4096), ring)
    if rc not in (None, 0):
        raise kernel_error(OSError(-rc if isinstance(rc, int) else errno.EIO, "io_uring"),
                           "io_uring_setup")
    # user_data: route << 32 | 0 for the read; route << 32 | 1 + slot for writes
    read_bufs = [bytearray(_READ_SIZE) for _ in range(nroutes)]
    pending_writes: dict[int, Any] = {}
    next_tag = 1
    ts = L.timespec(0.2)  # wake at least every 0.2 s to see stop()

    def arm_read(i: int) -> None:
        sqe = L.io_uring_get_sqe(ring)
        L.io_uring_prep_read(sqe, routes[i].src.fd, read_bufs[i])
        sqe.user_data = i << 32

    def queue_write(i: int, fd: int, data: Any) -> None:
        nonlocal next_tag
        sqe = L.io_uring_get_sqe(ring)
        if sqe is None:
            L.io_uring_submit(ring)
            sqe = L.io_uring_get_sqe(ring)
        tag = (i << 32) | next_tag
        next_tag = next_tag % 0x7FFFFFFF + 1
        L.io_uring_prep_write(sqe, fd, data)
        sqe.user_data = tag
        pending_writes[tag] = data

    for i in range(nroutes):
        arm_read(i)
    L.io_uring_submit(ring)
    single = (bytes, bytearray, memoryview)
    try:
        while not loop._stopping:
            with contextlib.suppress(Exception):  # timeouts and EINTR come as exceptions
                L.io_uring_wait_cqe_timeout(ring, cqe, ts)
            # one completion at a time: the binding's cqe[j] for j > 0 does not follow the
            # ring's wrap-around, so batch indexing misattributes completions
            results = []
            while len(results) < 4096:
                try:
                    if L.io_uring_peek_cqe(ring, cqe) not in (None, 0):
                        break
                except OSError:  # -EAGAIN: nothing more
                    break
                c = cqe[0]
                tag = c.user_data
                try:
                    res = c.res
                except OSError as exc:  # the binding raises for a negative res
                    res = -(exc.errno or errno.EIO)
                results.append((tag, res))
                L.io_uring_cq_advance(ring, 1)
            if not results:
                continue
            for tag, res in results:
                i = tag >> 32
                r = routes[i]
                if tag & 0xFFFFFFFF:  # a write completed
                    pending_writes.pop(tag, None)
                    out = r.out
                    if res is not None and res < 0:
                        _write_error(out, -res)
                    else:
                        s = out.counters.slots
                        s[WRITTEN_PACKETS] += 1
                        s[WRITTEN_BYTES] += (res or 0) - out.header_size
                    continue
                if res is None or res < 0:
                    err = -res if res is not None else errno.EIO
                    if err in (errno.EAGAIN, errno.EINTR, errno.ECANCELED):
                        arm_read(i)
                        continue
                    _read_error(r.src, OSError(err, os.strerror(err)))
                    arm_read(i)
                    continue
                s = r.src.counters.slots
                s[READ_PACKETS] += 1
                s[READ_BYTES] += res - r.src.header_size
                pkt = bytes(memoryview(read_bufs[i])[:res])
                if r.handler is None:
                    queue_write(i, r.out.fd, pkt)
                else:
                    try:
                        ans = r.handler(pkt)
                    except Exception:
                        r.src.counters.drop(DropReason.HANDLER_ERROR)
                        ans = None
                    else:
                        if ans is None:
                            r.src.counters.drop(DropReason.FILTERED)
                    if ans is not None:
                        for p in ((ans,) if isinstance(ans, single) else ans):
                            queue_write(i, r.out.fd, bytes(p))
                arm_read(i)
            L.io_uring_submit(ring)
    finally:
        L.io_uring_queue_exit(ring)
