"""One worker process per queue: start, pin, supervise, restart, grow and shrink.

Threads cannot run Python packet handlers in parallel (the GIL), so each queue (or each pair
of queues, for a forwarder) gets a process of its own. Workers are forked: a forked child
inherits the queue fds as they are, so no fd needs passing. At once it lets go of every other
fd it inherited -- other queues and devices, sockets, files, other pools' pipes: a copy left
open in a worker would keep a closed queue or device alive in the kernel -- keeping only its
queues, its report pipe, stdin/stdout/stderr and the pool's `keep_fds`. (Each other fd
number is pointed at /dev/null rather than freed, so an inherited Python object that closes
"its" fd later cannot close a number the worker reuses.) Its signal state is its own: no
inherited Python signal handler, `signal.set_wakeup_fd` or blocked signal. The parent keeps
its own copy of every queue fd, which is what lets it restart a crashed worker on the *same*
queue without the kernel noticing: the queue's flows stay put.

Counters live in a shared-memory region (`mqtun.runtime.shm`); the parent's `Queue.counters`
are swapped for views of it, so `queue.stats` in the parent is live, and `mqtun show` or
`mqtun top` read the same figures from another process. A worker publishes its reads as soon
as a drain is read and its writes as they are made, so a worker killed by SIGKILL loses the
counts of at most one drain per route (`LoopConfig.batch` packets); everything published
before stays in the region and its restarted successor counts on from there.

Exit codes of a worker: 0 stopped on request, 3 its device is gone, anything else (or a
signal) a crash, which is reported as an event and restarted on its queue.

A handler fault never kills a worker (`mqtun.runtime.loop.run_handler` counts it as a drop);
the first fault of each kind is sent to the parent, which logs it (logger `mqtun.runtime`)
and reports it as a "handler-error" event with its traceback.

Fork caveats: start pools from the thread that will outlive them (a worker's parent-death
signal fires when the *thread* that forked it exits), and not while another thread of yours
holds a lock the worker's handler needs.
"""

from __future__ import annotations

import collections
import contextlib
import ctypes
import logging
import os
import select
import signal
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from mqtun import _uapi
from mqtun.errors import DeviceGoneError, InvalidArgumentError, MqtunError
from mqtun.packet import accel
from mqtun.packet.checksum import numpy as load_numpy
from mqtun.runtime.loop import Handler, IOLoop, LoopConfig, Route, drain_pipe, layout_of
from mqtun.runtime.path import Coalesce
from mqtun.runtime.shm import EntryState, Region
from mqtun.stats import QueueStats

if TYPE_CHECKING:
    from mqtun.device import Device
    from mqtun.queue import Queue
    from mqtun.runtime.path import Layout

__all__ = ["EXIT_GONE", "WorkerEvent", "WorkerInfo", "WorkerPool", "parse_cpus"]

EXIT_STOPPED = 0
EXIT_CRASHED = 1
EXIT_GONE = 3
_STOP_GRACE = 0.6  # seconds a worker gets to stop before SIGKILL
_log = logging.getLogger("mqtun.runtime")


def parse_cpus(spec: str | Sequence[int] | None) -> list[int] | None:
    """CPU list for pinning: None (no pinning), "auto" (every CPU we may use), "0-3,6" or a list."""
    if spec is None:
        return None
    allowed = sorted(os.sched_getaffinity(0))
    if isinstance(spec, str):
        if spec == "auto":
            return allowed
        out: list[int] = []
        try:
            for part in spec.split(","):
                part = part.strip()
                if "-" in part:
                    lo, hi = part.split("-", 1)
                    out.extend(range(int(lo), int(hi) + 1))
                elif part:
                    out.append(int(part))
        except ValueError:
            raise InvalidArgumentError(
                f"CPU list {spec!r}: use numbers and ranges like 0-3,6"
            ) from None
    else:
        out = [int(c) for c in spec]
    if not out:
        raise InvalidArgumentError("the CPU list is empty")
    bad = [c for c in out if c not in allowed]
    if bad:
        raise InvalidArgumentError(
            f"CPU {bad[0]} is not available to this process (allowed: "
            f"{','.join(map(str, allowed))})"
        )
    return out


@dataclass(frozen=True)
class WorkerEvent:
    """Something that happened to a worker: started, crashed, restarted, stopped, gone,
    gave-up (too many crashes: its queue is detached), grown, shrunk, handler-error (the
    first fault of its kind in a handler; `detail` holds the traceback)."""

    kind: str
    worker: int
    pid: int
    detail: str = ""
    time: float = field(default_factory=time.time)

    def __str__(self) -> str:
        tail = f": {self.detail}" if self.detail else ""
        return f"worker {self.worker} (pid {self.pid}) {self.kind}{tail}"


@dataclass
class WorkerInfo:
    """What a worker is given: its slot number, its queues (one per device) and its CPU."""

    index: int
    queues: tuple[Queue, ...]
    cpu: int | None = None
    pid: int = 0
    restarts: int = 0
    entries: tuple[int, ...] = ()
    state: EntryState = EntryState.STARTING
    pidfd: int = -1
    last_report: tuple[str, str] | None = None
    crash_times: collections.deque[float] = field(
        default_factory=lambda: collections.deque(maxlen=16))

    @property
    def stats(self) -> list[QueueStats]:
        """Live counters of this worker's queues (read from shared memory)."""
        return [q.stats for q in self.queues]

    @property
    def alive(self) -> bool:
        return self.state in (EntryState.STARTING, EntryState.RUNNING)


# Builds the routes of one worker, in the worker process, from its WorkerInfo.
Program = Callable[[WorkerInfo], list[Route]]


def serve_program(handler: Handler | None = None,
                  make_handler: Callable[[WorkerInfo], Handler] | None = None,
                  **route: object) -> Program:
    """Answer each packet on the queue it came from (flow affinity). `route` holds the
    `Route` options (batch, super_packets, coalesce, layouts)."""
    if (handler is None) == (make_handler is None):
        raise InvalidArgumentError("give either handler or make_handler")

    def build(info: WorkerInfo) -> list[Route]:
        h = handler if handler is not None else make_handler(info)  # type: ignore[misc]
        return [Route(q, handler=h, **route) for q in info.queues]  # type: ignore[arg-type]

    return build


def forward_program(handler_ab: Handler | None = None, handler_ba: Handler | None = None,
                    *, layouts: tuple[Layout, Layout] | None = None,
                    **route: object) -> Program:
    """Move packets both ways between the worker's two queues: through `handler_ab` from
    A to B and `handler_ba` from B to A (unchanged where None). `layouts` are A's and B's."""

    def build(info: WorkerInfo) -> list[Route]:
        a, b = info.queues
        la, lb = layouts if layouts is not None else (layout_of(a.device), layout_of(b.device))
        return [Route(a, dst=b, handler=handler_ab, layouts=(la, lb), **route),  # type: ignore[arg-type]
                Route(b, dst=a, handler=handler_ba, layouts=(lb, la), **route)]  # type: ignore[arg-type]

    return build


class WorkerPool:
    """A worker process per queue (or per queue pair) of one or more devices.

    Build one with `WorkerPool.serve(dev, handler)` or `WorkerPool.forward(dev_a, dev_b)`,
    then `start()`, `run()` (or call `poll()` from your own loop), `stop()`. Also a context
    manager. Nothing here prints, exits or installs signal handlers: events go to `on_event`
    and to `events`.
    """

    def __init__(
        self,
        devices: Sequence[Device],
        program: Program,
        *,
        cpus: str | Sequence[int] | None = None,
        loop: LoopConfig | None = None,
        name: str = "pool",
        restart: bool = True,
        max_restarts: int = 5,
        restart_window: float = 10.0,
        capacity: int = 256,
        on_event: Callable[[WorkerEvent], None] | None = None,
        keep_fds: Sequence[int] = (),
    ) -> None:
        """`keep_fds`: fds of the parent the handlers use (e.g. a socket opened before
        `start()`); a worker holds no other fd of the parent's."""
        if not devices:
            raise InvalidArgumentError("a worker pool needs at least one device")
        self.devices = list(devices)
        self.program = program
        self.cpus = parse_cpus(cpus)
        self.loop_config = loop or LoopConfig()
        self.name = name
        self.restart = restart
        self.max_restarts = max_restarts
        self.restart_window = restart_window
        self.capacity = capacity
        self.on_event = on_event
        self.keep_fds = tuple(keep_fds)
        self.workers: list[WorkerInfo] = []
        self.events: collections.deque[WorkerEvent] = collections.deque(maxlen=1000)
        self.region: Region | None = None
        self.gone: list[str] = []  # devices that disappeared under a worker
        self._stop_requested = False
        self._wake_r = self._wake_w = -1
        self._report_r = self._report_w = -1
        self._report_buf = b""
        self._started = False
        self._owner_pid = os.getpid()
        self._next_index = 0
        self._faults_seen: set[str] = set()

    # ---- constructors ---------------------------------------------------------------------
    @classmethod
    def serve(
        cls,
        device: Device,
        handler: Handler | None = None,
        *,
        make_handler: Callable[[WorkerInfo], Handler] | None = None,
        batch: bool = False,
        super_packets: bool = False,
        coalesce: Coalesce | None = None,
        **kwargs: object,
    ) -> WorkerPool:
        """A worker per queue of `device`, answering each packet on the queue it read from.

        The handler gets wire packets (no PI or virtio-net header, checksums complete, within
        the MTU); with `batch` the list of them one drain held; with `super_packets` each read
        whole as a `SuperPacket`. Its answers are coalesced into TSO/USO super-packets where
        the device takes them (`coalesce`: True TCP and UDP, the default; "tcp" TCP only;
        False none). See `Route`."""
        if coalesce is None:
            coalesce = True
        layout = layout_of(device)
        opts = {"batch": batch, "super_packets": super_packets, "coalesce": coalesce,
                "layouts": (layout, layout)}
        Route.check(layout, layout, batch=batch, super_packets=super_packets,
                    coalesce=coalesce)
        program = serve_program(handler, make_handler, **opts)
        return cls([device], program, **kwargs)  # type: ignore[arg-type]

    @classmethod
    def forward(
        cls,
        dev_a: Device,
        dev_b: Device,
        handler: Handler | None = None,
        *,
        handler_ab: Handler | None = None,
        handler_ba: Handler | None = None,
        batch: bool = False,
        super_packets: bool = False,
        coalesce: Coalesce | None = None,
        ethernet: tuple[bytes, bytes] | None = None,
        **kwargs: object,
    ) -> WorkerPool:
        """A worker per queue pair (a_i, b_i), a middlebox: what `handler` returns for a
        packet read on one side is written to the other (`handler_ab`, `handler_ba`: one
        direction each; without a handler packets move unchanged, super-packets whole).

        Devices whose headers differ are converted (PI, virtio-net header, TAP to TUN; TUN to
        TAP with `ethernet=(source MAC, destination MAC)`) or refused here. Where the writing
        device takes TSO/USO super-packets, what one drain holds is coalesced (`coalesce`:
        True TCP and UDP, "tcp" TCP only; default True, except without a handler where the C
        loop is not built: there decoding and joining in Python measured slower than writing
        each buffer as read)."""
        if handler is not None and (handler_ab is not None or handler_ba is not None):
            raise InvalidArgumentError("give handler (both ways) or handler_ab/handler_ba")
        ab = handler if handler is not None else handler_ab
        ba = handler if handler is not None else handler_ba
        if coalesce is None:
            coalesce = ab is not None or ba is not None or accel.coalesce_reads() is not None
        la, lb = layout_of(dev_a), layout_of(dev_b)
        opts = {"batch": batch, "super_packets": super_packets, "coalesce": coalesce,
                "ethernet": ethernet}
        Route.check(la, lb, **opts)  # type: ignore[arg-type]
        Route.check(lb, la, **opts)  # type: ignore[arg-type]
        program = forward_program(ab, ba, layouts=(la, lb), **opts)
        return cls([dev_a, dev_b], program, **kwargs)  # type: ignore[arg-type]

    # ---- lifecycle ------------------------------------------------------------------------
    def start(self) -> WorkerPool:
        """Create the counters region and start a worker for every queue already open."""
        if self._started:
            raise InvalidArgumentError("this pool is already started")
        units = self._open_units()
        if not units:
            raise InvalidArgumentError("no open queues to run workers on")
        self.region = Region.create(
            f"{self.name}.{id(self) & 0xFFFF:04x}" if self.name == "pool" else self.name,
            [d.name for d in self.devices], self.capacity * len(self.devices),
        )
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._report_r, self._report_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._started = True
        try:
            for unit in units:
                self._add_worker(unit)
        except BaseException:
            self.stop()
            raise
        return self

    def _open_units(self) -> list[tuple[Queue, ...]]:
        per_dev = [[q for q in d.active_queues if q is not None and not q.closed]
                   for d in self.devices]
        n = min(len(qs) for qs in per_dev)
        return [tuple(qs[i] for qs in per_dev) for i in range(n)]

    def _add_worker(self, queues: tuple[Queue, ...]) -> WorkerInfo:
        assert self.region is not None
        index = self._next_index
        self._next_index += 1
        cpu = self.cpus[index % len(self.cpus)] if self.cpus else None
        entries = []
        for d, q in enumerate(queues):
            e = self.region.claim(d, index)
            shm = self.region.counters(e)
            shm.slots[:] = q.counters.slots  # keep what the queue counted before
            q.counters = shm
            entries.append(e)
        info = WorkerInfo(index, queues, cpu, entries=tuple(entries))
        self.workers.append(info)
        self._spawn(info)
        self._event("started", info)
        return info

    def _spawn(self, info: WorkerInfo) -> None:
        assert self.region is not None
        keep = {0, 1, 2, self._report_w, *self.keep_fds, *(q.fd for q in info.queues)}
        parent = os.getpid()
        pid = os.fork()
        if pid == 0:  # the worker
            code = EXIT_CRASHED
            try:
                code = _worker_main(info, self.program, self.loop_config, keep, parent,
                                    self._report_w)
            finally:
                os._exit(code)
        info.pid = pid
        info.state = EntryState.RUNNING
        if info.cpu is not None:  # the child pins itself too; this makes it true on return
            with contextlib.suppress(OSError):
                os.sched_setaffinity(pid, {info.cpu})
        try:
            info.pidfd = os.pidfd_open(pid)
        except OSError:
            info.pidfd = -1
        for e in info.entries:
            self.region.set_worker(e, pid=pid, state=EntryState.RUNNING,
                                   restarts=info.restarts, cpu=info.cpu)

    def run(self, until: Callable[[], bool] | None = None, *, stop_on_gone: bool = True) -> None:
        """Supervise until `request_stop()` (e.g. from a signal handler) or `until()` is true,
        or a device is gone (unless `stop_on_gone` is False: then the pool keeps supervising
        the workers that are left, and sleeps when none is). Does not stop the workers: call
        `stop()` after."""
        while (not self._stop_requested and not (stop_on_gone and self.gone)
               and not (until and until())):
            self.poll(0.5 if until is None else 0.05)

    def request_stop(self) -> None:
        """Make `run()` return soon. Safe in a signal handler."""
        self._stop_requested = True
        with contextlib.suppress(OSError):
            os.write(self._wake_w, b"\0")

    def wake(self) -> None:
        """Wake a `poll()` in progress (e.g. from a signal handler that wants stats printed)."""
        with contextlib.suppress(OSError):
            os.write(self._wake_w, b"\0")

    @property
    def stop_requested(self) -> bool:
        return self._stop_requested

    def poll(self, timeout: float | None = 0.0) -> list[WorkerEvent]:
        """Wait up to `timeout` for a worker to exit or report; handle it (restart a crashed
        worker on its queue). Returns the events that happened."""
        before = len(self.events)
        live = [w for w in self.workers if w.alive]
        poller = select.poll()  # not select(): pidfds may be numbered past 1024
        for fd in [self._wake_r, self._report_r] + [w.pidfd for w in live if w.pidfd >= 0]:
            poller.register(fd, select.POLLIN)
        try:
            ready = [fd for fd, _ in poller.poll(None if timeout is None else timeout * 1000)]
        except InterruptedError:
            ready = []
        if self._wake_r in ready:
            drain_pipe(self._wake_r)
        self._read_reports()
        for w in live:
            if w.pidfd < 0 or w.pidfd in ready or not ready:
                self._reap(w)
        self._read_reports()
        return list(self.events)[before:] if len(self.events) >= before else []

    def _read_reports(self) -> None:
        try:
            while True:
                chunk = os.read(self._report_r, 65536)
                if not chunk:
                    break
                self._report_buf += chunk
        except OSError:
            pass
        *lines, self._report_buf = self._report_buf.split(b"\n")
        for line in lines:
            try:
                index, _pid, kind, detail = line.decode(errors="replace").split("\t", 3)
                w = self._by_index(int(index))
            except ValueError:
                continue
            if w is None:
                continue
            if kind == "fault":
                self._fault(w, _unescape(detail))
            else:
                w.last_report = (kind, detail)

    def _fault(self, w: WorkerInfo, text: str) -> None:
        """A worker's handler fault: log it and make it an event, the first of each kind."""
        key = text.split("\n", 1)[0]
        if key in self._faults_seen or len(self._faults_seen) >= 1024:
            return
        self._faults_seen.add(key)
        _log.error("worker %d (pid %d) packet handler fault: %s", w.index, w.pid,
                   text.split("\n", 1)[-1])
        self._event("handler-error", w, text)

    def _by_index(self, index: int) -> WorkerInfo | None:
        for w in self.workers:
            if w.index == index:
                return w
        return None

    def _reap(self, w: WorkerInfo) -> None:
        try:
            pid, status = os.waitpid(w.pid, os.WNOHANG)
        except ChildProcessError:
            pid, status = w.pid, 0
        if pid == 0:
            return
        self._close_pidfd(w)
        code = os.waitstatus_to_exitcode(status)
        report, w.last_report = w.last_report, None
        if code == EXIT_STOPPED and not self._stop_requested:
            self._mark(w, EntryState.STOPPED)
            self._event("stopped", w, "exited by itself")
        elif code == EXIT_STOPPED:
            self._mark(w, EntryState.STOPPED)
            self._event("stopped", w)
        elif code == EXIT_GONE:
            self._mark(w, EntryState.GONE)
            detail = report[1] if report else "its device is gone"
            self.gone.append(detail)
            self._event("gone", w, detail)
        else:
            why = f"killed by {signal.Signals(-code).name}" if code < 0 else f"exit code {code}"
            if report:
                why += f": {report[1]}"
            self._mark(w, EntryState.CRASHED)
            self._event("crashed", w, why)
            self._maybe_restart(w)

    def _maybe_restart(self, w: WorkerInfo) -> None:
        if not self.restart or self._stop_requested:
            return
        now = time.monotonic()
        w.crash_times.append(now)
        recent = [t for t in w.crash_times if now - t < self.restart_window]
        if len(recent) > self.max_restarts:
            self._event("gave-up", w, f"{len(recent)} crashes in {self.restart_window:g} s; "
                                      "its queue is detached")
            for q in w.queues:
                with contextlib.suppress(MqtunError):
                    if q.device.multi_queue and q.enabled:
                        q.disable()
            return
        old = w.pid
        w.restarts += 1
        self._spawn(w)
        self._event("restarted", w, f"replaces pid {old}")

    def _mark(self, w: WorkerInfo, state: EntryState) -> None:
        w.state = state
        if self.region is not None:
            for e in w.entries:
                self.region.set_worker(e, state=state)

    def _close_pidfd(self, w: WorkerInfo) -> None:
        if w.pidfd >= 0:
            with contextlib.suppress(OSError):
                os.close(w.pidfd)
            w.pidfd = -1

    def _event(self, kind: str, w: WorkerInfo, detail: str = "") -> None:
        ev = WorkerEvent(kind, w.index, w.pid, detail)
        self.events.append(ev)
        if self.on_event is not None:
            self.on_event(ev)

    # ---- grow and shrink ------------------------------------------------------------------
    def grow(self, count: int = 1) -> list[WorkerInfo]:
        """Open one more queue on each device and start a worker on it, `count` times.

        The new queues take the next kernel indices; no existing queue moves, so existing
        flows keep their queues (new flows may hash to the new queues).
        """
        self._require_started()
        added = []
        for _ in range(count):
            opened: list[Queue] = []
            try:
                for d in self.devices:
                    opened.append(d.add_queue())
            except BaseException:
                for q in opened:
                    q.device.remove_queue(q)
                raise
            added.append(self._add_worker(tuple(opened)))
        return added

    def shrink(self, count: int = 1) -> list[WorkerInfo]:
        """Stop the worker on the highest queue index and close its queues, `count` times.

        The highest index goes first because the kernel moves the last queue into a freed
        slot: removing the last one moves nobody, so every other queue keeps its flows. Its
        queues are detached before the worker stops, so the kernel steers their flows
        elsewhere at once.
        """
        self._require_started()
        removed = []
        for _ in range(count):
            live = [w for w in self.workers if w.alive]
            if len(live) <= 1:
                raise InvalidArgumentError("cannot shrink below one worker")
            w = max(live, key=lambda x: (_index_or(x.queues[0].index, -1), x.index))
            for q in w.queues:
                with contextlib.suppress(MqtunError):
                    if q.device.multi_queue and q.enabled:
                        q.disable()
            self._stop_workers([w])
            self._retire(w)
            self._event("shrunk", w)
            removed.append(w)
        return removed

    def _retire(self, w: WorkerInfo) -> None:
        """Give a stopped worker's queues private counters again and close them."""
        for q, e in zip(w.queues, w.entries, strict=True):
            q.counters = q.counters.copy()
            if self.region is not None:
                self.region.release(e)
            q.device.remove_queue(q)
        self.workers.remove(w)

    # ---- stopping -------------------------------------------------------------------------
    def stop(self, timeout: float = _STOP_GRACE) -> None:
        """Stop every worker (SIGTERM, then SIGKILL after `timeout`), detach the counters from
        shared memory and remove the region. The queues stay open (close the devices after)."""
        if not self._started:
            return
        self._stop_requested = True
        self._stop_workers([w for w in self.workers if w.alive], timeout)
        for w in self.workers:
            self._close_pidfd(w)
            for q in w.queues:
                q.counters = q.counters.copy()
        if self.region is not None:
            self.region.unlink()
            self.region.close()
            self.region = None
        for fd in (self._wake_r, self._wake_w, self._report_r, self._report_w):
            with contextlib.suppress(OSError):
                os.close(fd)
        self._wake_r = self._wake_w = self._report_r = self._report_w = -1
        self._started = False

    def _stop_workers(self, workers: list[WorkerInfo], timeout: float = _STOP_GRACE) -> None:
        pending = {}
        for w in workers:
            with contextlib.suppress(ProcessLookupError):
                os.kill(w.pid, signal.SIGTERM)
            pending[w.pid] = w
        deadline = time.monotonic() + timeout
        killed = False
        while pending:
            for pid, w in list(pending.items()):
                try:
                    done, _status = os.waitpid(pid, os.WNOHANG)
                except ChildProcessError:
                    done = pid
                if done:
                    del pending[pid]
                    self._close_pidfd(w)
                    self._mark(w, EntryState.STOPPED)
                    self._event("stopped", w, "killed after the grace time" if killed else "")
            if not pending:
                break
            if time.monotonic() >= deadline and not killed:
                for pid in pending:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGKILL)
                killed = True
                deadline = time.monotonic() + 2.0
            elif time.monotonic() >= deadline:
                break  # unkillable (D state): give up waiting, never hang
            time.sleep(0.005)

    def _require_started(self) -> None:
        if not self._started:
            raise InvalidArgumentError("start() the pool first")

    # ---- reading ----------------------------------------------------------------------------
    def stats(self) -> list[list[QueueStats]]:
        """Per worker, the live counters of its queues (one per device)."""
        return [w.stats for w in self.workers]

    def __enter__(self) -> WorkerPool:
        if not self._started:
            self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if os.getpid() == self._owner_pid:
            self.stop()

    def __repr__(self) -> str:
        live = sum(1 for w in self.workers if w.alive)
        return f"<WorkerPool {self.name} workers={live}/{len(self.workers)}>"


def _index_or(index: int | None, default: int) -> int:
    return default if index is None else index


# ---- the worker process -------------------------------------------------------------------
def _own_signals() -> None:
    """Forget the parent's signal state: Python handlers (asyncio's among them), the wakeup
    fd, the blocked-signal mask."""
    signal.set_wakeup_fd(-1)
    for sig in signal.valid_signals():
        with contextlib.suppress(OSError, ValueError, TypeError):
            if callable(signal.getsignal(sig)):
                signal.signal(sig, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_SETMASK, set())
    for sig in (signal.SIGINT, signal.SIGUSR1, signal.SIGUSR2, signal.SIGHUP):
        signal.signal(sig, signal.SIG_IGN)  # the parent decides; these go to the group
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)


def _keep_only(keep: set[int]) -> None:
    """Let go of every inherited fd not in `keep`: each is pointed at /dev/null, so its
    number stays taken (an inherited object closing "its" fd cannot hit one we reuse)."""
    null = os.open(os.devnull, os.O_RDWR | os.O_CLOEXEC)
    try:
        for name in os.listdir("/proc/self/fd"):
            fd = int(name)
            if fd in keep or fd == null:
                continue
            try:
                os.fstat(fd)  # the listing's own directory fd is closed by now
            except OSError:
                continue
            os.dup2(null, fd, inheritable=False)
    finally:
        os.close(null)


_HEAP_KEPT = 256 << 20


def _keep_freed_memory(libc: ctypes.CDLL) -> None:
    """Keep what a drain frees for the next one (glibc's malloc; elsewhere nothing happens).

    A drain frees its packets together: a 64-read drain of TSO super-packets cut for a
    handler is ~4 MB of segments. Past 128 KB glibc gives the top of its heap back to the
    kernel (M_TRIM_THRESHOLD), and the next drain faulted it all in again: a batch handler
    moved half the TCP of a per-packet one (3.3-4.0 against 7.3-7.5 Gbit/s, 4 flows, with
    the threshold at 256 MB). The memory stays the process's, up to its largest drain."""
    with contextlib.suppress(OSError, AttributeError):
        libc.mallopt(_uapi.M_TRIM_THRESHOLD, _HEAP_KEPT)


def _worker_main(info: WorkerInfo, program: Program, config: LoopConfig, keep: set[int],
                 parent: int, report_fd: int) -> int:
    """Runs in the forked child. Returns its exit code; never returns into the parent's code."""

    def report(kind: str, detail: str) -> None:
        line = f"{info.index}\t{os.getpid()}\t{kind}\t{detail}".replace("\n", " ")
        # one write of at most PIPE_BUF bytes: atomic, never interleaved with another worker's
        data = line.encode()[:4000].decode(errors="ignore").encode() + b"\n"
        with contextlib.suppress(OSError):
            os.write(report_fd, data)

    def fault(key: str, text: str) -> None:
        # the end of a traceback says most: keep it whole, shorten the start if need be
        tail = text if len(text) <= 3000 else "...\n" + text[-3000:]
        report("fault", _escape(f"{key[:500]}\n{tail}"))

    try:
        _own_signals()
        libc = ctypes.CDLL(None, use_errno=True)
        with contextlib.suppress(OSError, AttributeError):
            libc.prctl(_uapi.PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
        if os.getppid() != parent:
            return EXIT_STOPPED  # the parent died before we set PDEATHSIG
        _keep_only(keep)
        if info.cpu is not None:
            os.sched_setaffinity(0, {info.cpu})
        info.pid = os.getpid()
        with contextlib.suppress(OSError, AttributeError):
            libc.prctl(_uapi.PR_SET_NAME, f"mqtun-w{info.index}".encode()[:15], 0, 0, 0)
        _keep_freed_memory(libc)
        # numpy's import (~0.1 s, and its thread pool) happens here, once, after the fork: on
        # the first packet it stalled the worker long enough for its device ring to overflow
        load_numpy()
        loop = IOLoop(program(info), config, on_fault=fault)
        signal.signal(signal.SIGTERM, lambda *_: loop.stop())
        loop.run()
        return EXIT_STOPPED
    except DeviceGoneError as exc:
        report("gone", str(exc))
        return EXIT_GONE
    except MqtunError as exc:  # e.g. its queue closed under it: a crash, restarted on the
        report("error", f"{type(exc).__name__}: {exc}")  # parent's copy of the queue
        return EXIT_CRASHED
    except BaseException as exc:  # a crash: tell the supervisor what it was
        tb = traceback.extract_tb(exc.__traceback__)
        where = f" at {tb[-1].filename}:{tb[-1].lineno}" if tb else ""
        report("error", f"{type(exc).__name__}: {exc}{where}")
        return EXIT_CRASHED


def _escape(text: str) -> str:
    """A multi-line text as one report line (a report is one line of the pipe)."""
    return text.replace("\\", "\\\\").replace("\n", "\\n").replace("\t", "\\t")


def _unescape(text: str) -> str:
    out, i = [], 0
    while i < len(text):
        c = text[i]
        if c == "\\" and i + 1 < len(text):
            out.append({"n": "\n", "t": "\t"}.get(text[i + 1], text[i + 1]))
            i += 2
        else:
            out.append(c)
            i += 1
    return "".join(out)
