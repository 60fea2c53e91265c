"""Named network namespaces: make one, step into it, run programs in it, remove it.

The demo, the benchmark and the tests build small topologies out of namespaces so that no
device, address or route ever touches the machine's own namespace. Creation, removal and
setns(2) go through pyroute2.netns (the same bind mounts under /run/netns that `ip netns`
makes and every other tool sees); entering changes the calling thread only. Programs run
inside with `ip netns exec`, which also gives them the namespace's /etc/netns files.
"""

from __future__ import annotations

import contextlib
import errno
import os
import signal
import subprocess
import time
import uuid
from collections.abc import Iterator, Sequence
from typing import Any

from pyroute2 import IPRoute  # type: ignore[import-untyped]
from pyroute2 import netns as _pyroute2_netns
from pyroute2.netlink.exceptions import NetlinkError  # type: ignore[import-untyped]

from mqtun.errors import MqtunError

__all__ = ["NETNS_RUN_DIR", "NetNamespace", "entered", "entered_fd", "setns"]

NETNS_RUN_DIR = "/run/netns"
_THREAD_NETNS = "/proc/thread-self/ns/net"


def setns(fd: int) -> None:
    """Move the calling thread into the network namespace that `fd` refers to."""
    try:
        _pyroute2_netns.setns(fd)
    except OSError as exc:
        err = exc.errno or 0
        raise MqtunError(err, f"setns failed: {os.strerror(err)}", op="setns") from None


@contextlib.contextmanager
def entered_fd(fd: int) -> Iterator[None]:
    """Run the body inside the namespace `fd` refers to, then return to the one we came from."""
    home = os.open(_THREAD_NETNS, os.O_RDONLY | os.O_CLOEXEC)
    try:
        setns(fd)
        try:
            yield
        finally:
            setns(home)
    finally:
        os.close(home)


@contextlib.contextmanager
def entered(path: str) -> Iterator[None]:
    """Run the body inside the namespace at `path`, then return to the one we came from."""
    target = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        with entered_fd(target):
            yield
    finally:
        os.close(target)


class NetNamespace:
    """A named network namespace that this process made and will remove."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.path = os.path.join(NETNS_RUN_DIR, name)

    @classmethod
    def create(cls, name: str | None = None, *, prefix: str = "mqtun-") -> NetNamespace:
        """Create a namespace (a unique name by default) with its loopback up."""
        name = name or f"{prefix}{uuid.uuid4().hex[:8]}"
        if os.path.exists(os.path.join(NETNS_RUN_DIR, name)):
            raise MqtunError(errno.EEXIST, f"network namespace {name} exists already", op="netns")
        try:
            _pyroute2_netns.create(name)
        except Exception as exc:  # pyroute2 runs it in a child: not always an OSError
            err = getattr(exc, "errno", None) or errno.EPERM
            with contextlib.suppress(OSError):
                _pyroute2_netns.remove(name)
            raise MqtunError(err, f"cannot create network namespace {name}: "
                             f"{os.strerror(err)} (it needs CAP_SYS_ADMIN)", op="netns") from None
        ns = cls(name)
        try:
            with ns.enter(), IPRoute() as ipr:
                ipr.link("set", index=ipr.link_lookup(ifname="lo")[0], state="up")
        except NetlinkError as exc:
            ns.delete()
            raise MqtunError(exc.code, f"cannot bring lo up in network namespace {name}: "
                             f"{os.strerror(exc.code)} (it needs CAP_NET_ADMIN)",
                             op="netns") from None
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
        pids: list[int] = _pyroute2_netns.ns_pids(NETNS_RUN_DIR).get(self.name, [])
        return pids

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
        with contextlib.suppress(OSError):
            _pyroute2_netns.remove(self.name)

    def __enter__(self) -> NetNamespace:
        return self

    def __exit__(self, *exc: object) -> None:
        self.delete()

    def __repr__(self) -> str:
        return f"NetNamespace({self.name!r})"
