"""Worker processes per queue against the real kernel: flow affinity (measured), crash and
restart on the same queue, grow/shrink at run time without moving other queues' flows, CPU
pinning, live shared-memory counters, prompt stop, a deleted device."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Callable, Iterator

import pytest

import mqtun
from mqtun.runtime import EntryState, LoopConfig, WorkerInfo, WorkerPool, open_region
from mqtun.runtime.loop import uring_available
from mqtun.runtime.workers import parse_cpus

LOCAL, PEER = "198.18.1.1", "198.18.1.2"


def _csum(data: bytes) -> int:
    s = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    return ~s & 0xFFFF


def tagged_reply(worker: int) -> Callable[[bytes], bytes | None]:
    """A handler answering IPv4/UDP with its worker number as the payload (swapped addresses
    and ports, fresh IP checksum, UDP checksum 0 = none). "crash" in a request kills it."""

    def handler(pkt: bytes) -> bytes | None:
        if len(pkt) < 28 or pkt[0] != 0x45 or pkt[9] != 17:
            return None
        if pkt[28:33] == b"crash":
            os._exit(7)
        body = b"w%d " % worker + pkt[28:]
        ip = bytearray(pkt[:20])
        ip[2:4] = struct.pack("!H", 28 + len(body))
        ip[10:12] = b"\0\0"
        ip[12:16], ip[16:20] = pkt[16:20], pkt[12:16]
        ip[10:12] = struct.pack("!H", _csum(bytes(ip)))
        udp = pkt[22:24] + pkt[20:22] + struct.pack("!HH", 8 + len(body), 0)
        return bytes(ip) + udp + body

    return handler


def _make(info: WorkerInfo) -> Callable[[bytes], bytes | None]:
    return tagged_reply(info.index)


@pytest.fixture
def device() -> Iterator[Callable[[int], mqtun.Device]]:
    made: list[mqtun.Device] = []

    def make(queues: int) -> mqtun.Device:
        dev = mqtun.Device.create("wk%d", queues)
        dev.link.add_address(f"{LOCAL}/24")
        dev.link.up()
        made.append(dev)
        return dev

    yield make
    for d in made:
        d.close()


@pytest.fixture
def pools() -> Iterator[list[WorkerPool]]:
    made: list[WorkerPool] = []
    yield made
    for p in made:
        p.stop()


class Flows:
    """UDP flows from distinct source ports; each request gets the answering worker back."""

    def __init__(self, count: int) -> None:
        self.socks = []
        for _ in range(count):
            s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            s.bind((LOCAL, 0))
            s.settimeout(1.0)
            self.socks.append(s)

    def ask(self, i: int, msg: bytes = b"hi") -> int | None:
        s = self.socks[i]
        s.sendto(msg, (PEER, 7))
        try:
            data = s.recv(2048)
        except TimeoutError:
            return None
        assert data.endswith(b" " + msg)
        return int(data.split(b" ", 1)[0][1:])

    def round(self, rounds: int = 3, only: range | None = None) -> dict[int, set[int | None]]:
        seen: dict[int, set[int | None]] = {}
        for _ in range(rounds):
            for i in only if only is not None else range(len(self.socks)):
                seen.setdefault(i, set()).add(self.ask(i))
        return seen

    def close(self) -> None:
        for s in self.socks:
            s.close()


@pytest.fixture
def flows() -> Iterator[Callable[[int], Flows]]:
    made: list[Flows] = []

    def make(n: int) -> Flows:
        f = Flows(n)
        made.append(f)
        return f

    yield make
    for f in made:
        f.close()


def _wait_events(pool: WorkerPool, kinds: set[str], timeout: float = 5.0,
                 times: int = 1) -> list[str]:
    """The pool's events until each of `kinds` came `times` times (or `timeout`): workers
    find things out each on its own read, not together."""
    deadline = time.monotonic() + timeout
    got: list[str] = []
    while time.monotonic() < deadline and any(got.count(k) < times for k in kinds):
        got += [e.kind for e in pool.poll(0.05)]
    return got


def _eventually(check: Callable[[], bool], timeout: float = 2.0) -> bool:
    """Counters are published after each drained batch: give the last batch a moment."""
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


def test_flow_affinity_each_flow_stays_on_one_worker(device, pools, flows) -> None:
    dev = device(4)
    pool = WorkerPool.serve(dev, make_handler=_make)
    pools.append(pool.start())
    f = flows(48)
    seen = f.round(rounds=4)
    assert all(None not in w for w in seen.values()), "some requests got no answer"
    moved = [i for i, w in seen.items() if len(w) != 1]
    assert not moved, f"{len(moved)}/48 flows were answered by more than one worker"
    used = {next(iter(w)) for w in seen.values()}
    assert len(used) >= 3, f"48 flows used only workers {used}"
    # and the counters agree: each worker read what its queue was given
    assert _eventually(lambda: sum(w.stats[0].read_packets for w in pool.workers) >= 48 * 4)


def test_crashed_worker_is_reported_and_restarted_on_its_queue(device, pools, flows) -> None:
    dev = device(2)
    events: list[str] = []
    pool = WorkerPool.serve(dev, make_handler=_make, on_event=lambda e: events.append(str(e)))
    pools.append(pool.start())
    f = flows(16)
    before = {i: w.pop() for i, w in f.round(rounds=1).items()}
    victim = before[0]
    old_pid = pool.workers[victim].pid
    f.socks[0].sendto(b"crash", (PEER, 7))
    kinds = _wait_events(pool, {"crashed", "restarted"})
    assert "crashed" in kinds and "restarted" in kinds
    w = pool.workers[victim]
    assert w.pid != old_pid and w.restarts == 1 and w.alive
    assert any("exit code 7" in e for e in events), events
    # the same flows are answered by the same worker slot, on the same queue
    after = f.round(rounds=2)
    assert all(after[i] == {before[i]} for i in before), (before, after)
    entry = pool.region.entry(w.entries[0]) if pool.region else None
    assert entry is not None and entry.restarts == 1 and entry.worker_pid == w.pid
    # killed by a signal: the same
    os.kill(w.pid, signal.SIGKILL)
    assert "restarted" in _wait_events(pool, {"restarted"})
    assert f.round(rounds=1, only=range(4))


def test_worker_that_keeps_crashing_is_given_up(device, pools) -> None:
    dev = device(2)

    def make(info: WorkerInfo) -> Callable[[bytes], bytes | None]:
        if info.index == 1:
            raise RuntimeError("cannot start")
        return tagged_reply(info.index)

    pool = WorkerPool.serve(dev, make_handler=make, max_restarts=2)
    pools.append(pool.start())
    kinds = _wait_events(pool, {"gave-up"})
    assert kinds.count("restarted") == 2 and "gave-up" in kinds
    assert not pool.workers[1].alive and pool.workers[0].alive
    assert not dev.queues[1].enabled  # detached: the kernel steers its flows elsewhere


def test_grow_and_shrink_keep_the_other_queues_flows(device, pools, flows) -> None:
    dev = device(2)
    pool = WorkerPool.serve(dev, make_handler=_make)
    pools.append(pool.start())
    f = flows(32)
    first = {i: w.pop() for i, w in f.round(rounds=1).items()}
    assert None not in first.values()
    pool.grow(2)
    assert len([w for w in pool.workers if w.alive]) == 4
    assert dev.info().num_queues == 4
    # old flows stay where they were; new flows also land on the new queues
    again = f.round(rounds=2)
    assert all(again[i] == {first[i]} for i in first), "a flow moved when queues were added"
    g = flows(48)
    new = {w.pop() for w in g.round(rounds=1).values()}
    assert new & {2, 3}, f"no new flow reached the new workers: {new}"
    assert None not in new
    # shrink back: workers 3 and 2 go; flows of workers 0 and 1 are untouched
    removed = pool.shrink(2)
    assert [w.index for w in removed] == [3, 2]
    assert dev.info().num_queues == 2
    assert sum(1 for q in dev.queues if not q.closed) == 2
    after = f.round(rounds=2)
    assert all(after[i] == {first[i]} for i in first), "a flow of a kept queue moved"
    assert {w.pop() for w in g.round(rounds=1).values()} <= {0, 1}
    with pytest.raises(mqtun.InvalidArgumentError):
        pool.shrink(2)


def test_cpu_pinning_and_live_counters_from_outside(device, pools, flows) -> None:
    dev = device(2)
    cpus = parse_cpus("auto")
    assert cpus
    pool = WorkerPool.serve(dev, make_handler=_make, cpus="auto", name="pintest")
    pools.append(pool.start())
    for w in pool.workers:
        assert os.sched_getaffinity(w.pid) == {cpus[w.index % len(cpus)]}
    f = flows(8)
    f.round(rounds=2)
    # the parent's Queue.stats are live views of the workers' shared counters
    assert _eventually(lambda: sum(q.stats.written_packets for q in dev.queues) >= 16)
    time.sleep(0.05)
    total = sum(q.stats.read_packets for q in dev.queues)
    # another process reads the same figures through the region
    region = open_region(f"{os.getpid()}.pintest")
    try:
        entries = region.entries()
        assert {e.state for e in entries} == {EntryState.RUNNING}
        assert sum(e.stats.read_packets for e in entries) == total
        assert [e.cpu for e in entries] == [cpus[i % len(cpus)] for i in range(2)]
        assert {e.worker_pid for e in entries} == {w.pid for w in pool.workers}
    finally:
        region.close()

    def reconciled() -> bool:  # exact, once no batch is in flight (IPv6 noise may arrive)
        k = dev.link.stats()
        return (sum(q.stats.read_packets for q in dev.queues) == k["tx_packets"]
                and sum(q.stats.written_packets for q in dev.queues) == k["rx_packets"])

    assert _eventually(reconciled)
    total = sum(q.stats.read_packets for q in dev.queues)
    # stopping: prompt, and the region goes away; counters stay readable in the parent
    path = pool.region.path if pool.region else ""
    t0 = time.monotonic()
    pool.stop()
    assert time.monotonic() - t0 < 1.0
    assert not os.path.exists(path)
    assert sum(q.stats.read_packets for q in dev.queues) == total


def test_device_deleted_workers_report_gone(device, pools) -> None:
    dev = device(2)
    pool = WorkerPool.serve(dev, make_handler=_make)
    pools.append(pool.start())
    subprocess.run(["ip", "link", "del", dev.name], check=True, timeout=10)
    kinds = _wait_events(pool, {"gone"}, times=2)
    assert kinds.count("gone") == 2 and "restarted" not in kinds
    assert pool.gone and all(w.state == EntryState.GONE for w in pool.workers)


@pytest.mark.parametrize("mode", ["epoll", "busy", "naive", pytest.param(
    "uring", marks=pytest.mark.skipif(not uring_available(), reason="no liburing binding"))])
def test_pool_runs_in_every_mode(device, pools, flows, mode: str) -> None:
    dev = device(2)
    pool = WorkerPool.serve(dev, make_handler=_make, loop=LoopConfig(mode=mode))
    pools.append(pool.start())
    seen = flows(8).round(rounds=2)
    assert all(len(w) == 1 and None not in w for w in seen.values())
    t0 = time.monotonic()
    pool.stop()
    assert time.monotonic() - t0 < 1.0


def _faulty(info: WorkerInfo) -> Callable[[bytes], object]:
    """Answers like tagged_reply, except: "str"/"int" return a str/an int, "list" a list
    holding None and the answer, "raise" raises."""
    good = tagged_reply(info.index)

    def handler(pkt: bytes) -> object:
        body = pkt[28:]
        if body == b"str":
            return "not a packet"
        if body == b"int":
            return 42
        if body == b"list":
            return [None, good(pkt)]
        if body == b"raise":
            raise KeyError("a typo in the handler")
        return good(pkt)

    return handler


def test_handler_results_that_are_not_packets_are_counted_and_reported(
        device, pools, flows, caplog) -> None:
    dev = device(1)
    events: list[mqtun.runtime.WorkerEvent] = []
    pool = WorkerPool.serve(dev, make_handler=_faulty, on_event=events.append)
    pools.append(pool.start())
    pid = pool.workers[0].pid
    f = flows(1)
    assert f.ask(0) == 0
    caplog.set_level("ERROR", logger="mqtun.runtime")
    for word in (b"str", b"int", b"str", b"raise", b"raise"):
        f.socks[0].sendto(word, (PEER, 7))
    assert f.ask(0, b"list") == 0  # the packet in the list is written, the None is counted
    assert f.ask(0) == 0  # the worker lives: no crash, no restart, same process
    assert _eventually(lambda: len({e.detail.split("\n")[0] for e in pool.poll(0.05)
                                     + events if e.kind == "handler-error"}) >= 4, 5.0)
    kinds = [e.kind for e in events]
    assert "crashed" not in kinds and "restarted" not in kinds and pool.workers[0].pid == pid
    faults = [e.detail for e in events if e.kind == "handler-error"]
    assert len(faults) == 4, faults  # one per kind: str, int, None in a list, KeyError
    assert any("returned str" in t for t in faults) and any("returned int" in t for t in faults)
    assert any("returned NoneType" in t for t in faults)
    raised = [t for t in faults if t.startswith("KeyError")]
    assert raised and "Traceback" in raised[0] and "a typo in the handler" in raised[0]
    assert "test_runtime_workers.py" in raised[0]
    assert sum("packet handler fault" in r.getMessage() for r in caplog.records) == 4
    d = dev.queues[0].stats.dropped
    assert _eventually(lambda: dev.queues[0].stats.dropped.get("bad-result") == 4), d
    assert dev.queues[0].stats.dropped.get("handler-error") == 2


def _fd_targets(pid: int) -> list[str]:
    out = []
    for name in os.listdir(f"/proc/{pid}/fd"):
        with contextlib.suppress(OSError):
            out.append(os.readlink(f"/proc/{pid}/fd/{name}"))
    return out


def test_a_worker_holds_only_its_queue_and_has_its_own_signal_state(
        device, pools, tmp_path) -> None:
    dev = device(2)
    other = mqtun.Device.create("wko%d", 1)  # another device of the application
    other_name = other.name
    wake_r, wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    old_wakeup = signal.set_wakeup_fd(wake_w)  # as asyncio does in the parent
    try:
        with open(tmp_path / "app.log", "w") as app_file, \
                socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as app_sock:
            pool = WorkerPool.serve(dev, make_handler=_make)
            pools.append(pool.start())
            mine = {f"socket:[{os.fstat(app_sock.fileno()).st_ino}]", app_file.name,
                    f"pipe:[{os.fstat(wake_w).st_ino}]"}
            for w in pool.workers:  # (a worker lets go of the rest as soon as it starts)
                assert _eventually(lambda w=w: not mine & set(_fd_targets(w.pid))
                                   and _fd_targets(w.pid).count("/dev/net/tun") == 1), (
                    _fd_targets(w.pid))  # its own queue only
            # closing the other device in the parent removes it: no worker holds a queue of it
            other.close()
            assert _eventually(lambda: subprocess.run(
                ["ip", "link", "show", other_name], capture_output=True).returncode != 0)
            pool.stop()  # SIGTERM: a worker's handler must not write to the parent's wakeup fd
            with pytest.raises(BlockingIOError):
                os.read(wake_r, 16)
    finally:
        signal.set_wakeup_fd(old_wakeup)
        os.close(wake_r)
        os.close(wake_w)
        if not other.closed:
            other.close()


def test_a_detached_queue_is_quiet_never_gone(device, pools, flows) -> None:
    dev = device(2)
    events: list[mqtun.runtime.WorkerEvent] = []
    pool = WorkerPool.serve(dev, make_handler=_make, on_event=events.append)
    pools.append(pool.start())
    f = flows(16)
    assert {w.pop() for w in f.round(rounds=1).values()} == {0, 1}
    dev.queues[1].disable()  # the user's own detach: its worker waits, it is not "gone"
    assert {w.pop() for w in flows(16).round(rounds=1).values()} == {0}
    pool.poll(0.2)
    assert all(w.alive for w in pool.workers) and not pool.gone
    assert not {"gone", "crashed"} & {e.kind for e in events}
    dev.queues[1].enable()
    assert 1 in {w.pop() for w in flows(32).round(rounds=1).values()}
    # a deleted device is always "gone", for every worker
    subprocess.run(["ip", "link", "del", dev.name], check=True, timeout=10)
    assert _wait_events(pool, {"gone"}, times=2).count("gone") == 2


def test_pool_supervises_pidfds_numbered_past_1024(device, pools, flows) -> None:
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, 4096), max(hard, 4096)))
    null = os.open(os.devnull, os.O_RDONLY)
    filler = [os.dup(null) for _ in range(1100)]  # the application holds many fds
    try:
        dev = device(2)
        pool = WorkerPool.serve(dev, make_handler=_make)
        pools.append(pool.start())
        assert min(w.pidfd for w in pool.workers) > 1024
        pool.poll(0.05)
        os.kill(pool.workers[0].pid, signal.SIGKILL)
        assert "restarted" in _wait_events(pool, {"restarted"})
        assert all(len(w) == 1 for w in flows(4).round(rounds=1).values())
    finally:
        for fd in (null, *filler):
            os.close(fd)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


_DRAIN_TWICE = """
import ctypes, resource, sys
from mqtun.runtime import workers
if sys.argv[1] == "keep":
    workers._keep_freed_memory(ctypes.CDLL(None))
def drain():
    held = [bytes(1500) for _ in range(3000)]  # ~4.5 MB of segments, freed together
    del held
drain()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
drain()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def test_a_worker_keeps_a_drains_freed_memory_for_the_next() -> None:
    """The second of two drains that allocate and free ~4.5 MB takes no new page faults in a
    worker's process (`_keep_freed_memory`); by glibc's default it faulted its memory in again
    (hundreds of faults), which halved a batch handler's TCP."""

    def faults(mode: str) -> int:
        out = subprocess.run([sys.executable, "-c", _DRAIN_TWICE, mode], capture_output=True,
                             text=True, timeout=60, check=True)
        return int(out.stdout.strip())

    default = faults("default")
    if default < 200:
        pytest.skip(f"this libc keeps freed memory by itself ({default} faults)")
    assert faults("keep") < 50, "the kept heap was faulted in again"
