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
with its reason (`mqtun.stats.DropReason`) and the loop goes on; so is whatever a handler
returns that is not a packet, and whatever it raises. The first fault of each kind (with its
traceback) goes to `on_fault`, or to the `mqtun.runtime` logger, rate limited. The deletion of
a device ends `run()` with DeviceGoneError; a detached queue is only a quiet one.

Counters are published once per drained batch (at most `batch` packets per route), so a loop
killed by SIGKILL loses the counts of at most that one batch per route: up to `batch` packets
read and the answers written for them.
"""

from __future__ import annotations

import collections
import contextlib
import errno
import io
import logging
import os
import select
import time
import traceback
import weakref
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from mqtun.errors import DeviceGoneError, InvalidArgumentError, MqtunError, kernel_error
from mqtun.packet.headers import Buffer
from mqtun.stats import (
    READ_BYTES,
    READ_ERRORS,
    READ_PACKETS,
    WRITE_ERRORS,
    WRITTEN_BYTES,
    WRITTEN_PACKETS,
    Counters,
    DropReason,
    drop_reason,
)

if TYPE_CHECKING:
    from mqtun.queue import Queue

__all__ = [
    "DEFAULT_MODE",
    "MODES",
    "FaultSink",
    "Handler",
    "HandlerFaults",
    "IOLoop",
    "LoopConfig",
    "Route",
    "run_handler",
    "uring_available",
]

MODES = ("adaptive", "epoll", "busy", "naive", "uring")
DEFAULT_MODE = "adaptive"
DEFAULT_BATCH = 64
DEFAULT_SPIN_US = 50

# What a handler may return: nothing (drop), one packet, or several packets.
Handler = Callable[[bytes], "Buffer | Iterable[Buffer] | None"]
# Where the first fault of each kind goes: (a one-line key, the full text with its traceback).
FaultSink = Callable[[str, str], None]

_log = logging.getLogger("mqtun.runtime")


def uring_available() -> bool:
    """Whether the io_uring mode can run here (the `liburing` binding imports)."""
    try:
        import liburing  # type: ignore[import-not-found,unused-ignore]  # noqa: F401
    except Exception:
        return False
    return True


# ---- the handler's side of the packet path ------------------------------------------------
def _log_fault(key: str, text: str) -> None:
    _log.error("packet handler fault (first of its kind): %s\n%s", key, text)


class HandlerFaults:
    """The first fault of each kind a handler makes -- an exception, or a result that is not
    a packet -- with its traceback, sent to `sink` (default: the `mqtun.runtime` logger).

    Rate limited: each kind once, and at most `burst` reports in any `window` seconds (a kind
    held back by that limit is reported when it happens again later). Never raises.
    """

    def __init__(self, sink: FaultSink | None = None, *, burst: int = 5, window: float = 10.0,
                 max_kinds: int = 1024) -> None:
        self.sink = sink or _log_fault
        self.burst = burst
        self.window = window
        self.max_kinds = max_kinds
        self.seen: set[str] = set()
        self._sent: collections.deque[float] = collections.deque()

    def _admit(self, key: str) -> bool:
        if key in self.seen or len(self.seen) >= self.max_kinds:
            return False
        now = time.monotonic()
        while self._sent and now - self._sent[0] >= self.window:
            self._sent.popleft()
        if len(self._sent) >= self.burst:
            return False
        self._sent.append(now)
        self.seen.add(key)
        return True

    def _send(self, key: str, text: str) -> None:
        with contextlib.suppress(Exception):
            self.sink(key, text)

    def exception(self, exc: BaseException) -> None:
        """The handler raised `exc`."""
        frames = traceback.extract_tb(exc.__traceback__)
        where = f" at {frames[-1].filename}:{frames[-1].lineno}" if frames else ""
        key = f"{type(exc).__name__}{where}"
        if self._admit(key):
            self._send(key, "".join(traceback.format_exception(exc)).rstrip())

    def bad_result(self, handler: object, value: object) -> None:
        """The handler returned `value`, which is not a packet."""
        code = getattr(handler, "__code__", None)
        where = f" ({code.co_filename}:{code.co_firstlineno})" if code is not None else ""
        name = getattr(handler, "__qualname__", type(handler).__name__)
        key = f"{name}{where} returned {type(value).__name__}"
        if self._admit(key):
            self._send(key, f"handler {name}{where} returned {type(value).__name__} "
                            f"{repr(value)[:100]}: a handler returns None (drop), a packet "
                            "(bytes, bytearray, memoryview) or a list of packets")


def _is_packet(p: object) -> bool:
    t = type(p)
    if t is bytes or t is bytearray:
        return True
    try:
        return memoryview(p).c_contiguous  # type: ignore[arg-type]
    except (TypeError, ValueError):  # no buffer (str, int, None), or a released view
        return False


def run_handler(handler: Handler, packet: bytes, counters: Counters,
                faults: HandlerFaults) -> Sequence[Buffer]:
    """Call `handler` on one packet and check what it gives back: the packets to write.

    Everything the handler does not turn into a packet is counted on `counters` (the reading
    queue's): an exception is HANDLER_ERROR, None or an empty list FILTERED, and each thing
    that is not a packet (a str, an int, a None in a list, ...) BAD_RESULT; faults go to
    `faults`. Never raises.
    """
    try:
        res = handler(packet)
    except Exception as exc:
        counters.drop(DropReason.HANDLER_ERROR)
        faults.exception(exc)
        return ()
    if type(res) is bytes:
        return (res,)
    if res is None:
        counters.drop(DropReason.FILTERED)
        return ()
    if _is_packet(res):
        return (res,)  # type: ignore[return-value]
    if isinstance(res, (list, tuple)):
        items: list[object] = list(res)
    elif isinstance(res, Iterable) and not isinstance(res, (str, dict)):
        try:
            items = list(res)  # a generator runs the handler's code: it may raise
        except Exception as exc:
            counters.drop(DropReason.HANDLER_ERROR)
            faults.exception(exc)
            return ()
    else:
        counters.drop(DropReason.BAD_RESULT)
        faults.bad_result(handler, res)
        return ()
    if not items:
        counters.drop(DropReason.FILTERED)
        return ()
    good = [p for p in items if _is_packet(p)]
    if len(good) < len(items):
        counters.drop(DropReason.BAD_RESULT, len(items) - len(good))
        faults.bad_result(handler, next(p for p in items if not _is_packet(p)))
    return good  # type: ignore[return-value]


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
    list/tuple of packets; it may raise, which counts the packet as a HANDLER_ERROR drop, and
    anything else it returns is a BAD_RESULT drop (`run_handler`).
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


def _close_fds(*fds: int) -> None:
    for fd in fds:
        with contextlib.suppress(OSError):
            os.close(fd)


class IOLoop:
    """Runs routes until `stop()` is called (safe from a signal handler or another thread).

    `on_fault` receives the first handler fault of each kind (default: logging). The loop's
    wake pipe is closed by `close()`, by `with IOLoop(...)`, or when the loop is collected.
    """

    def __init__(self, routes: Sequence[Route], config: LoopConfig | None = None, *,
                 on_fault: FaultSink | None = None) -> None:
        if not routes:
            raise InvalidArgumentError("an I/O loop needs at least one route")
        self.routes = list(routes)
        self.config = config or LoopConfig()
        self.faults = HandlerFaults(on_fault)
        self._stopping = False
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._finalizer = weakref.finalize(self, _close_fds, self._wake_r, self._wake_w)

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
        self._finalizer()
        self._wake_r = self._wake_w = -1

    def __enter__(self) -> IOLoop:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def run(self) -> None:
        """Serve the routes until stopped. Raises DeviceGoneError if a device disappears, and
        MqtunError (EBADF) if a queue is closed under it."""
        for r in self.routes:
            for q in (r.src, r.out):
                if q.closed:
                    raise MqtunError(errno.EBADF, f"queue of {q.device.name} is closed",
                                     op="read")
        mode = self.config.mode
        if mode == "uring":
            self._run_uring()
        elif mode == "naive":
            self._run_naive()
        else:
            self._run_polling()

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

    def _drainer(self, route: Route) -> Callable[[], int]:
        if route.handler is None:
            return _forward_drainer(route, self.config.batch)
        return _handler_drainer(route, self.config.batch, self.faults)

    # ---- epoll / adaptive / busy ----------------------------------------------------------
    def _run_polling(self) -> None:
        cfg = self.config
        drains = [self._drainer(r) for r in self.routes]
        by_fd = {r.src.fd: d for r, d in zip(self.routes, drains, strict=True)}
        ep = self._epoll()
        wake = self._wake_r
        busy = cfg.mode == "busy"
        spin = 0.0 if cfg.mode == "epoll" else cfg.spin_us / 1e6
        clock = time.perf_counter
        yield_cpu = os.sched_yield
        poll = ep.poll
        try:
            while not self._stopping:
                # drain everything that is queued, round-robin, `batch` packets per queue a turn
                moved = 0
                for d in drains:
                    moved += d()
                if moved:
                    continue
                if busy:
                    continue
                if spin:
                    until = clock() + spin
                    while clock() < until and not self._stopping:
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
                        self._drain_wake()
                    else:
                        by_fd[fd]()
        finally:
            ep.close()

    # ---- naive: the baseline ------------------------------------------------------------
    def _run_naive(self) -> None:
        """One packet per wake-up through the plain Queue API (read, then write)."""
        ep = self._epoll()
        routes = {r.src.fd: r for r in self.routes}
        wake = self._wake_r
        try:
            while not self._stopping:
                for fd, _ev in ep.poll(-1):
                    if fd == wake:
                        self._drain_wake()
                        continue
                    r = routes[fd]
                    try:
                        pkt = r.src.read(timeout=0)
                    except MqtunError as exc:
                        _raise_if_fatal(exc)
                        continue
                    if pkt is None:
                        continue
                    outs: Sequence[Buffer] = (
                        (pkt,) if r.handler is None
                        else run_handler(r.handler, pkt, r.src.counters, self.faults)
                    )
                    for p in outs:
                        try:
                            r.out.write(p)
                        except MqtunError as exc:  # counted by Queue.write
                            _raise_if_fatal(exc)
        finally:
            ep.close()

    def _run_uring(self) -> None:
        _run_uring(self)


# ---- errors --------------------------------------------------------------------------------
def _raise_if_fatal(exc: MqtunError) -> None:
    """A deleted device (DeviceGoneError) or a closed queue (EBADF) ends the loop; anything
    else was counted and the loop goes on. A detached queue is never fatal: it is only quiet
    (reads give EAGAIN) or refuses writes (EBUSY with NAPI), which are counted."""
    if isinstance(exc, DeviceGoneError) or exc.errno == errno.EBADF:
        raise exc


def _failure(q: Queue, exc: OSError, op: str) -> MqtunError:
    if exc.errno == errno.EBADF or q.closed:
        return MqtunError(errno.EBADF, f"queue of {q.device.name} is closed", op=op)
    return kernel_error(exc, op, q.device.name)


def _read_error(q: Queue, exc: OSError) -> None:
    """A read failed with something other than EAGAIN: count it; raise if fatal."""
    q.counters.slots[READ_ERRORS] += 1
    if exc.errno == errno.EINTR:
        return
    _raise_if_fatal(_failure(q, exc, "read"))  # anything else (e.g. ENOMEM): the loop goes on


def _write_error(q: Queue, exc: OSError) -> None:
    """Count a failed write on the writing queue as a write error and a drop; raise if fatal."""
    c: Counters = q.counters
    c.slots[WRITE_ERRORS] += 1
    c.drop(drop_reason(exc.errno))
    _raise_if_fatal(_failure(q, exc, "write"))


# ---- drainers: one closure per route, locals bound for speed -------------------------------
def _forward_drainer(route: Route, batch: int) -> Callable[[], int]:
    """src -> dst unchanged: read into a reused buffer, write a view of it (no copy)."""
    src, dst = route.src, route.dst
    assert dst is not None
    readinto = io.FileIO(src.fd, "r", closefd=False).readinto
    write = os.write
    out_fd = dst.fd
    buf = bytearray(src.read_size)
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
                    _write_error(dst, exc)
        except MqtunError:
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


def _handler_drainer(route: Route, batch: int, faults: HandlerFaults) -> Callable[[], int]:
    """src -> handler -> back to src (or dst): the handler gets a bytes object it may keep."""
    src = route.src
    out = route.out
    handler = route.handler
    assert handler is not None
    read = os.read
    write = os.write
    in_fd, out_fd = src.fd, out.fd
    size = src.read_size
    rslots = src.counters.slots
    wslots = out.counters.slots
    rcount = src.counters
    rh = src.header_size
    wh = out.header_size

    def drain() -> int:
        n = nbytes = sent = sbytes = 0
        try:
            while n < batch:
                try:
                    pkt = read(in_fd, size)
                except BlockingIOError:
                    break
                n += 1
                nbytes += len(pkt)
                for p in run_handler(handler, pkt, rcount, faults):
                    try:
                        sbytes += write(out_fd, p)
                        sent += 1
                    except OSError as exc:
                        _write_error(out, exc)
        except MqtunError:
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


# ---- io_uring ----------------------------------------------------------------------------
def _run_uring(loop: IOLoop) -> None:
    """io_uring through liburing: one read in flight per route; writes ride with re-arms.
    (A function of its own because it is long; it reads only the loop's public state.)"""
    import liburing as L  # type: ignore[import-not-found,unused-ignore]

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
    read_bufs = [bytearray(r.src.read_size) for r in routes]
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
    faults = loop.faults
    try:
        while not loop.stopping:
            with contextlib.suppress(Exception):  # timeouts and EINTR come as exceptions
                L.io_uring_wait_cqe_timeout(ring, cqe, ts)
            # one completion at a time: the binding's cqe[j] for j > 0 does not follow the
            # ring's wrap-around, so batch indexing misattributes completions
            results: list[tuple[int, int | None]] = []
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
                        _write_error(out, OSError(-res, os.strerror(-res)))
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
                    for p in run_handler(r.handler, pkt, r.src.counters, faults):
                        queue_write(i, r.out.fd, bytes(p))
                arm_read(i)
            L.io_uring_submit(ring)
    finally:
        L.io_uring_queue_exit(ring)
