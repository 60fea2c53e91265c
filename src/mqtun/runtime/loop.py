"""The per-queue I/O loop: drain queues in batches, move or answer packets, sleep adaptively.

A loop serves a few *routes*. A route reads packets from one queue and either writes them
to another queue (a forwarder) or hands them to a handler whose answer is written to the
other queue, or back **on the queue it was read from** (flow affinity: the kernel's flow
table learns a flow's queue from the queue that writes it, so each flow stays on one
worker). Every route runs on the one packet path (`mqtun.runtime.path.PacketPath`, driven by
`_path_drainer`): a drain is read, decoded into wire packets (or super-packets), handed to
the handler, its answers validated (`run_handler`), converted and coalesced for the writing
device, and written one writev per item. A forwarder between devices of the same layout
that does not coalesce writes each buffer as read (zero-copy).

Modes (`LoopConfig.mode`), all with exact per-queue counters:

- ``adaptive`` (the default): drain every ready queue up to `batch` packets, then keep asking
  epoll without waiting (one syscall for every queue), yielding the CPU between asks, before
  sleeping in epoll: for a window of at most `spin_us` that grows while packets keep coming
  soon after a sleep and shrinks to nothing when they do not (`SpinWindow`). Cuts the wake-up
  latency of request/response traffic; sparse traffic pays no spin.
- ``epoll``: drain in batches, sleep in epoll as soon as nothing is queued.
- ``busy``: never sleep (burns a core; for latency benchmarks).
- ``naive``: one packet per epoll wake-up (the same path, drains of one): the baseline.
- ``uring``: io_uring through the `liburing` binding, if importable: one read in flight per
  queue (more would reorder packets of a flow), each write submitted with the next read.

The loop never dies from bad input: a packet that cannot be written is counted as dropped
with its reason (`mqtun.stats.DropReason`) and the loop goes on; so is whatever a handler
returns that is not a packet, and whatever it raises. The first fault of each kind (with its
traceback) goes to `on_fault`, or to the `mqtun.runtime` logger, rate limited. The deletion of
a device ends `run()` with DeviceGoneError; a detached queue is only a quiet one.

Reads are counted as soon as a drain is read (before the handler runs), writes as they are
made; so a loop killed by SIGKILL loses at most the counts of the reads of one drain it was
reading and the writes of one drain it was writing, per route (at most `batch` packets
each). Each queue counts what the kernel counts (reads and writes: a super-packet once) and
the wire packets beside them (`read_wire_packets`, `written_wire_packets`); drops are wire
packets.
"""

from __future__ import annotations

import collections
import contextlib
import errno
import functools
import itertools
import logging
import operator
import os
import select
import sys
import time
import traceback
import weakref
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final

from mqtun import _uapi
from mqtun.errors import DeviceGoneError, InvalidArgumentError, MqtunError, kernel_error
from mqtun.packet.headers import Buffer
from mqtun.packet.vnet import ZERO_HEADER
from mqtun.queue import (
    RELAY_SLOTS,
    RelayDrain,
    count_segments_python,
    is_plain,
    relay_supers,
    serve,
    write_each,
)
from mqtun.runtime.path import Coalesce, Layout, Packet, PacketPath, PathCounter, SuperPacket
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
    from mqtun.device import Device
    from mqtun.queue import Queue

__all__ = [
    "DEFAULT_MODE",
    "MODES",
    "FaultSink",
    "Handler",
    "HandlerFaults",
    "IOLoop",
    "LoopConfig",
    "PacketIO",
    "QueueCounter",
    "Route",
    "SpinWindow",
    "drain_pipe",
    "layout_of",
    "run_handler",
    "serve_ready",
    "stop_flag",
    "uring_available",
    "watched_epoll",
]

MODES = ("adaptive", "epoll", "busy", "naive", "uring")
DEFAULT_MODE = "adaptive"
DEFAULT_BATCH = 64
DEFAULT_SPIN_US = 200  # the longest spin; the window adapts below it (`serve_ready`)

# What a handler may return: nothing (drop), one packet, or several packets. It gets a wire
# packet (a Buffer), a SuperPacket (super-packet mode) or a list of wire packets (batch).
Handler = Callable[[Any], object]
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


class _RouteCounter:
    """A route's `PathCounter`: reads and drops on the reading queue's counters, wire
    packets written on the writing queue's. While a handler's answer is judged, `bad` counts
    the wire packets `PacketPath.accept` refused (BAD_RESULT, HANDLER_ERROR), so that a
    batch's short answer counts only the rest as FILTERED."""

    __slots__ = ("bad", "judging", "read", "written")

    def __init__(self, read: Counters, written: Counters) -> None:
        self.read = read
        self.written = written
        self.judging = False
        self.bad = 0

    def drop(self, reason: DropReason, count: int = 1) -> None:
        if self.judging and reason in _REFUSED_ANSWER:
            self.bad += count
        self.read.drop(reason, count)

    def wire_read(self, count: int) -> None:
        self.read.wire_read(count)

    def wire_written(self, count: int) -> None:
        self.written.wire_written(count)


_REFUSED_ANSWER = (DropReason.BAD_RESULT, DropReason.HANDLER_ERROR)
_JOINABLE = _uapi.TUN_F_TSO4 | _uapi.TUN_F_TSO6 | _uapi.TUN_F_USO4 | _uapi.TUN_F_USO6
_WHOLE = (bytes, bytearray, memoryview, list, tuple, str, dict, SuperPacket)


def run_handler(handler: Callable[[Any], object], packet: object, path: PacketPath,
                faults: HandlerFaults, out: list[Packet], count: int = 1) -> int:
    """Call `handler` on `packet` (a wire packet, a SuperPacket, or a batch's list) and append
    the packets it answers with to `out`; return how many.

    The one validation step of every loop mode: `PacketPath.accept` judges the answer (None or
    an empty list is FILTERED, a thing that is not a packet of the source's kind BAD_RESULT);
    an exception, also from a generator the handler returns, is HANDLER_ERROR. Faults go to
    `faults`. Never raises. `count` is how many wire packets `packet` stands for (a batch's
    length, a super-packet's segments): a raise or a None drops them all, and a batch answered
    with fewer packets than it held counts the rest as FILTERED.
    """
    batch = type(packet) is list
    try:
        # a batch's list is the handler's to change in place: it gets a copy, and what it
        # returns is compared with the list as it was (`packet`, the caller's, left alone)
        res = handler(packet.copy() if batch else packet)  # type: ignore[attr-defined]
        if res is packet and count == 1:  # handed in, unchanged
            out.append(res)  # type: ignore[arg-type]
            return 1
        if res is not None and not isinstance(res, _WHOLE) and isinstance(res, Iterable):
            res = list(res)  # a generator runs the handler's code: it may raise
    except Exception as exc:
        path.counter.drop(DropReason.HANDLER_ERROR, count)
        faults.exception(exc)
        return 0
    if res is None or ((type(res) is list or type(res) is tuple) and not res):
        path.counter.drop(DropReason.FILTERED, count)
        return 0
    if (batch and (type(res) is list or type(res) is tuple)
            and len(res) == len(packet)  # type: ignore[arg-type]
            and all(map(operator.is_, res, packet))):  # type: ignore[call-overload]
        out.extend(res)  # a batch handed back unchanged: the packets it was given
        return len(res)
    counter = path.counter
    before = len(out)
    judge = counter if isinstance(counter, _RouteCounter) else None
    bad = 0
    if judge is not None:
        judge.judging = True
        bad = judge.bad
    try:
        taken = path.accept(res, out, handler=handler, faults=faults)  # it reports bad results
    finally:
        if judge is not None:
            judge.judging = False
    refused = judge.bad - bad if judge is not None else 0
    if count > 1 and (short := count - _wire(out, before) - refused) > 0:
        counter.drop(DropReason.FILTERED, short)
    return taken


def _wire(out: list[Packet], start: int) -> int:
    """How many wire packets the packets out[start:] hold."""
    return sum(p.segments if type(p) is SuperPacket else 1 for p in out[start:])


@dataclass(frozen=True)
class LoopConfig:
    """How a loop waits and drains. `mode` is one of MODES."""

    mode: str = DEFAULT_MODE
    batch: int = DEFAULT_BATCH  # most packets drained from one queue before looking at others
    spin_us: int = DEFAULT_SPIN_US  # adaptive: poll at most this long before sleeping

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
    """Packets read from `src` go to `dst`, through `handler` if one is given; a handler alone
    answers on `src` (flow affinity: the kernel's flow table follows the queue that writes a
    flow, so answering on another queue than `src` moves the flow there).

    Every route runs on the packet path (`mqtun.runtime.path.PacketPath`): the handler sees
    wire packets (no PI or virtio-net header, checksums complete, within the MTU), or with
    `super_packets` each read whole as a `SuperPacket`; with `batch` it gets the list of wire
    packets one drain held and returns an iterable of packets. What it returns is validated
    (`run_handler`), converted for the writing device (PI, virtio-net header, TAP to TUN) and,
    with `coalesce` (the default; "tcp": TCP segments only), joined into TSO/USO
    super-packets where that device takes them: only what one drain holds, datagram
    boundaries and in-flow order kept. Without a
    handler, super-packets pass whole.

    `layouts` (source, destination) default to what the queues' devices report
    (`Layout.of`); `ethernet` (source MAC, destination MAC) is what a TUN-to-TAP route puts
    in the frames it builds. A pair of layouts that cannot be converted is refused by
    `make_path` (InvalidArgumentError).
    """

    src: Queue
    dst: Queue | None = None
    handler: Callable[[Any], object] | None = None
    batch: bool = False
    super_packets: bool = False
    coalesce: Coalesce = True
    layouts: tuple[Layout, Layout] | None = None
    ethernet: tuple[bytes, bytes] | None = None

    def __post_init__(self) -> None:
        if self.dst is None and self.handler is None:
            raise InvalidArgumentError("a route needs a destination queue, a handler, or both")
        if self.batch and self.super_packets:
            raise InvalidArgumentError("a route's handler takes batches or super-packets, "
                                       "not both")

    @property
    def out(self) -> Queue:
        return self.dst if self.dst is not None else self.src

    @staticmethod
    def check(source: Layout, dest: Layout, *, batch: bool = False,
              super_packets: bool = False, coalesce: Coalesce = True,
              ethernet: tuple[bytes, bytes] | None = None) -> None:
        """Refuse (InvalidArgumentError) a route between layouts the path cannot convert."""
        PacketPath(source, dest, super_packets=super_packets, coalesce=coalesce,
                   ethernet=ethernet)

    def make_path(self, counter: PathCounter | None = None) -> PacketPath:
        """The packet path of this route (refuses a pair of devices it cannot convert)."""
        src_layout, dst_layout = self.layouts or (layout_of(self.src.device),
                                                  layout_of(self.out.device))
        return PacketPath(src_layout, dst_layout, counter=counter,
                          super_packets=self.super_packets, coalesce=self.coalesce,
                          ethernet=self.ethernet)


def layout_of(device: Device) -> Layout:
    """`Layout.of(device)`, with an MTU of 65535 where the device's link cannot be read from
    here (moved to another namespace): the bound on the wire packets a handler gets is then
    what a read can hold."""
    try:
        return Layout.of(device)
    except MqtunError:
        return Layout.of(device, mtu=65535)


class QueueCounter:
    """A path's counter for one queue: the queue's counters, whichever they are now (a pool
    swaps them for shared memory)."""

    __slots__ = ("queue",)

    def __init__(self, queue: Queue) -> None:
        self.queue = queue

    def drop(self, reason: DropReason, count: int = 1) -> None:
        self.queue.counters.drop(reason, count)

    def wire_read(self, count: int) -> None:
        self.queue.counters.wire_read(count)

    def wire_written(self, count: int) -> None:
        self.queue.counters.wire_written(count)


class PacketIO:
    """Wire packets in and out of one queue, for code that runs its own loop.

    `read()` drains up to `max_packets` reads and returns the wire packets they held (no PI
    or virtio-net header, super-packets split, checksums complete, within the MTU, as bytes
    the caller may keep); `write(packets)` converts them for the device and joins same-flow
    runs into TSO/USO super-packets where the device takes them (`coalesce`), one writev per
    super-packet. The header size and byte order are the device's own (TUNGETVNETHDRSZ,
    TUNGETVNETLE, via `Layout.of`); the layout is read once, here: make a new PacketIO after
    changing the device's offloads or header. Everything is counted on the queue: the
    kernel's figures (reads, writes) and the wire packets beside them, drops per wire packet.
    """

    def __init__(self, queue: Queue, *, coalesce: bool = True,
                 layout: Layout | None = None) -> None:
        self.queue = queue
        self.path = PacketPath(layout or layout_of(queue.device), counter=QueueCounter(queue),
                               coalesce=coalesce, views=False)

    def read(self, max_packets: int = 64, timeout: float | None = 0.0) -> list[bytes]:
        """The wire packets of up to `max_packets` reads (waiting up to `timeout` for the
        first; None waits for ever); empty if nothing came."""
        out: list[Buffer] = []
        for buf in self.queue.read_batch(max_packets, timeout):
            self.path.decode(buf, out)
        return out  # type: ignore[return-value]  # views=False: bytes

    def write(self, packets: Iterable[Buffer]) -> int:
        """Write wire packets (coalesced where the device takes it); return how many wire
        packets the kernel took. A thing that is not a packet of the device's kind is a
        BAD_RESULT drop; a refused write counts every wire packet it held. Every write is
        tried; the first failure is raised after the others (a deleted device at once)."""
        accepted: list[Packet] = []
        path = self.path
        for p in packets:
            path.accept(p, accepted)
        q = self.queue
        first: MqtunError | None = None
        written = 0
        for item in path.encode(accepted):
            try:
                q.writev(item.parts)
            except MqtunError as exc:  # Queue.writev counted the write error and one drop
                if item.packets > 1:
                    q.counters.drop(drop_reason(exc.errno), item.packets - 1)
                if isinstance(exc, DeviceGoneError) or exc.errno == errno.EBADF:
                    raise
                first = first or exc
                continue
            path.sent(item)
            written += item.packets
        if first is not None:
            raise first
        return written


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
        sources = [r.src for r in routes]
        for i, q in enumerate(sources):
            if any(q is other for other in sources[:i]):
                raise InvalidArgumentError(
                    f"two routes read the same queue of {q.device.known_name}: a queue has one "
                    "reader; give each route its own queue (or one handler for both jobs)")
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
        for q in self._queues():
            if q.closed:
                raise _closed(q)
        mode = self.config.mode
        if mode == "uring":
            self._run_uring()
        elif mode == "naive":
            self._run_naive()
        else:
            self._run_polling()

    # ---- helpers shared by the modes ------------------------------------------------------
    def _queues(self) -> list[Queue]:
        """Every queue the routes read or write, once."""
        seen: dict[int, Queue] = {}
        for r in self.routes:
            for q in (r.src, r.out):
                seen.setdefault(id(q), q)
        return list(seen.values())

    def _epoll(self, stack: contextlib.ExitStack, drain: Callable[[Route], Callable[[], int]],
               ) -> tuple[select.epoll, dict[int, Callable[[], object]]]:
        """An epoll on every route's queue (`watched_epoll`), and what to call for each fd it
        reports: a route's drain."""
        on: dict[int, Callable[[], object]] = {r.src.fd: drain(r) for r in self.routes}
        return watched_epoll(stack, on, self._queues(), self._wake_r), on

    def _drainer(self, route: Route, batch: int | None = None) -> Callable[[], int]:
        return _path_drainer(route, batch or self.config.batch, self.faults)

    # ---- epoll / adaptive / busy ----------------------------------------------------------
    def _run_polling(self) -> None:
        """Ask epoll which queues hold packets (one syscall for all of them, where reading
        each would be one per queue), drain those, and when none does, spin on that question
        (yielding the CPU between asks), then sleep in it: `serve_ready`."""
        with contextlib.ExitStack() as stack:
            ep, on = self._epoll(stack, self._drainer)
            cfg = self.config
            serve_ready(ep, on, stop_flag(self), busy=cfg.mode == "busy",
                        spin_us=0 if cfg.mode == "epoll" else cfg.spin_us)

    # ---- naive: the baseline ------------------------------------------------------------
    def _run_naive(self) -> None:
        """One packet per epoll wake-up (the same packet path, drains of one): the baseline."""
        with contextlib.ExitStack() as stack:
            ep, on = self._epoll(stack, lambda r: self._drainer(r, 1))
            while not self._stopping:
                for fd, _ev in ep.poll(-1):
                    on[fd]()

    def _run_uring(self) -> None:
        _run_uring(self)


# ---- waiting --------------------------------------------------------------------------------
SPIN_START_US = 50  # a loop's first spin window
SPIN_GROW_START_US = 10  # the first window after a spin had shrunk to nothing


class SpinWindow:
    """How long a loop asks again without waiting before it sleeps: at most `most_us`, and
    adapted as KVM's halt polling adapts its poll. A sleep that ended within `most_us` of
    the spin's start means a longer spin would have met the packet without a wake-up (the
    costly part of request/response traffic): the window doubles. A sleep that outlasted
    `most_us` means traffic is sparse and the spin only burned CPU: the window halves, to
    nothing. So a ping every millisecond costs no spin, and replies 120 us apart meet one.

    >>> w = SpinWindow(200)
    >>> w.seconds * 1e6, w.slept(120e-6) * 1e6, w.slept(130e-6) * 1e6
    (50.0, 100.0, 200.0)
    >>> tuple(round(w.slept(1e-3) * 1e6) for _ in range(6))
    (100, 50, 25, 12, 6, 0)
    """

    __slots__ = ("grow_start", "most", "seconds")

    def __init__(self, most_us: int) -> None:
        self.most = most_us / 1e6
        self.grow_start = min(self.most, SPIN_GROW_START_US / 1e6)
        self.seconds = min(self.most, SPIN_START_US / 1e6)

    def slept(self, waited: float) -> float:
        """A spin and the sleep after it took `waited` seconds in all: the next window."""
        if waited > self.most:
            self.seconds = self.seconds / 2 if self.seconds > self.grow_start else 0.0
        elif self.seconds < self.most:
            self.seconds = min(self.most, max(self.grow_start, 2 * self.seconds))
        return self.seconds


def stop_flag(owner: object) -> Callable[[], bool]:
    """`owner._stopping`, read without a Python frame (C callables only): `serve_ready` asks
    it every turn, and a lambda there cost 2% of a request/response worker (py-spy)."""
    return functools.partial(operator.attrgetter("_stopping"), owner)


def watched_epoll(stack: contextlib.ExitStack, on: dict[int, Callable[[], object]],
                  queues: Iterable[Queue], wake_r: int) -> select.epoll:
    """An epoll (closed with `stack`) on the fds of `on` (a source's fd -> its drain), the
    loop's wake pipe `wake_r` and each queue's close watch, the last two added to `on`: a
    close ends the loop with EBADF (a closed fd would only leave the epoll set, and the loop
    sleep on)."""
    ep = stack.enter_context(select.epoll())
    for q in queues:
        _fd, closed_fd = stack.enter_context(q.close_watch("read"))
        on.setdefault(closed_fd, functools.partial(_raise_closed, q))
    on[wake_r] = functools.partial(drain_pipe, wake_r)
    for fd in on:
        ep.register(fd, select.EPOLLIN)
    return ep


def serve_ready(ep: select.epoll, on: Mapping[int, Callable[[], object]],
                stopping: Callable[[], bool], *, busy: bool = False, spin_us: int = 0,
                ) -> None:
    """Until `stopping()`: ask `ep` which fds are ready (level-triggered, so a source left
    with packets is reported again) and call what `on` names for each; when none is, ask
    again without waiting for a `SpinWindow` (yielding the CPU between asks: anything else
    runnable goes first), then sleep in the ask. `busy` never sleeps; `spin_us=0` sleeps at
    once. In C where it is built (`mqtun._reads.serve`: the same turns, a `RelayDrain` called
    without a Python frame); this loop is its specification."""
    spin = SpinWindow(spin_us)
    if serve is not None:
        serve(ep.fileno(), dict(on), stopping, spin if spin_us else None, busy)
        return
    clock = time.perf_counter
    yield_cpu = os.sched_yield
    poll = ep.poll
    start = until = 0.0  # the current spin's start and end (0: not spinning)
    first = 0 if busy or spin_us else -1  # no spin: the one ask that also sleeps
    while not stopping():
        ready = poll(first)
        if not ready and not busy:
            if spin_us:
                now = clock()
                if not until:
                    start, until = now, now + spin.seconds
                if now < until:
                    yield_cpu()
                    continue
            ready = poll(-1)  # nothing ready: sleep until something is
            if spin_us:
                spin.slept(clock() - start)
        until = 0.0
        for fd, _ev in ready:
            on[fd]()


def drain_pipe(fd: int) -> None:
    """Empty a non-blocking wake pipe (its bytes only said "look again")."""
    with contextlib.suppress(OSError):
        while os.read(fd, 512):
            pass


# ---- errors --------------------------------------------------------------------------------
def _raise_if_fatal(exc: MqtunError) -> None:
    """A deleted device (DeviceGoneError) or a closed queue (EBADF) ends the loop; anything
    else was counted and the loop goes on. A detached queue is never fatal: it is only quiet
    (reads give EAGAIN) or refuses writes (EBUSY with NAPI), which are counted."""
    if isinstance(exc, DeviceGoneError) or exc.errno == errno.EBADF:
        raise exc


def _closed(q: Queue, op: str = "read") -> MqtunError:
    return MqtunError(errno.EBADF, f"queue of {q.device.known_name} is closed", op=op)


def _raise_closed(q: Queue) -> None:
    """A queue's close watch fired: the loop ends."""
    raise _closed(q)


def _failure(q: Queue, exc: OSError, op: str) -> MqtunError:
    if exc.errno == errno.EBADF or q.closed:
        return _closed(q, op)
    return kernel_error(exc, op, q.device.known_name)


def _read_error(q: Queue, exc: OSError) -> None:
    """A read failed with something other than EAGAIN: count it; raise if fatal."""
    q.counters.slots[READ_ERRORS] += 1
    if exc.errno == errno.EINTR:
        return
    _raise_if_fatal(_failure(q, exc, "read"))  # anything else (e.g. ENOMEM): the loop goes on


def _write_error(q: Queue, exc: OSError, packets: int = 1) -> None:
    """Count a failed write on the writing queue as a write error and a drop of every wire
    packet it held; raise if fatal."""
    c: Counters = q.counters
    c.slots[WRITE_ERRORS] += 1
    c.drop(drop_reason(exc.errno), packets)
    _raise_if_fatal(_failure(q, exc, "write"))


def _the_same(answers: list[Packet], start: int, wire: list[Buffer], first: int,
              end: int) -> bool:
    """Whether answers[start:] are wire[first:end], the very objects: a handler that returned
    them unchanged."""
    n = end - first
    if n == 1:  # a read of one packet, most reads of small packets
        return len(answers) - start == 1 and answers[start] is wire[first]
    return len(answers) - start == n and all(map(operator.is_, answers[start:], wire[first:end]))


# A plain forwarder joins a drain of at least this many reads (PacketPath.reads_joiner): a
# queue that backs up gives large drains, where joining pays (UDP 64 B 1.21x the C forwarder);
# the few reads of request/response traffic join nothing and would only pay for the look.
# Measured (docs/benchmarks.md): 8 buys 8-connection request/response nothing over 4, and
# never joining costs UDP 16%.
_JOIN_READS_MIN: Final = 4

# ---- drainers: one closure per route, locals bound for speed -------------------------------
def _path_drainer(route: Route, batch: int, faults: HandlerFaults) -> Callable[[], int]:
    """One drain of a route: read up to `batch` buffers, decode them into wire packets (or
    super-packets), hand them to the handler, encode the answers for the writing device
    (converted, coalesced) and write each with one writev. Counted per read and write (what
    the kernel counts) and per wire packet (`_RouteCounter`)."""
    src = route.src
    out = route.out
    counter = _RouteCounter(src.counters, out.counters)
    path = route.make_path(counter)
    handler = route.handler
    writev = os.writev
    out_fd = out.fd
    wslots = out.counters.slots
    wh = out.header_size
    decode = path.decode
    decode_original = path.decode_original
    keep_plain = not path.coalesces  # an unchanged plain packet is written as read
    may_join = path.may_join  # ... and one the path would not join (UDP with "tcp")
    decode_super = path.decode_super
    count_super = path.count_super
    encode = path.encode
    sent_item = path.sent
    zero = ZERO_HEADER
    whole = handler is None
    # without a handler, packets are read whole unless the writer could join them: then a
    # packet that is no super-packet (its gso_type byte is 0) is decoded as a wire packet
    gso_at = path.source.header_size - path.source.vnet_hdr_size + 1
    join = route.coalesce and bool(path.dest.vnet_hdr_size) and bool(
        path.dest.offloads & _JOINABLE) and bool(path.source.vnet_hdr_size)
    # ... and where there is nothing to convert either, buffers go out as they came in
    as_it_came = path.source == path.dest and route.ethernet is None  # a read fits `out`
    # ... joined in C where it is built (`reads_joiner`): still one write per buffer. With a
    # handler too, for a drain whose every packet it returned unchanged
    join_reads = path.reads_joiner() if join and as_it_came else None
    # a handler's drain of plain reads (one packet each, nothing to drop) is decoded in C
    decode_plain = None if whole else path.plain_decoder()
    same = whole and as_it_came and (not join or join_reads is not None)
    no_joins = itertools.repeat(0)
    vnet_in = bool(path.source.vnet_hdr_size)
    write_all = write_each  # (the C loop where it is built)
    wire_read = counter.wire_read
    wire_written = counter.wire_written
    supers = route.super_packets
    batched = route.batch
    relay_gso_at = gso_at if vnet_in else -1
    # a drain of super-packets is relayed too, their segments counted in C (a TCP stream's
    # drain), and one of many plain reads joined there, where nothing is converted and no
    # packet info is there to check
    source = path.source
    relayed_supers = relay_supers(
        source.header_size, 0, tap=source.tap, little_endian=sys.byteorder == "little"
        if source.vnet_le is None else source.vnet_le) if (
        same and vnet_in and not source.packet_info) else None  # fmt: skip

    def count_written(sent: int, sbytes: int, wire_out: int) -> None:
        """A drain's writes, counted once: `sent` buffers of `sbytes` bytes with their
        headers, holding `wire_out` wire packets."""
        if sent:
            wslots[WRITTEN_PACKETS] += sent
            wslots[WRITTEN_BYTES] += sbytes - wh * sent
        if wire_out:
            wire_written(wire_out)

    def write_reads(bufs: Sequence[Buffer], counts: Sequence[int] | None) -> None:
        """Write buffers that hold `counts` wire packets each (None: one each; counted read
        already), one write apiece (`write_each`: in one C call where it is built), count
        each failed one as it fails and the rest once."""
        sent = sbytes = wire_out = 0
        i, n = 0, len(bufs)
        try:
            while i < n:
                stop, nbytes, err = write_all(out_fd, bufs, i)
                sent += stop - i
                sbytes += nbytes
                wire_out += stop - i if counts is None else sum(counts[i:stop])
                if stop >= n:
                    break
                _write_error(out, OSError(err, os.strerror(err)), 1 if counts is None
                             else counts[stop])  # fmt: skip
                i = stop + 1
        finally:
            count_written(sent, sbytes, wire_out)

    def write_unchanged(reads: list[bytes], segments: list[int] | None) -> None:
        """The reads of a drain whose every packet a handler returned unchanged, holding
        `segments` wire packets each (None: one each), written as plain forward writes them:
        joined in C (`join_reads`) when the drain holds enough reads, else as read."""
        bufs, joined = join_reads(reads) if join_reads is not None and len(
            reads) >= _JOIN_READS_MIN else (reads, None)  # fmt: skip
        if joined is None:
            write_reads(reads, segments)
        elif segments is None:
            write_reads(bufs, [c or 1 for c in joined])
        else:  # a read that came back as it was holds its own segments
            of = {id(b): s for b, s in zip(reads, segments, strict=True)}
            write_reads(bufs, [c or of[id(b)] for b, c in zip(bufs, joined, strict=True)])

    def rest(bufs: list[bytes], failed: int, sent: int, werr: int) -> int:
        """What `RelayDrain` left of a drain: read (and counted) `bufs`, of which the first
        `sent` were relayed; `failed` and `werr` the errnos of a failed read and write."""
        n = len(bufs)
        if failed:  # raises if fatal; the buffers read before are served
            _read_error(src, OSError(failed, os.strerror(failed)))
        if sent == n:
            return n
        if werr:  # a relayed write failed: counted once (never tried again), then the rest;
            # each buffer by its segments, counted by the one parser: after a join they are
            # the joined buffers, which C's count may leave to Python (a VLAN-tagged frame)
            segs = [max(1, count_segments_python(b, relay_gso_at, relayed_supers))
                    for b in bufs[sent:]]
            _write_error(out, OSError(werr, os.strerror(werr)), segs[0])
            write_reads(bufs[sent + 1:], segs[1:])
            return n
        answers: list[Packet] = []
        if same:  # no handler, nothing to convert: each buffer is written as read (or joined)
            joined: Iterable[int] | None = None
            if join_reads is not None and n >= _JOIN_READS_MIN:
                bufs, joined = join_reads(bufs)  # type: ignore[assignment]
            keep: list[Buffer] = []  # what is written, and the wire packets each holds
            counts: list[int] = []
            plain = 0  # counted once a drain, not per packet
            for b, count in zip(bufs, joined or no_joins, strict=False):
                if count:  # `count` plain reads joined into one super-packet
                    plain += count
                elif not is_plain(b, relay_gso_at):
                    count = count_super(b)  # counts its wire packets read (0: dropped)
                    if not count:
                        continue
                else:
                    plain += 1
                    count = 1
                keep.append(b)
                counts.append(count)
            if plain:
                wire_read(plain)
            write_reads(keep, counts)
            return n
        if whole:  # no handler: super-packets pass whole, plain packets may be joined
            for b in bufs:
                if join and is_plain(b, gso_at):
                    # a wire packet (its checksum completed): the writer may join it
                    decode(b, answers)  # type: ignore[arg-type]
                    continue
                sp = decode_super(b)
                if sp is not None:
                    answers.append(sp.data if sp.offload is zero else sp)
        elif supers:
            for b in bufs:
                sp = decode_super(b)
                if sp is not None:
                    run_handler(handler, sp, path, faults, answers,  # type: ignore[arg-type]
                                sp.segments)
        elif (singles := decode_plain(bufs) if decode_plain is not None else None) is not None:
            # one wire packet per read: a handler that returns them all unchanged (the same
            # objects) has the reads written as a plain forwarder writes them (joined in C
            # when the drain is large enough), any other answer is encoded below
            if batched:
                run_handler(handler, singles, path, faults, answers, n)  # type: ignore[arg-type]
            else:
                for packet in singles:
                    run_handler(handler, packet, path, faults, answers)  # type: ignore[arg-type]
            if as_it_came and _the_same(answers, 0, singles, 0, n):
                write_unchanged(bufs, None)
                return n
        else:
            # wire packets to the handler; a read whose packets all come back unchanged (the
            # same objects) is written as it was read (`decode_original`): no coalescing
            wire: list[Buffer] = []
            reads: list[tuple[int, int, SuperPacket, bytes]] = []
            for b in bufs:
                first = len(wire)
                original = decode_original(b, wire)
                if original is not None:
                    reads.append((first, len(wire), original, b))
            # ... where nothing could be joined to it anyway: a super-packet, a packet the path
            # does not join, or any read when the path does not coalesce or the drain holds
            # no other read
            alone = keep_plain or len(reads) == 1
            as_read = [alone or original.offload.gso_type or not may_join(wire[first])
                       for first, _, original, _ in reads]
            # and when every read of the drain is written as read, between devices of one
            # layout, the buffers themselves go out (bytes: decoding did not change them)
            raw = as_it_came
            unchanged = True  # every packet of the drain came back, the same objects
            if batched:
                if wire:
                    run_handler(handler, wire, path, faults, answers,  # type: ignore[arg-type]
                                len(wire))
                    if _the_same(answers, 0, wire, 0, len(wire)):
                        answers = []
                        for (first, end, original, _), whole_read in zip(
                                reads, as_read, strict=True):
                            if whole_read:
                                answers.append(original)
                            else:
                                answers.extend(wire[first:end])
                                raw = False
                    else:
                        raw = unchanged = False
            else:
                for (first, end, original, _), whole_read in zip(reads, as_read, strict=True):
                    start = len(answers)
                    for j in range(first, end):
                        run_handler(handler, wire[j], path, faults,  # type: ignore[arg-type]
                                    answers)
                    if _the_same(answers, start, wire, first, end):
                        if whole_read:
                            answers[start:] = [original]
                        else:
                            raw = False
                    else:
                        raw = unchanged = False
            if raw and answers:  # counted once a drain, as the plain path does
                write_reads([b for *_, b in reads], [r[2].segments for r in reads])
                return n
            if unchanged and join_reads is not None and len(reads) >= _JOIN_READS_MIN:
                # the reads themselves, as a plain forwarder writes them: what encoding the
                # same packets would write, without decoding them again
                write_unchanged([b for *_, b in reads], [r[2].segments for r in reads])
                return n
        if answers:
            sent = sbytes = 0
            try:
                for item in encode(answers):
                    try:
                        sbytes += writev(out_fd, item.parts)
                    except OSError as exc:
                        _write_error(out, exc, item.packets)
                    else:
                        sent += 1
                        sent_item(item)
            finally:
                count_written(sent, sbytes, 0)  # (each item's wire packets: sent_item)
        return n

    # every drain starts in `RelayDrain` (in C where it is built): read and counted, and a
    # drain holding no read it cannot count is written in the same call that read it (joined
    # first when it holds enough plain reads), as the C forwarder writes: request/response
    # traffic, a TCP stream's super-packets, a UDP flood's datagrams, with no Python frame
    return RelayDrain(src.fd, src.read_size, batch, out_fd,
                      (_JOIN_READS_MIN - 1 if join_reads is not None else batch) if same else 0,
                      relay_gso_at, src.counters.slots, wslots, RELAY_SLOTS,
                      src.header_size, wh, rest, supers=relayed_supers,
                      join=join_reads if relayed_supers is not None else None)


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
    paths = [r.make_path(_RouteCounter(r.src.counters, r.out.counters)) for r in routes]
    pending_writes: dict[int, Any] = {}
    next_tag = 1
    ts = L.timespec(0.2)  # wake at least every 0.2 s to see stop()

    def arm_read(i: int) -> None:
        sqe = L.io_uring_get_sqe(ring)
        L.io_uring_prep_read(sqe, routes[i].src.fd, read_bufs[i])
        sqe.user_data = i << 32

    def queue_write(i: int, fd: int, data: Any, packets: int = 1) -> None:
        nonlocal next_tag
        sqe = L.io_uring_get_sqe(ring)
        if sqe is None:
            L.io_uring_submit(ring)
            sqe = L.io_uring_get_sqe(ring)
        tag = (i << 32) | next_tag
        next_tag = next_tag % 0x7FFFFFFF + 1
        L.io_uring_prep_write(sqe, fd, data)
        sqe.user_data = tag
        pending_writes[tag] = (data, packets)

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
                    _data, packets = pending_writes.pop(tag, (None, 1))
                    out = r.out
                    if res is not None and res < 0:
                        _write_error(out, OSError(-res, os.strerror(-res)), packets)
                    else:
                        out.counters.wire_written(packets)
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
                path = paths[i]
                answers: list[Packet] = []
                if r.handler is None:
                    sp = path.decode_super(pkt)
                    if sp is not None:
                        answers.append(sp.data if sp.offload is ZERO_HEADER else sp)
                elif r.super_packets:
                    sp = path.decode_super(pkt)
                    if sp is not None:
                        run_handler(r.handler, sp, path, faults, answers, sp.segments)
                else:
                    wire: list[Buffer] = []
                    path.decode(pkt, wire)
                    if r.batch and wire:
                        run_handler(r.handler, wire, path, faults, answers, len(wire))
                    else:
                        for p in wire:
                            run_handler(r.handler, p, path, faults, answers)
                for item in path.encode(answers):
                    queue_write(i, r.out.fd, b"".join(item.parts), item.packets)
                arm_read(i)
            L.io_uring_submit(ring)
    finally:
        L.io_uring_queue_exit(ring)
