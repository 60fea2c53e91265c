"""`mqtun forward` as a user runs it: a subprocess, its READY/QSTAT/SIGTERM contract, and
intact TCP and UDP traffic between two namespaces after the devices are moved there."""

from __future__ import annotations

import hashlib
import os
import random
import re
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from pyroute2 import IPRoute

import mqtun
from mqtun.netns import NetNamespace
from mqtun.packet import accel
from mqtun.runtime.shm import list_regions, open_region

A_V4, B_V4 = "198.18.1.1", "198.18.1.2"
A_V6, B_V6 = "fd00:6d71::1", "fd00:6d71::2"
QSTAT_RE = re.compile(
    r"QSTAT q=(\d+) a2b_pkts=(\d+) b2a_pkts=(\d+) a2b_bytes=(\d+) b2a_bytes=(\d+) drops=(\d+) "
    r"a2b_wire=(\d+) b2a_wire=(\d+) reads=(\d+) read_wire=(\d+)$"
)
UDP_SEGMENT = 103  # linux/udp.h


def _same_mqtun_env() -> dict[str, str]:
    """The environment for a child `python3 -m mqtun` that imports this very mqtun."""
    src = str(Path(mqtun.__file__).resolve().parents[1])
    path = os.environ.get("PYTHONPATH", "")
    return {**os.environ, "PYTHONPATH": f"{src}:{path}" if path else src}


class ForwardProc:
    """`python3 -m mqtun forward ...` in the test's namespace, its output read by threads."""

    def __init__(self, *args: str) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "mqtun", "forward", *args],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_same_mqtun_env(),
        )
        self.out: list[str] = []
        self.err: list[str] = []
        self._threads = [
            threading.Thread(target=self._pump, args=(self.proc.stdout, self.out), daemon=True),
            threading.Thread(target=self._pump, args=(self.proc.stderr, self.err), daemon=True),
        ]
        for t in self._threads:
            t.start()

    @staticmethod
    def _pump(stream, sink: list[str]) -> None:  # type: ignore[no-untyped-def]
        for line in stream:
            sink.append(line.rstrip("\n"))

    def wait_for(self, pred: Callable[[], bool], timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while not pred():
            if self.proc.poll() is not None and not pred():
                time.sleep(0.1)  # let the pumps catch up
                if pred():
                    return
                raise AssertionError(f"forward exited {self.proc.returncode} before {what}: "
                                     f"{self.err[-5:]}")
            if time.monotonic() > deadline:
                raise AssertionError(f"no {what} within {timeout} s; stderr: {self.err[-5:]}")
            time.sleep(0.01)

    def wait_ready(self, queues: int) -> None:
        self.wait_for(lambda: bool(self.out), 10.0, "READY")
        assert self.out[0] == f"READY queues={queues}"

    def qstat(self, queues: int) -> list[tuple[int, ...]]:
        """Send SIGUSR1, return the `queues` QSTAT lines it printed, parsed."""
        start = len(self.err)
        self.proc.send_signal(signal.SIGUSR1)

        def got() -> bool:
            return sum(1 for ln in self.err[start:] if ln.startswith("QSTAT")) >= queues

        self.wait_for(got, 5.0, "QSTAT lines")
        lines = [ln for ln in self.err[start:] if ln.startswith("QSTAT")][:queues]
        rows = []
        for line in lines:
            m = QSTAT_RE.match(line)
            assert m, f"bad QSTAT line: {line!r}"
            rows.append(tuple(int(x) for x in m.groups()))
        assert [r[0] for r in rows] == list(range(queues))
        return rows

    def stop(self, sig: int = signal.SIGTERM) -> tuple[int, float]:
        t0 = time.monotonic()
        self.proc.send_signal(sig)
        try:
            rc = self.proc.wait(timeout=5)
        finally:
            self.kill()
        return rc, time.monotonic() - t0

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=5)
        for t in self._threads:
            t.join(timeout=2)


@pytest.fixture
def forward() -> Iterator[Callable[..., ForwardProc]]:
    made: list[ForwardProc] = []

    def start(*args: str) -> ForwardProc:
        fp = ForwardProc(*args)
        made.append(fp)
        return fp

    yield start
    for fp in made:
        fp.kill()


def _names() -> tuple[str, str]:
    tag = os.urandom(3).hex()
    return f"fa{tag}", f"fb{tag}"


def _place(dev: str, ns: NetNamespace, v4: str, v6: str | None) -> None:
    subprocess.run(["ip", "link", "set", dev, "netns", ns.name], check=True, timeout=10)
    ns.run(["ip", "addr", "add", f"{v4}/24", "dev", dev])
    if v6:
        ns.run(["ip", "addr", "add", f"{v6}/64", "dev", dev, "nodad"])
    # room for a whole test burst on each queue: a worker the hypervisor or a busy neighbour
    # keeps off its CPU for tens of milliseconds reads it late, not never (the default 1000
    # lets the kernel drop the rest before mqtun sees it: test_tunnel's burst did)
    ns.run(["ip", "link", "set", dev, "txqueuelen", "4096", "up"])


def _running(forward: Callable[..., ForwardProc], make_netns: Callable[[], NetNamespace],
             *args: str, queues: int = 1, v6: bool = True,
             ) -> tuple[ForwardProc, NetNamespace, NetNamespace]:
    """`mqtun forward ARGS` serving, its devices moved into two new namespaces, addressed."""
    dev_a, dev_b = _names()
    fp = forward(*args, dev_a, dev_b)
    fp.wait_ready(queues)
    ns_a, ns_b = make_netns(), make_netns()
    _place(dev_a, ns_a, A_V4, A_V6 if v6 else None)
    _place(dev_b, ns_b, B_V4, B_V6 if v6 else None)
    return fp, ns_a, ns_b


def _link_stats(ns: NetNamespace, dev: str) -> dict[str, int]:
    with ns.enter(), IPRoute() as ipr:
        idx = ipr.link_lookup(ifname=dev)
        assert idx, f"{dev} not in {ns.name}"
        return dict(ipr.get_links(idx[0])[0].get_attr("IFLA_STATS64"))


def _links_in(ns: NetNamespace) -> set[str]:
    with ns.enter(), IPRoute() as ipr:
        return {x.get_attr("IFLA_IFNAME") for x in ipr.get_links()}


# ---- traffic ---------------------------------------------------------------------------------
def _in_thread(ns: NetNamespace, fn: Callable[[], object], result: dict,
               key: str) -> threading.Thread:
    def body() -> None:
        try:
            with ns.enter():
                result[key] = fn()
        except BaseException as exc:  # reported by the caller
            result[key] = exc

    t = threading.Thread(target=body, daemon=True)
    t.start()
    return t


def tcp_transfer(ns_a: NetNamespace, ns_b: NetNamespace, dst: str, nbytes: int) -> None:
    """Send `nbytes` of random data A -> B over TCP and back B -> A; both arrive intact."""
    family = socket.AF_INET6 if ":" in dst else socket.AF_INET
    data = random.Random(nbytes).randbytes(nbytes)
    ready = threading.Event()
    res: dict[str, object] = {}

    def server() -> str:
        with socket.socket(family, socket.SOCK_STREAM) as ls:
            ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            ls.bind((dst, 5001))
            ls.listen(1)
            ls.settimeout(10)
            ready.set()
            conn, _ = ls.accept()
            with conn:
                conn.settimeout(10)
                h = hashlib.sha256()
                got = 0
                while got < nbytes:
                    chunk = conn.recv(1 << 20)
                    if not chunk:
                        break
                    h.update(chunk)
                    got += len(chunk)
                conn.sendall(data[::-1])  # and the other way: B -> A
                return h.hexdigest()

    def client() -> str:
        assert ready.wait(10)
        with socket.create_connection((dst, 5001), timeout=10) as s:
            s.sendall(data)
            h = hashlib.sha256()
            got = 0
            while got < nbytes:
                chunk = s.recv(1 << 20)
                if not chunk:
                    break
                h.update(chunk)
                got += len(chunk)
            return h.hexdigest()

    ts = [_in_thread(ns_b, server, res, "server"), _in_thread(ns_a, client, res, "client")]
    for t in ts:
        t.join(20)
    for k in ("server", "client"):
        if isinstance(res.get(k), BaseException):
            raise res[k]  # type: ignore[misc]
    assert res.get("server") == hashlib.sha256(data).hexdigest(), "A -> B data corrupted"
    assert res.get("client") == hashlib.sha256(data[::-1]).hexdigest(), "B -> A corrupted"


def udp_transfer(ns_a: NetNamespace, ns_b: NetNamespace, dst: str, count: int,
                 gso: bool) -> None:
    """Datagrams A -> B (each carries its own hash), GSO super-sends when `gso`."""
    size = 1200
    per_send = 8 if gso else 1
    ready = threading.Event()
    done = threading.Event()
    res: dict[str, object] = {}

    def payload(i: int) -> bytes:
        body = random.Random(i).randbytes(size - 36)
        return struct.pack("!I", i) + hashlib.sha256(body).digest() + body

    def server() -> tuple[int, int]:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
            s.bind((dst, 5002))
            s.settimeout(0.5)
            ready.set()
            seen: set[int] = set()
            bad = 0
            deadline = time.monotonic() + 10
            while len(seen) < count and time.monotonic() < deadline:
                try:
                    d = s.recv(65536)
                except TimeoutError:
                    if done.is_set():
                        break
                    continue
                i = struct.unpack("!I", d[:4])[0]
                if len(d) != size or hashlib.sha256(d[36:]).digest() != d[4:36]:
                    bad += 1
                seen.add(i)
            return len(seen), bad

    def client() -> int:
        assert ready.wait(10)
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            if gso:
                s.setsockopt(socket.IPPROTO_UDP, UDP_SEGMENT, size)
            for i in range(0, count, per_send):
                s.sendto(b"".join(payload(j) for j in range(i, min(count, i + per_send))),
                         (dst, 5002))
                if i % 64 == 0:
                    time.sleep(0.002)  # paced: this test is about integrity, not loss
        time.sleep(0.3)
        done.set()
        return count

    ts = [_in_thread(ns_b, server, res, "server"), _in_thread(ns_a, client, res, "client")]
    for t in ts:
        t.join(20)
    for k in ("server", "client"):
        if isinstance(res.get(k), BaseException):
            raise res[k]  # type: ignore[misc]
    got, bad = res["server"]  # type: ignore[misc]
    assert bad == 0, f"{bad} corrupted datagrams"
    assert got >= count * 0.98, f"only {got}/{count} datagrams arrived"


def _spray(ns: NetNamespace, dst: str, flows: int) -> None:
    """One datagram from each of `flows` source ports (B answers port unreachable)."""
    with ns.enter():
        for _ in range(flows):
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
                s.sendto(b"x", (dst, 9))


# ---- tests -----------------------------------------------------------------------------------
@pytest.mark.parametrize("offload", [True, False], ids=["offload", "no-offload"])
@pytest.mark.parametrize("queues", [1, 4])
def test_traffic_between_namespaces_is_intact(forward, make_netns, queues: int,
                                              offload: bool) -> None:
    dev_a, dev_b = _names()
    fp = forward("--queues", str(queues), *([] if offload else ["--no-offload"]), dev_a, dev_b)
    fp.wait_ready(queues)
    ns_a, ns_b = make_netns(), make_netns()
    _place(dev_a, ns_a, A_V4, A_V6)  # moved after READY, as a container runtime does
    _place(dev_b, ns_b, B_V4, B_V6)

    tcp_transfer(ns_a, ns_b, B_V4, 3 << 20)
    udp_transfer(ns_a, ns_b, B_V4, 1600, gso=offload)
    if offload or queues == 4:
        tcp_transfer(ns_a, ns_b, B_V6, 1 << 20)
    if queues > 1:
        _spray(ns_a, B_V4, 16)  # more flows than the three above, to see them spread

    # counters: the per-queue figures reconcile with the kernel's device totals
    for _ in range(20):
        before = fp.qstat(queues)
        sa, sb = _link_stats(ns_a, dev_a), _link_stats(ns_b, dev_b)
        if fp.qstat(queues) == before:
            break
        time.sleep(0.2)
    a2b = sum(r[1] for r in before)
    b2a = sum(r[2] for r in before)
    assert a2b == sb["rx_packets"] and b2a == sa["rx_packets"]
    assert sum(r[3] for r in before) == sb["rx_bytes"]
    assert sum(r[4] for r in before) == sa["rx_bytes"]
    # every read the kernel counted, the forwarder counted; every wire packet it read was
    # written (maybe coalesced with others: fewer writes than reads) or dropped with a reason
    assert sa["tx_packets"] + sb["tx_packets"] == sum(r[8] for r in before)
    assert all(r[9] == r[6] + r[7] + r[5] for r in before), before
    if offload:
        # TSO/USO super-packets went through whole: far fewer packets than MTU-sized ones
        assert sum(r[3] for r in before) / a2b > 1500
    if queues > 1:
        assert sum(1 for r in before if r[1] + r[2]) >= 2, "traffic used a single queue"

    rc, took = fp.stop()
    assert rc == 0 and took < 1.0
    assert dev_a not in _links_in(ns_a) and dev_b not in _links_in(ns_b)


def udp_exact(ns_a: NetNamespace, ns_b: NetNamespace, src: str, dst: str,
              hold: Callable[[bool], None]) -> int:
    """Bursts of datagrams A -> B, sizes changing every few datagrams (USO joins only equal
    sizes, the last one shorter), each queued while the forwarder is held (`hold(True)`) so
    that one drain holds it: B receives exactly what A sent, in order. Returns how many."""
    family = socket.AF_INET6 if ":" in dst else socket.AF_INET
    rng = random.Random(7)
    sent: list[bytes] = []
    for i in range(480):
        size = 200 + 97 * ((i // 6) % 11)  # runs of 6 equal sizes
        sent.append(struct.pack("!I", i) + rng.randbytes(size - 4))
    with ns_b.enter():
        rx = socket.socket(family, socket.SOCK_DGRAM)
    with ns_a.enter():
        tx = socket.socket(family, socket.SOCK_DGRAM)
    with rx, tx:
        rx.setsockopt(socket.SOL_SOCKET, 33, 16 << 20)  # SO_RCVBUFFORCE
        rx.bind((dst, 5003))
        rx.settimeout(5)
        tx.bind((src, 0))
        for i in range(0, len(sent), 48):
            hold(True)
            try:
                for d in sent[i: i + 48]:  # a burst queued on A's ring
                    tx.sendto(d, (dst, 5003))
            finally:
                hold(False)
            time.sleep(0.01)
        got = [rx.recv(65536) for _ in sent]
    assert got == sent  # every datagram, its boundaries, and their order
    return len(sent)


@pytest.mark.parametrize(("tap", "v6", "coalesce"), [
    (False, False, True), (False, True, True), (True, False, True), (True, True, True),
    (False, False, False), (False, False, None)],
    ids=["tun-ipv4", "tun-ipv6", "tap-ipv4", "tap-ipv6", "tun-ipv4-no-coalesce",
         "tun-ipv4-default"])  # fmt: skip
def test_coalescing_forward_keeps_streams_datagrams_and_order(
        forward, make_netns, tap: bool, v6: bool, coalesce: bool | None) -> None:
    """None: no flag, the default, which joins where the C loop is built (as CI builds it)."""
    if coalesce is None:
        coalesce = accel.coalesce_reads() is not None
        flag = []
    else:
        flag = ["--coalesce" if coalesce else "--no-coalesce"]
    dev_a, dev_b = _names()
    fp = forward(*(["--tap"] if tap else []), *flag, dev_a, dev_b)
    fp.wait_ready(1)
    ns_a, ns_b = make_netns(), make_netns()
    _place(dev_a, ns_a, A_V4, A_V6)
    _place(dev_b, ns_b, B_V4, B_V6)
    dst, src = (B_V6, A_V6) if v6 else (B_V4, A_V4)
    tcp_transfer(ns_a, ns_b, dst, 2 << 20)
    time.sleep(0.3)  # the last ACKs
    before = fp.qstat(1)[0]
    (region,) = [r for r in list_regions() if r.pid == fp.proc.pid]
    with open_region(region.path) as reg:
        (worker,) = {e.worker_pid for e in reg.entries()}

    def hold(on: bool) -> None:
        os.kill(worker, signal.SIGSTOP if on else signal.SIGCONT)

    count = udp_exact(ns_a, ns_b, src, dst, hold)
    for _ in range(20):
        rows = fp.qstat(1)
        sa, sb = _link_stats(ns_a, dev_a), _link_stats(ns_b, dev_b)
        if fp.qstat(1) == rows:
            break
        time.sleep(0.2)
    (_q, a2b, b2a, _ab, _bb, drops, a2b_wire, b2a_wire, reads, read_wire), = rows
    assert (a2b, b2a) == (sb["rx_packets"], sa["rx_packets"])
    assert reads == sa["tx_packets"] + sb["tx_packets"]
    assert read_wire == a2b_wire + b2a_wire + drops
    assert sa["rx_frame_errors"] == 0 and sb["rx_frame_errors"] == 0
    udp_writes, udp_wire = a2b - before[1], a2b_wire - before[6]
    assert udp_wire >= count
    if coalesce:
        assert udp_writes < udp_wire  # USO writes held several datagrams
    else:
        assert udp_writes == udp_wire  # one write per datagram
    rc, _took = fp.stop()
    assert rc == 0


_DROP_PORT = 5003
_MIDDLEBOX = f"""
import struct

def _keep(packet):
    # IPv4 or IPv6, UDP to port {_DROP_PORT}: dropped; everything else passes
    v = packet[0] >> 4
    proto, off = (packet[9], (packet[0] & 15) * 4) if v == 4 else (packet[6], 40)
    return not (proto == 17 and struct.unpack_from("!H", packet, off + 2)[0] == {_DROP_PORT})

def one(packet):
    return packet if _keep(packet) else None

def batch(packets):
    return [p for p in packets if _keep(p)]
"""


@pytest.mark.parametrize("batch", [False, True], ids=["per-packet", "batch"])
def test_handler_on_the_command_line_is_a_middlebox(forward, make_netns, tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch,
                                                     batch: bool) -> None:
    """`--handler MODULE:NAME` (and `--handler-batch`): a user's module drops one UDP port;
    TCP through split and coalesce arrives intact, UDP to another port arrives, the dropped
    port's datagrams never do and are counted drops."""
    (tmp_path / "mybox.py").write_text(_MIDDLEBOX)
    monkeypatch.setenv("PYTHONPATH", f"{tmp_path}:{os.environ.get('PYTHONPATH', '')}")
    fp, ns_a, ns_b = _running(forward, make_netns, "--handler",
                              f"mybox:{'batch' if batch else 'one'}",
                              *(["--handler-batch"] if batch else []))
    tcp_transfer(ns_a, ns_b, B_V4, 2 << 20)
    udp_transfer(ns_a, ns_b, B_V4, 200, gso=True)
    time.sleep(0.3)
    before = fp.qstat(1)[0][5]
    with ns_b.enter():
        sink = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sink.bind((B_V4, _DROP_PORT))
        sink.setblocking(False)
    try:
        with ns_a.enter(), socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            for _ in range(50):
                s.sendto(b"blocked", (B_V4, _DROP_PORT))
        time.sleep(0.5)
        with pytest.raises(BlockingIOError):
            sink.recv(100)
    finally:
        sink.close()
    assert fp.qstat(1)[0][5] - before == 50  # the drops are the blocked datagrams, exactly
    rc, _took = fp.stop()
    assert rc == 0, fp.err


def test_a_handler_that_cannot_be_found_is_a_usage_error(netns) -> None:
    for argv in (["--handler", "no_such_module_x:f", "a0", "b0"],
                 ["--handler", "mqtun.apps.handlers:nope", "a0", "b0"],
                 ["--handler", "mqtun.apps.handlers", "a0", "b0"],
                 ["--handler-batch", "a0", "b0"]):
        p = subprocess.run([sys.executable, "-m", "mqtun", "forward", *argv],
                           capture_output=True, text=True, timeout=20, env=_same_mqtun_env())
        assert p.returncode == 2, (argv, p.stderr)
        assert "Traceback" not in p.stderr and "handler" in p.stderr
        assert len(p.stderr.strip().splitlines()) == 1, p.stderr


def test_tap_pair_forwards_ethernet(forward, make_netns) -> None:
    fp, ns_a, ns_b = _running(forward, make_netns, "--tap", "--queues", "2", queues=2,
                              v6=False)
    tcp_transfer(ns_a, ns_b, B_V4, 1 << 20)
    udp_transfer(ns_a, ns_b, B_V4, 400, gso=True)
    rc, took = fp.stop(signal.SIGINT)
    assert rc == 0 and took < 1.0


def test_ready_qstat_and_sigterm_contract(forward, netns) -> None:
    dev_a, dev_b = _names()
    cpus = sorted(os.sched_getaffinity(0))
    fp = forward("--queues", "3", "--cpus", ",".join(map(str, cpus)), dev_a, dev_b)
    fp.wait_ready(3)
    assert len(fp.out) == 1
    pid = fp.proc.pid
    with open(f"/proc/{pid}/task/{pid}/children") as f:
        workers = [int(p) for p in f.read().split()]
    assert len(workers) == 3
    assert sorted(os.sched_getaffinity(w) for w in workers) == sorted(
        {cpus[i % len(cpus)]} for i in range(3))
    with IPRoute() as ipr:
        links = {x.get_attr("IFLA_IFNAME"): x for x in ipr.get_links()}
    assert dev_a in links and dev_b in links
    mine = [r for r in list_regions() if r.pid == fp.proc.pid]
    assert mine and mine[0].alive
    rows = fp.qstat(3)
    assert all(len(r) == 10 for r in rows)
    rc, took = fp.stop(signal.SIGTERM)
    assert rc == 0, fp.err
    assert took < 1.0
    with IPRoute() as ipr:
        left = {x.get_attr("IFLA_IFNAME") for x in ipr.get_links()}
    assert dev_a not in left and dev_b not in left
    assert not [r for r in list_regions() if r.pid == fp.proc.pid], "region left behind"


def test_sigint_after_move_deletes_devices_where_they_are(forward, make_netns) -> None:
    dev_a, dev_b = _names()
    fp = forward("--queues", "2", "--no-offload", dev_a, dev_b)
    fp.wait_ready(2)
    ns_a = make_netns()
    _place(dev_a, ns_a, A_V4, None)
    assert dev_a in _links_in(ns_a)
    rc, took = fp.stop(signal.SIGINT)
    assert rc == 0 and took < 1.0
    assert dev_a not in _links_in(ns_a)


def test_bad_usage_exits_2(netns) -> None:
    for argv in (["same0", "same0"], ["--queues", "0", "a0", "b0"], ["--cpus", "x", "a0", "b0"],
                 ["--no-offload", "--vnet-hdr", "a0", "b0"]):
        p = subprocess.run([sys.executable, "-m", "mqtun", "forward", *argv],
                           capture_output=True, text=True, timeout=20, env=_same_mqtun_env())
        assert p.returncode == 2, (argv, p.stderr)
        assert "Traceback" not in p.stderr


def test_device_deleted_under_forward_exits_1(forward, netns) -> None:
    dev_a, dev_b = _names()
    fp = forward(dev_a, dev_b)
    fp.wait_ready(1)
    subprocess.run(["ip", "link", "del", dev_b], check=True, timeout=10)
    # B's worker sees POLLERR then EBADFD on B's queue: reported, and forward ends with 1
    try:
        rc = fp.proc.wait(timeout=5)
    finally:
        fp.kill()
    assert rc == 1
    assert any("gone" in ln for ln in fp.err), fp.err
    with IPRoute() as ipr:
        assert not ipr.link_lookup(ifname=dev_a)
