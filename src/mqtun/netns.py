"""Named network namespaces: make one, step into it, run programs in it, remove it.

The demo, the benchmark and the tests build small topologies out of namespaces so that no
device, address or route ever touches the machine's own namespace. Creation and removal go
through iproute2's `ip netns` (the same bind mounts under /run/netns that every other tool
sees); entering is setns(2) on the calling thread.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import subprocess
import time
import uuid
from collections.abc import Iterator, Sequence
from typing import Any

from mqtun.errors import MqtunError

__all__ = ["NETNS_RUN_DIR", "NetNamespace", "setns"]

NETNS_RUN_DIR = "/run/netns"
_CLONE_NEWNET = 0x40000000
_libc = ctypes.CDLL(None, use_errno=True)


def setns(fd: int) -> None:
    """Move the calling thread into the network namespace that `fd` refers to."""
    if _libc.setns(fd, _CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise MqtunError(err, f"setns failed: {os.strerror(err)}", op="setns")


@contextlib.contextmanager
def entered(path: str) -> Iterator[None]:
    """Run the body inside the namespace at `path`, then return to the one we came from."""
    home = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
    try:
        target = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            setns(target)
        finally:
            os.close(target)
        try:
            yield
        finally:
            setns(home)
    finally:
        os.close(home)


class NetNamespace:
    """A named network namespace that this process made and will remove."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.path = os.path.join(NETNS_RUN_DIR, name)

    @classmethod
    def create(cls, name: str | None = None, *, prefix: str = "mqtun-") -> NetNamespace:
        """Create a namespace (a unique name by default) with its loopback up."""
        name = name or f"{prefix}{uuid.uuid4().hex[:8]}"
        _ip("netns", "add", name)
        ns = cls(name)
        try:
            ns.run(["ip", "link", "set", "lo", "up"])
        except BaseException:
            ns.delete()
            raise
        return ns

    def enter(self) -> contextlib.AbstractContextManager[None]:
        """Context manager: the calling thread works inside this namespace until it exits."""
        return entered(self.path)

    def command(self, argv: Sequence[str]) -> list[str]:
        """The argv that runs `argv` inside this namespace."""
        return ["ip", "netns", "exec", self.name, *argv]

    def run(
        self, argv: Sequence[str], *, check: bool = True, timeout: float = 30.0, **kwargs: Any
    ) -> subprocess.CompletedProcess[str]:
        """Run a program inside the namespace and wait for it (bounded by `timeout`)."""
        return subprocess.run(
            self.command(argv), check=check, timeout=timeout, text=True,
            capture_output=kwargs.pop("capture_output", True), **kwargs,
        )

    def popen(self, argv: Sequence[str], **kwargs: Any) -> subprocess.Popen[Any]:
        """Start a program inside the namespace."""
        return subprocess.Popen(self.command(argv), **kwargs)

    def pids(self) -> list[int]:
        """Processes whose network namespace is this one."""
        out = subprocess.run(
            ["ip", "netns", "pids", self.name], capture_output=True, text=True, timeout=10
        )
        return [int(p) for p in out.stdout.split() if p.isdigit()]

    def delete(self, *, grace: float = 1.0) -> None:
        """Stop every process left inside, then remove the namespace."""
        if not os.path.exists(self.path):
            return
        me = os.getpid()
        for sig in (signal.SIGTERM, signal.SIGKILL):
            pids = [p for p in self.pids() if p != me]
            if not pids:
                break
            for pid in pids:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, sig)
            deadline = time.monotonic() + grace
            while time.monotonic() < deadline and [p for p in self.pids() if p != me]:
                time.sleep(0.02)
        _ip("netns", "del", self.name, check=False)

    def __enter__(self) -> NetNamespace:
        return self

    def __exit__(self, *exc: object) -> None:
        self.delete()

    def __repr__(self) -> str:
        return f"NetNamespace({self.name!r})"


def _ip(*args: str, check: bool = True) -> None:
    proc = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)
    if check and proc.returncode != 0:
        raise MqtunError(
            1, f"`ip {' '.join(args)}` failed: {proc.stderr.strip()}", op="netns"
        )
