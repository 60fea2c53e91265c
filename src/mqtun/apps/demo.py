"""`mqtun demo`: a 2-queue forwarder between two namespaces, traffic through it, per-queue shares.

    ns A 198.18.0.1 <-> tun-a == mqtun forward --queues 2 (ns F) == tun-b <-> ns B 198.18.0.2

Two phases, each half of `seconds`: TCP (several connections A -> B, as fast as they go) and
UDP (16 flows of 1200-byte datagrams A -> B). The traffic is made by Python sockets in threads
that step into A and B, so the demo needs nothing but Python and iproute2. Per queue it reports
what the forwarder's shared-memory counters say it moved during each phase: packets (with
offloads a TCP "packet" is a TSO super-packet of up to 64 KB), the queue's share, Mbit/s. For
UDP it also says where datagrams were lost, from the forwarder's counters against the sender's
and the receiver's: before the forwarder (sent by A, never read from A's device: A's stack or
the device queue), in it (read, not written to B's device), after it (written to B's device,
not delivered to B's socket: B's stack, mostly its socket buffer -- B's RcvbufErrors).

Nothing here prints: progress goes to the `report` callback, the result to `render_demo()`.
Everything is removed at the end, on an error and on Ctrl-C too (`Topology`).
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from mqtun.apps.topology import (
    A_IP,
    B_IP,
    ForwarderSpec,
    QueueSample,
    Topology,
    check_lab,
    lab_errors,
    udp_counters,
)
from mqtun.errors import MqtunError
from mqtun.netns import NetNamespace

__all__ = ["DemoResult", "PhaseResult", "QueueShare", "render_demo", "run_demo"]

TCP_PORT, UDP_PORT = 5201, 5202
UDP_FLOWS, UDP_SIZE = 16, 1200


@dataclass(frozen=True)
class QueueShare:
    """What one queue pair moved during a phase."""

    queue: int
    packets: int  # both directions
    bytes: int
    share: float  # of all packets in the phase, 0..1
    mbps: float


@dataclass
class PhaseResult:
    """One traffic phase: what the receiver got, and how the queues shared the work."""

    name: str
    seconds: float
    received_bytes: int
    sent_packets: int = 0  # UDP only
    received_packets: int = 0  # UDP only
    queues: list[QueueShare] = field(default_factory=list)
    forwarder_read: int = 0  # A -> B: wire packets read from A's device by the forwarder
    forwarder_written: int = 0  # A -> B: wire packets written to B's device by the forwarder
    rcvbuf_errors: int = 0  # B's Udp RcvbufErrors: datagrams its sockets had no room for
    queue_full: int = 0  # A's device tx_dropped: its queues to the forwarder were full

    @property
    def goodput_mbps(self) -> float:
        return self.received_bytes * 8 / self.seconds / 1e6 if self.seconds else 0.0

    @property
    def loss(self) -> float:
        if not self.sent_packets:
            return 0.0
        return max(0.0, 1 - self.received_packets / self.sent_packets)

    def lost_where(self) -> tuple[int, int, int]:
        """Datagrams lost (before the forwarder, in it, after it); they add up to the loss."""
        before = max(0, self.sent_packets - self.forwarder_read)
        inside = max(0, self.forwarder_read - self.forwarder_written)
        after = max(0, self.sent_packets - self.received_packets - before - inside)
        return before, inside, after


@dataclass
class DemoResult:
    queues: int
    offloads: bool
    phases: list[PhaseResult]


def run_demo(seconds: float = 6.0, queues: int = 2, tcp_flows: int = 4,
             report: Callable[[str], None] = lambda _line: None) -> DemoResult:
    """Build the topology, run the TCP then the UDP phase, return the figures."""
    check_lab("demo")
    spec = ForwarderSpec("mqtun", queues=queues, offload=True)
    report(f"namespaces A ({A_IP}) and B ({B_IP}) joined by `mqtun forward --queues {queues}` "
           "in namespace F")
    with lab_errors("demo"), Topology(spec) as topo:
        a, b = topo.a, topo.b
        assert a is not None and b is not None
        phase = seconds / 2
        phases = []
        report(f"TCP: {tcp_flows} connections A -> B for {phase:.1f} s ...")
        phases.append(_measure(topo, f"TCP, {tcp_flows} connections A -> B", phase,
                               lambda: _tcp(a, b, tcp_flows, phase)))
        report(f"UDP: {UDP_FLOWS} flows of {UDP_SIZE}-byte datagrams A -> B for {phase:.1f} s ...")
        phases.append(_measure(topo, f"UDP, {UDP_FLOWS} flows A -> B", phase,
                               lambda: _udp(a, b, phase)))
    return DemoResult(queues, True, phases)


def _measure(topo: Topology, name: str, seconds: float,
             traffic: Callable[[], tuple[int, int, int]]) -> PhaseResult:
    assert topo.b is not None
    before, udp0, link0 = topo.queue_samples(), udp_counters(topo.b), topo.link_counters()[0]
    received_bytes, sent, received = traffic()
    after, udp1, link1 = topo.queue_samples(), udp_counters(topo.b), topo.link_counters()[0]
    result = PhaseResult(name, seconds, received_bytes, sent, received)
    result.queues = _shares(before, after, seconds)  # rates over the sending time
    # wire packets, not reads and writes: a coalesced USO write holds several datagrams
    result.forwarder_read = (sum(s.a2b_read_wire for s in after)
                             - sum(s.a2b_read_wire for s in before))
    result.forwarder_written = (sum(s.a2b_wire for s in after)
                                - sum(s.a2b_wire for s in before))
    result.rcvbuf_errors = udp1.get("RcvbufErrors", 0) - udp0.get("RcvbufErrors", 0)
    result.queue_full = link1.tx_dropped - link0.tx_dropped
    return result


def _shares(before: list[QueueSample], after: list[QueueSample],
            seconds: float) -> list[QueueShare]:
    was = {s.queue: s for s in before}
    rows = []
    for s in after:
        b = was.get(s.queue, QueueSample(s.queue, 0, 0, 0, 0, 0))
        pkts = s.a2b_packets + s.b2a_packets - b.a2b_packets - b.b2a_packets
        nbytes = s.a2b_bytes + s.b2a_bytes - b.a2b_bytes - b.b2a_bytes
        rows.append((s.queue, pkts, nbytes))
    total = sum(p for _, p, _ in rows) or 1
    return [QueueShare(q, p, n, p / total, n * 8 / seconds / 1e6 if seconds else 0.0)
            for q, p, n in rows]


# ---- traffic (threads that step into a namespace) -------------------------------------------
def _thread(ns: NetNamespace, fn: Callable[[], object], out: list[object]) -> threading.Thread:
    def body() -> None:
        try:
            with ns.enter():
                out.append(fn())
        except BaseException as exc:  # handed to the caller
            out.append(exc)

    t = threading.Thread(target=body, daemon=True)
    t.start()
    return t


def _join(threads: list[threading.Thread], results: list[object], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    for t in threads:
        t.join(max(0.0, deadline - time.monotonic()))
    for r in results:
        if isinstance(r, BaseException):
            raise MqtunError(5, f"demo traffic failed: {r}", op="demo") from r


def _tcp(a: NetNamespace, b: NetNamespace, flows: int, seconds: float) -> tuple[int, int, int]:
    """`flows` connections A -> B sending for `seconds`; bytes B received."""
    ready = threading.Event()
    results: list[object] = []
    server_results: list[object] = []
    chunk = bytes(256 << 10)

    def serve() -> int:
        with socket.socket() as ls:
            ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            ls.bind((B_IP, TCP_PORT))
            ls.listen(flows)
            ls.settimeout(10)
            ready.set()
            conns = [ls.accept()[0] for _ in range(flows)]
        readers = [threading.Thread(target=_drain, args=(c, seconds + 10, server_results),
                                    daemon=True) for c in conns]
        for t in readers:
            t.start()
        for t in readers:
            t.join(seconds + 15)
        return sum(r for r in server_results if isinstance(r, int))

    def send() -> int:
        if not ready.wait(10):
            raise TimeoutError("the TCP server in B did not start")
        with socket.create_connection((B_IP, TCP_PORT), timeout=10) as s:
            deadline = time.monotonic() + seconds
            while time.monotonic() < deadline:
                s.sendall(chunk)
        return 0

    threads = [_thread(b, serve, results)]
    threads += [_thread(a, send, results) for _ in range(flows)]
    _join(threads, results, seconds + 30)
    return sum(r for r in results if isinstance(r, int)), 0, 0


def _drain(conn: socket.socket, timeout: float, out: list[object]) -> None:
    """Read a connection to its end, appending the byte count to `out`."""
    buf = bytearray(1 << 20)
    got = 0
    with conn:
        conn.settimeout(timeout)
        try:
            while n := conn.recv_into(buf):
                got += n
        except OSError:
            pass
    out.append(got)


def _udp(a: NetNamespace, b: NetNamespace, seconds: float) -> tuple[int, int, int]:
    """16 flows (source ports) A -> B for `seconds`: (bytes, datagrams sent, received)."""
    ready = threading.Event()
    done = threading.Event()
    results: list[object] = []

    def receive() -> tuple[int, int]:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
            s.bind((B_IP, UDP_PORT))
            s.settimeout(0.2)
            ready.set()
            buf = bytearray(2048)
            count = nbytes = 0
            deadline = time.monotonic() + seconds + 10
            while time.monotonic() < deadline:
                try:
                    nbytes += s.recv_into(buf)
                    count += 1
                except TimeoutError:
                    if done.is_set():
                        break
            return count, nbytes

    def send() -> int:
        if not ready.wait(10):
            raise TimeoutError("the UDP receiver in B did not start")
        socks = [socket.socket(socket.AF_INET, socket.SOCK_DGRAM) for _ in range(UDP_FLOWS)]
        payload = bytes(UDP_SIZE)
        sent = 0
        try:
            for s in socks:
                s.connect((B_IP, UDP_PORT))  # each socket its own source port: one flow each
            deadline = time.monotonic() + seconds
            while time.monotonic() < deadline:
                for s in socks:
                    try:
                        s.send(payload)
                        sent += 1
                    except OSError:  # a full device queue: the packet is not sent
                        pass
        finally:
            for s in socks:
                s.close()
            time.sleep(0.3)  # let the last datagrams cross before the receiver stops
            done.set()
        return sent

    threads = [_thread(b, receive, results), _thread(a, send, results)]
    _join(threads, results, seconds + 30)
    recv = next((r for r in results if isinstance(r, tuple)), (0, 0))
    sent = next((r for r in results if isinstance(r, int)), 0)
    return recv[1], sent, recv[0]


# ---- rendering --------------------------------------------------------------------------------
def render_demo(result: DemoResult) -> str:
    """The per-phase, per-queue table a newcomer reads."""
    lines = []
    for p in result.phases:
        head = f"{p.name}: {p.goodput_mbps:,.0f} Mbit/s received"
        if p.sent_packets:
            head += (f", {p.received_packets:,} of {p.sent_packets:,} datagrams "
                     f"({p.loss:.1%} lost)")
        lines.append(head)
        if p.sent_packets:
            before, inside, after = (n / p.sent_packets for n in p.lost_where())
            full = (f" (A's device queue overflowed {p.queue_full:,} times: the sender "
                    "outran the forwarder)" if p.queue_full else " (A's stack, device queue)")
            rcvbuf = (f" (B's socket buffer overflowed {p.rcvbuf_errors:,} times)"
                      if p.rcvbuf_errors else " (B's stack and socket)")
            lines += [f"  lost before mqtun {before:6.1%}{full}",
                      f"       in mqtun     {inside:6.1%} (read, not written)",
                      f"       after mqtun  {after:6.1%}{rcvbuf}"]
        lines.append(f"  {'queue':>5}  {'packets':>10}  {'share':>6}  {'Mbit/s':>9}")
        for q in p.queues:
            lines.append(f"  {q.queue:>5}  {q.packets:>10,}  {q.share:>6.1%}  {q.mbps:>9,.0f}")
        lines.append("")
    lines.append("packets: what the forwarder wrote, both directions (with offloads a TCP\n"
                 "packet, or UDP datagrams joined into one write, is a super-packet of up to\n"
                 "64 KB); shares follow the kernel's flow hash, which puts each flow on one\n"
                 "queue")
    return "\n".join(lines) + "\n"
