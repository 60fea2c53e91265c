"""Small traffic helpers shared by the tests (sockets and packet builders, bounded waits)."""

from __future__ import annotations

import select
import socket
import threading
import time
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, TypeVar

from scapy.layers.inet import ICMP, IP, UDP
from scapy.layers.inet6 import IPv6

if TYPE_CHECKING:
    from mqtun.netns import NetNamespace

T = TypeVar("T")

ADDR_A = "198.18.0.1"  # the device's own address in tests
ADDR_B = "198.18.0.2"  # a peer "behind" the device
NET = "198.18.0.1/24"
ADDR6_A = "fd00:6d71::1"
ADDR6_B = "fd00:6d71::2"
NET6 = "fd00:6d71::1/64"


def udp_flows(dst: str, ports: Iterable[int], payload: bytes = b"mqtun", *,
              src_port: int = 0) -> int:
    """Send one UDP datagram to each port of `dst`; return how many were sent."""
    family = socket.AF_INET6 if ":" in dst else socket.AF_INET
    n = 0
    with socket.socket(family, socket.SOCK_DGRAM) as s:
        if src_port:
            s.bind(("", src_port))
        for port in ports:
            s.sendto(payload, (dst, port))
            n += 1
    return n


def echo_request(
    src: str, dst: str, ident: int = 7, seq: int = 1, payload: bytes = b"ping"
) -> bytes:
    """An ICMP echo request as raw IP bytes (scapy builds it: an independent encoder)."""
    return bytes(IP(src=src, dst=dst) / ICMP(id=ident, seq=seq) / payload)


def udp_packet(src: str, dst: str, sport: int, dport: int, payload: bytes = b"x") -> bytes:
    if ":" in src:
        return bytes(IPv6(src=src, dst=dst) / UDP(sport=sport, dport=dport) / payload)
    return bytes(IP(src=src, dst=dst) / UDP(sport=sport, dport=dport) / payload)


def _private_tun_node() -> None:
    """Give this process a /dev/net/tun with the usual 0666 mode, in a private mount namespace.

    Distributions ship the node world-usable (the kernel checks owner/group on attach); some
    machines have it 0600. Nothing outside this process changes.
    """
    import ctypes
    import os
    import stat

    libc = ctypes.CDLL(None, use_errno=True)
    CLONE_NEWNS, MS_REC, MS_PRIVATE = 0x00020000, 0x4000, 0x40000
    if libc.unshare(CLONE_NEWNS) != 0:
        raise OSError(ctypes.get_errno(), "unshare(CLONE_NEWNS)")
    if libc.mount(b"none", b"/", None, MS_REC | MS_PRIVATE, None) != 0:
        raise OSError(ctypes.get_errno(), "mount --make-rprivate /")
    if libc.mount(b"tmpfs", b"/dev/net", b"tmpfs", 0, b"mode=755") != 0:
        raise OSError(ctypes.get_errno(), "mount tmpfs /dev/net")
    os.mknod("/dev/net/tun", 0o666 | stat.S_IFCHR, os.makedev(10, 200))
    os.chmod("/dev/net/tun", 0o666)


def run_as(user: str, fn: Callable[[], T], timeout: float = 30.0) -> T:
    """Run `fn` in a forked child that has dropped to `user` (no capabilities left).

    The child inherits the loaded modules and the test's network namespace, so no Python
    binary has to be reachable by that user. The result comes back pickled over a pipe.
    """
    import os
    import pickle
    import pwd

    pw = pwd.getpwnam(user)
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # child
        code = 0
        try:
            os.close(r)
            _private_tun_node()
            os.setgroups([])
            os.setresgid(pw.pw_gid, pw.pw_gid, pw.pw_gid)
            os.setresuid(pw.pw_uid, pw.pw_uid, pw.pw_uid)
            try:
                payload = pickle.dumps(("ok", fn()))
            except BaseException as exc:  # report, never propagate out of the child
                payload = pickle.dumps(("raised", f"{type(exc).__name__}: {exc}"))
            os.write(w, payload)
        except BaseException:
            code = 1
        finally:
            os._exit(code)
    os.close(w)
    chunks = []
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([r], [], [], 0.1)
            if ready:
                chunk = os.read(r, 65536)
                if not chunk:
                    break
                chunks.append(chunk)
        else:
            os.kill(pid, 9)
            raise TimeoutError(f"child as {user} did not finish in {timeout}s")
    finally:
        os.close(r)
        os.waitpid(pid, 0)
    status, value = pickle.loads(b"".join(chunks))
    if status != "ok":
        raise AssertionError(f"child as {user} raised {value}")
    return value  # type: ignore[no-any-return]


def wait_for(predicate: Callable[[], T], timeout: float = 5.0, interval: float = 0.01,
             message: Callable[[], str] | None = None) -> T:
    """Poll `predicate` until it returns something truthy; fail after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            extra = f": {message()}" if message else ""
            raise TimeoutError(f"condition not met within {timeout}s{extra}")
        time.sleep(interval)


def drain(fds_to_queues: dict[int, object], read: Callable[[object], list[bytes]],
          expect: int, timeout: float = 5.0) -> dict[object, list[bytes]]:
    """Read from several queues until `expect` packets arrived (or time runs out)."""
    got: dict[object, list[bytes]] = {q: [] for q in fds_to_queues.values()}
    total = 0
    deadline = time.monotonic() + timeout
    while total < expect and time.monotonic() < deadline:
        ready, _, _ = select.select(list(fds_to_queues), [], [], 0.1)
        for fd in ready:
            q = fds_to_queues[fd]
            pkts = read(q)
            got[q].extend(pkts)
            total += len(pkts)
    return got


def cli_in_process(argv: list[str]) -> tuple[int, str, str]:
    """Run the `mqtun` CLI in this process (e.g. in a forked, unprivileged child from
    `run_as`): exit code, stdout, stderr."""
    import contextlib
    import io

    from mqtun.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main(argv)
        except SystemExit as exc:
            code = int(exc.code or 0)
    return code, out.getvalue(), err.getvalue()


def tcp_exchange(ns2: NetNamespace, server_addr: str, up: bytes, down: bytes,
                 timeout: float) -> tuple[bytes, bytes]:
    """Client (here) sends `up` to a server in `ns2` at `server_addr`, which answers `down`;
    returns what each side received."""
    family = socket.AF_INET6 if ":" in server_addr else socket.AF_INET
    with ns2.enter():
        listener = socket.socket(family, socket.SOCK_STREAM)
    received: list[bytes] = []
    failure: list[BaseException] = []

    def serve() -> None:
        try:
            conn, _ = listener.accept()
            with conn:
                conn.settimeout(timeout)
                chunks = []
                while chunk := conn.recv(1 << 20):
                    chunks.append(chunk)
                received.append(b"".join(chunks))
                conn.sendall(down)
        except BaseException as exc:
            failure.append(exc)

    with listener:
        listener.bind((server_addr, 0))
        listener.listen(1)
        listener.settimeout(timeout)
        server = threading.Thread(target=serve, daemon=True)
        server.start()
        with socket.create_connection(listener.getsockname()[:2], timeout=timeout) as client:
            client.sendall(up)
            client.shutdown(socket.SHUT_WR)
            chunks = []
            while chunk := client.recv(1 << 20):
                chunks.append(chunk)
        server.join(timeout)
    assert not failure, failure
    return received[0], b"".join(chunks)
