"""The benchmark's peer: the same forwarder written with python-pytun, as its users write one.

    python -m mqtun.apps.pytun_forward [--queues N] [--cpus auto|LIST] [--compat] DEV_A DEV_B

Opens N queues on each of two TUN devices (IFF_MULTI_QUEUE when N > 1; python-pytun attaches
another queue when a name is opened again), forks one process per queue pair, and moves every
packet across with python-pytun's own API: select() on the two devices, one read(), one
write(). Same contract as ``mqtun forward`` for the benchmark's sake: ``READY queues=N`` on
stdout, SIGTERM ends it. python-pytun has no offload support, so there is no offload option.
Needs python-pytun (the ``test`` extra). With ``--compat`` the very same program runs on
`mqtun.compat.pytun`, as a python-pytun user who switched its one import line would: the
benchmark's measure of that face's speed promise.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import os
import select
import signal
import sys
from collections.abc import Sequence
from typing import Any, Protocol

from mqtun import _uapi


class _Stop(Exception):
    """SIGTERM/SIGINT: leave the wait (a handler that returns would be retried, PEP 475)."""


class _TunTap(Protocol):
    """What this program uses of python-pytun's TunTapDevice."""

    def fileno(self) -> int: ...
    def read(self, size: int, /) -> bytes: ...
    def write(self, data: bytes, /) -> int: ...


def _library(compat: bool) -> Any:
    """python-pytun, or mqtun's face of it: the one import line a user changes."""
    if compat:
        import mqtun.compat.pytun as pytun
    else:
        import pytun  # type: ignore[import-not-found, import-untyped, no-redef, unused-ignore]
    return pytun


def _serve(pytun: Any, a: _TunTap, b: _TunTap) -> None:
    """One queue pair, forever: whichever device is readable, one packet to the other."""
    peer = {a: b, b: a}
    while True:
        for dev in select.select([a, b], [], [])[0]:
            packet = dev.read(65536)
            with contextlib.suppress(pytun.Error):
                peer[dev].write(packet)


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="pytun_forward", description=__doc__.split("\n")[0])
    ap.add_argument("dev_a")
    ap.add_argument("dev_b")
    ap.add_argument("--queues", type=int, default=1)
    ap.add_argument("--cpus", help="pin worker i to the i-th CPU of this list, or auto")
    ap.add_argument("--compat", action="store_true",
                    help="run on mqtun.compat.pytun instead of python-pytun")
    args = ap.parse_args(argv)
    pytun = _library(args.compat)

    from mqtun.runtime.workers import parse_cpus

    cpus = parse_cpus(args.cpus)
    flags = pytun.IFF_TUN | pytun.IFF_NO_PI | (pytun.IFF_MULTI_QUEUE if args.queues > 1 else 0)
    qa = [pytun.TunTapDevice(name=args.dev_a, flags=flags) for _ in range(args.queues)]
    qb = [pytun.TunTapDevice(name=args.dev_b, flags=flags) for _ in range(args.queues)]
    qa[0].up()
    qb[0].up()
    children = []
    for i in range(args.queues):
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                ctypes.CDLL(None).prctl(_uapi.PR_SET_PDEATHSIG, signal.SIGKILL)
                signal.signal(signal.SIGTERM, signal.SIG_DFL)
                signal.signal(signal.SIGINT, signal.SIG_IGN)
                if cpus:
                    os.sched_setaffinity(0, {cpus[i % len(cpus)]})
                _serve(pytun, qa[i], qb[i])
            finally:
                os._exit(code)
        children.append(pid)
    def on_signal(*_: object) -> None:
        raise _Stop

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    print(f"READY queues={args.queues}", flush=True)
    code = 0
    try:
        pid, _ = os.waitpid(-1, 0)  # a worker that dies ends the forwarder
        print(f"pytun_forward: worker {pid} died", file=sys.stderr, flush=True)
        code = 1
    except _Stop:
        pass
    for pid in children:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, 0)
    for dev in (*qa, *qb):
        dev.close()
    return code


if __name__ == "__main__":
    raise SystemExit(main())
