"""A real WireGuard peer for the interop tests: Debian's wireguard-go in its own namespace.

`WireguardGo` starts `wireguard-go -f NAME` inside a namespace (a unique NAME: the socket
directory /var/run/wireguard is shared by every namespace on the machine), configures it with
`wg set` from key files, gives its interface an address, and on exit kills the process it
started and removes its socket, whether the test passed or not. `command` runs another
implementation of the same contract instead (`mqtun wg --foreground`: `mqtun_wg_command`);
bench/bench_wireguard.py drives both through this class.
"""

from __future__ import annotations

import base64
import contextlib
import os
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass

from mqtun.netns import NetNamespace

SOCKET_DIR = "/var/run/wireguard"


def b64(key: bytes) -> str:
    return base64.b64encode(key).decode()


def mqtun_wg_command(*extra: str) -> list[str]:
    """`mqtun wg` in the foreground (with `extra` arguments, e.g. --queues 2): the command
    that `WireguardGo(command=...)` runs instead of wireguard-go."""
    return [sys.executable, "-m", "mqtun", "wg", "--foreground", *extra]


def underlay(theirs: NetNamespace, ours: str, their_end: str, our_address: str,
             their_address: str) -> None:
    """A veth from the caller's namespace (`ours`, `our_address`/24) to `theirs`
    (`their_end`, `their_address`/24), both ends up: the path the tunnel's datagrams take."""
    subprocess.run(["ip", "link", "add", ours, "type", "veth", "peer", "name", their_end,
                    "netns", theirs.name], check=True, timeout=10)
    subprocess.run(["ip", "address", "add", f"{our_address}/24", "dev", ours], check=True,
                   timeout=10)
    subprocess.run(["ip", "link", "set", ours, "up"], check=True, timeout=10)
    theirs.run(["ip", "address", "add", f"{their_address}/24", "dev", their_end])
    theirs.run(["ip", "link", "set", their_end, "up"])


def need_wireguard_go() -> None:
    import pytest

    if shutil.which("wireguard-go") is None or shutil.which("wg") is None:
        pytest.skip("wireguard-go and wireguard-tools are not installed "
                    "(scripts/install-test-deps.sh installs them)")


@dataclass
class PeerStats:
    endpoint: str
    allowed_ips: str
    latest_handshake: int
    rx_bytes: int
    tx_bytes: int


class WireguardGo:
    """wireguard-go running in `ns`, with interface `name` (killed and cleaned up on exit)."""

    def __init__(self, ns: NetNamespace, private_key: bytes, listen_port: int, *,
                 command: Sequence[str] = ("wireguard-go", "-f")) -> None:
        self.ns = ns
        self.command = list(command)
        self.name = f"wgmq{uuid.uuid4().hex[:8]}"
        self.private_key = private_key
        self.listen_port = listen_port
        self.socket = os.path.join(SOCKET_DIR, f"{self.name}.sock")
        self._tmp = tempfile.mkdtemp(prefix="mqtun-wg-")
        self._proc: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> WireguardGo:
        try:
            self._start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _start(self) -> None:
        self._proc = self.ns.popen([*self.command, self.name], stdout=subprocess.DEVNULL,
                                   stderr=subprocess.PIPE, env={**os.environ, "LOG_LEVEL": "error"})
        deadline = time.monotonic() + 10
        while not os.path.exists(self.socket):
            if self._proc.poll() is not None or time.monotonic() > deadline:
                err = self._proc.stderr.read().decode() if self._proc.stderr else ""
                raise RuntimeError(f"{self.command[0]} did not start: {err.strip()}")
            time.sleep(0.02)
        key_file = self._file("private", b64(self.private_key))
        self.wg("set", self.name, "private-key", key_file, "listen-port", str(self.listen_port))

    def _file(self, label: str, content: str) -> str:
        path = os.path.join(self._tmp, label)
        with open(path, "w") as f:
            f.write(content + "\n")
        os.chmod(path, 0o600)
        return path

    def wg(self, *args: str) -> str:
        return self.ns.run(["wg", *args], timeout=10).stdout

    def add_peer(self, public_key: bytes, *, allowed_ips: str, endpoint: str | None = None,
                 preshared_key: bytes | None = None, keepalive: int = 0) -> None:
        args = ["set", self.name, "peer", b64(public_key), "allowed-ips", allowed_ips]
        if endpoint:
            args += ["endpoint", endpoint]
        if preshared_key is not None:
            args += ["preshared-key", self._file("psk", b64(preshared_key))]
        if keepalive:
            args += ["persistent-keepalive", str(keepalive)]
        self.wg(*args)

    def address(self, cidr: str) -> None:
        self.ns.run(["ip", "address", "add", cidr, "dev", self.name])
        self.ns.run(["ip", "link", "set", self.name, "up"])

    def peer_stats(self, public_key: bytes) -> PeerStats:
        for line in self.wg("show", self.name, "dump").splitlines()[1:]:
            fields = line.split("\t")
            if fields[0] == b64(public_key):
                return PeerStats(fields[2], fields[3], int(fields[4]), int(fields[5]),
                                 int(fields[6]))
        raise AssertionError(f"wireguard-go has no peer {b64(public_key)}")

    @property
    def pid(self) -> int:
        """The implementation's process (`ip netns exec` execs it: the same pid)."""
        return self._proc.pid if self._proc is not None else 0

    def close(self) -> None:
        if self._proc is not None and self._proc.poll() is None:
            self._proc.terminate()
            try:
                self._proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait(timeout=5)
        if self._proc is not None and self._proc.stderr:
            self._proc.stderr.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.socket)
        shutil.rmtree(self._tmp, ignore_errors=True)
