"""The tunnel tests' lab: two namespaces joined by a veth underlay, `mqtun tunnel vxlan` in one
(a subprocess, its output read by threads), the kernel's own VXLAN device in the other."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import mqtun
from mqtun.netns import NetNamespace

QSTAT_RE = re.compile(
    r"QSTAT q=(\d+) encap_pkts=(\d+) decap_pkts=(\d+) encap_bytes=(\d+) decap_bytes=(\d+) "
    r"drops=(\d+)((?: [a-z-]+=\d+)*)$"
)
VNI = 42
INNER_A, INNER_B = "198.19.20.1", "198.19.20.2"
INNER6_A, INNER6_B = "fd00:19::1", "fd00:19::2"


def mqtun_env() -> dict[str, str]:
    """The environment for a child `python3 -m mqtun` that imports this very mqtun."""
    src = str(Path(mqtun.__file__).resolve().parents[1])
    path = os.environ.get("PYTHONPATH", "")
    return {**os.environ, "PYTHONPATH": f"{src}:{path}" if path else src}


@dataclass
class Qstat:
    q: int
    encap_pkts: int
    decap_pkts: int
    encap_bytes: int
    decap_bytes: int
    drops: int
    reasons: dict[str, int] = field(default_factory=dict)


class TunnelProc:
    """`python3 -m mqtun tunnel vxlan ...` in the calling thread's namespace."""

    def __init__(self, *args: str, prefix: list[str] | None = None) -> None:
        self.proc = subprocess.Popen(
            [*(prefix or []), sys.executable, "-m", "mqtun", "tunnel", "vxlan", *args],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=mqtun_env(),
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
            if self.proc.poll() is not None:
                time.sleep(0.1)
                if pred():
                    return
                raise AssertionError(f"tunnel exited {self.proc.returncode} before {what}: "
                                     f"{self.err[-5:]}")
            if time.monotonic() > deadline:
                raise AssertionError(f"no {what} within {timeout} s; stderr: {self.err[-5:]}")
            time.sleep(0.01)

    def wait_ready(self, queues: int) -> str:
        """Wait for READY; return the device name it gives."""
        self.wait_for(lambda: bool(self.out), 15.0, "READY")
        m = re.fullmatch(rf"READY queues={queues} dev=(\S+)", self.out[0])
        assert m, self.out[0]
        return m.group(1)

    def qstat(self, queues: int) -> list[Qstat]:
        start = len(self.err)
        self.proc.send_signal(signal.SIGUSR1)

        def got() -> bool:
            return sum(1 for ln in self.err[start:] if ln.startswith("QSTAT")) >= queues

        self.wait_for(got, 5.0, "QSTAT lines")
        rows = []
        for line in [ln for ln in self.err[start:] if ln.startswith("QSTAT")][:queues]:
            m = QSTAT_RE.match(line)
            assert m, f"bad QSTAT line: {line!r}"
            q, enc, dec, encb, decb, drops = (int(x) for x in m.groups()[:6])
            reasons = {k: int(v) for k, v in (kv.split("=") for kv in m.group(7).split())}
            rows.append(Qstat(q, enc, dec, encb, decb, drops, reasons))
        assert [r.q for r in rows] == list(range(queues))
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


@dataclass
class Lab:
    """Namespace A (the test's own: mqtun) and B (the kernel's vxlan), underlay addresses."""

    b: NetNamespace
    local: str  # A's underlay address
    remote: str  # B's underlay address
    v6: bool
    underlay_b: str = ""
    kernel_dev: str = "vk0"

    def ip_b(self, *args: str) -> None:
        self.b.run(["ip", *args])


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, timeout=10, capture_output=True)


def make_lab(b: NetNamespace, *, v6: bool, mtu: int | None = None, inner6: bool = True) -> Lab:
    """veth A<->B; in B the kernel VXLAN to A with inner addresses; A gets the tunnel later."""
    tag = os.urandom(2).hex()
    va, vb = f"ua{tag}", f"ub{tag}"
    _ip("link", "add", va, "type", "veth", "peer", "name", vb, "netns", b.name)
    if v6:
        local, remote, plen = "fd00:18::1", "fd00:18::2", "64"
    else:
        local, remote, plen = "198.18.20.1", "198.18.20.2", "24"
    extra = ["nodad"] if v6 else []
    _ip("addr", "add", f"{local}/{plen}", "dev", va, *extra)
    _ip("link", "set", va, "up")
    if mtu:
        _ip("link", "set", va, "mtu", str(mtu))
    lab = Lab(b, local, remote, v6, vb)
    lab.ip_b("addr", "add", f"{remote}/{plen}", "dev", vb, *extra)
    if mtu:
        lab.ip_b("link", "set", vb, "mtu", str(mtu))
    lab.ip_b("link", "set", vb, "up")
    lab.ip_b("link", "add", lab.kernel_dev, "type", "vxlan", "id", str(VNI), "remote", local,
             "local", remote, "dstport", "4789", "dev", vb)
    lab.ip_b("addr", "add", f"{INNER_B}/24", "dev", lab.kernel_dev)
    if inner6:
        lab.ip_b("addr", "add", f"{INNER6_B}/64", "dev", lab.kernel_dev, "nodad")
    lab.ip_b("link", "set", lab.kernel_dev, "up")
    return lab


def address_tunnel(dev: str, inner6: bool = True) -> None:
    """Inner addresses on mqtun's TAP in namespace A (IPv6 too unless told otherwise: its
    MLD reports are repeated for a few seconds, which a per-worker count would see)."""
    _ip("addr", "add", f"{INNER_A}/24", "dev", dev)
    if inner6:
        _ip("addr", "add", f"{INNER6_A}/64", "dev", dev, "nodad")
    _ip("link", "set", dev, "up")


def ping(dst: str, count: int = 3, size: int = 56, timeout: float = 2.0,
         df: bool = False) -> int:
    """ICMP echo to `dst` from this thread's namespace over a raw socket (no ping binary
    needed): how many of `count` requests were answered."""
    import select
    import socket
    import struct

    from scapy.layers.inet import ICMP
    from scapy.layers.inet6 import ICMPv6EchoRequest

    v6 = ":" in dst
    family = socket.AF_INET6 if v6 else socket.AF_INET
    proto = socket.IPPROTO_ICMPV6 if v6 else socket.IPPROTO_ICMP
    ident = os.getpid() & 0xFFFF
    answered = 0
    with socket.socket(family, socket.SOCK_RAW, proto) as s:
        if df and not v6:
            s.setsockopt(socket.IPPROTO_IP, 10, 2)  # IP_MTU_DISCOVER = IP_PMTUDISC_DO
        for seq in range(count):
            payload = bytes(range(256)) * (size // 256) + bytes(size % 256)
            if v6:
                msg = bytes(ICMPv6EchoRequest(id=ident, seq=seq, data=payload))
            else:
                msg = bytes(ICMP(type=8, id=ident, seq=seq) / payload)
            try:
                s.sendto(msg, (dst, 0))
            except OSError:
                continue
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline:
                ready, _, _ = select.select([s], [], [], max(0.0, deadline - time.monotonic()))
                if not ready:
                    break
                data = s.recv(65535)
                icmp = data if v6 else data[(data[0] & 0x0F) * 4:]
                kind = 129 if v6 else 0
                if len(icmp) >= 8 and icmp[0] == kind and \
                        struct.unpack("!HH", icmp[4:8]) == (ident, seq):
                    answered += 1
                    break
    return answered


def _family(addr: str) -> int:
    import socket

    return socket.AF_INET6 if ":" in addr else socket.AF_INET


def tcp_exchange(server_ns: NetNamespace, server_addr: str, up: bytes, down: bytes,
                 timeout: float = 30.0) -> tuple[bytes, bytes]:
    """One TCP connection from this thread's namespace to `server_addr` in `server_ns`: the
    client sends `up` and half-closes, the server answers `down`. Returns (what the server
    got, what the client got)."""
    import socket

    got: dict[str, bytes] = {}
    errors: list[BaseException] = []
    ready = threading.Event()
    port_box: list[int] = []

    def serve() -> None:
        try:
            with server_ns.enter(), socket.socket(_family(server_addr)) as ls:
                ls.bind((server_addr, 0))
                ls.listen(1)
                ls.settimeout(timeout)
                port_box.append(ls.getsockname()[1])
                ready.set()
                conn, _ = ls.accept()
                with conn:
                    conn.settimeout(timeout)
                    chunks = []
                    while chunk := conn.recv(1 << 16):
                        chunks.append(chunk)
                    got["server"] = b"".join(chunks)
                    conn.sendall(down)
        except BaseException as exc:  # reported to the test below
            errors.append(exc)
            ready.set()

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    assert ready.wait(10), "the server did not start"
    assert not errors, errors
    with socket.create_connection((server_addr, port_box[0]), timeout=timeout) as c:
        c.sendall(up)
        c.shutdown(socket.SHUT_WR)
        chunks = []
        while chunk := c.recv(1 << 16):
            chunks.append(chunk)
    t.join(timeout)
    assert not errors, errors
    return got.get("server", b""), b"".join(chunks)


def udp_stream(rx_ns: NetNamespace | None, rx_addr: str, payloads: list[bytes],
               tx_ns: NetNamespace | None = None, segment: int = 0,
               timeout: float = 3.0) -> list[bytes]:
    """Send `payloads` from `tx_ns` (None: this thread's namespace) to a fresh UDP socket on
    `rx_addr` in `rx_ns`, paced; return what arrived, in arrival order. With `segment`, each
    payload goes out as one UDP_SEGMENT send (the kernel makes USO super-packets of it)."""
    import contextlib
    import select
    import socket

    def enter(ns: NetNamespace | None) -> contextlib.AbstractContextManager[None]:
        return ns.enter() if ns is not None else contextlib.nullcontext()

    with enter(rx_ns):
        rx = socket.socket(_family(rx_addr), socket.SOCK_DGRAM)
    try:
        rx.bind((rx_addr, 0))
        port = rx.getsockname()[1]
        rx.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
        with enter(tx_ns), socket.socket(_family(rx_addr), socket.SOCK_DGRAM) as tx:
            if segment:
                tx.setsockopt(17, 103, segment)  # SOL_UDP, UDP_SEGMENT
            for i, p in enumerate(payloads):
                tx.sendto(p, (rx_addr, port))
                if i % 8 == 7:
                    time.sleep(0.002)
        got: list[bytes] = []
        deadline = time.monotonic() + timeout
        want = sum(-(-len(p) // segment) if segment else 1 for p in payloads)
        while len(got) < want and time.monotonic() < deadline:
            r, _, _ = select.select([rx], [], [], 0.2)
            if r:
                got.append(rx.recv(65535))
        return got
    finally:
        rx.close()


def _mac(dev: str, ns: NetNamespace | None = None) -> str:
    import json

    argv = ["ip", "-j", "link", "show", "dev", dev]
    out = (ns.run(argv).stdout if ns is not None
           else subprocess.run(argv, check=True, capture_output=True, text=True).stdout)
    return str(json.loads(out)[0]["address"])


def pin_neighbours(lab: Lab, dev: str) -> None:
    """Permanent ARP entries both ways for the inner IPv4 addresses: no ARP probe (a non-flow
    frame, on queue 0) lands in the middle of a per-worker count."""
    _ip("neigh", "replace", INNER_B, "lladdr", _mac(lab.kernel_dev, lab.b), "dev", dev,
        "nud", "permanent")
    lab.ip_b("neigh", "replace", INNER_A, "lladdr", _mac(dev), "dev", lab.kernel_dev,
             "nud", "permanent")
