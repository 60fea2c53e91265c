"""`mqtun wg [--foreground] [--queues N] IFNAME` and the `mqtun-wg` console script.

wireguard-go's command contract, so `wg-quick` can use it
(WG_QUICK_USERSPACE_IMPLEMENTATION=mqtun-wg): create IFNAME and its configuration socket,
go to the background unless --foreground (or WG_PROCESS_FOREGROUND=1), the parent exiting 0
once the socket is served; run until SIGTERM/SIGINT or until the interface is deleted.
Argument parsing only; errors surface as MqtunError for mqtun.cli to print.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from typing import Any

from mqtun.errors import MqtunError

__all__ = ["add_wg_command", "main", "run_wg"]

_START_TIMEOUT = 10.0


def _configure(p: argparse.ArgumentParser) -> None:
    p.add_argument("-f", "--foreground", action="store_true",
                   help="stay in the foreground (default: detach once the socket is up)")
    p.add_argument("--queues", type=int, default=1, metavar="N",
                   help="TUN queues (default 1)")
    p.add_argument("--no-offload", action="store_true",
                   help="no TUN offloads, UDP GSO or GRO: one packet per read, send and write")
    p.add_argument("ifname", help="the interface to create, e.g. wg0")
    p.set_defaults(run=run_wg)


def add_wg_command(sub: Any) -> None:
    """Register `mqtun wg` on mqtun.cli's subparsers."""
    _configure(sub.add_parser("wg", help="a userspace WireGuard interface (wireguard-go's "
                                         "contract: wg and wg-quick drive it)"))


def run_wg(args: argparse.Namespace) -> int:
    if not 1 <= args.queues <= 256:
        raise MqtunError(22, f"--queues must be 1..256, not {args.queues}", op="wg")
    if args.foreground or os.environ.get("WG_PROCESS_FOREGROUND") == "1":
        return _serve(args.ifname, args.queues, offloads=not args.no_offload)
    return _detach(args.ifname, args.queues, offloads=not args.no_offload)


def _serve(ifname: str, queues: int, *, offloads: bool) -> int:
    from mqtun.wireguard.endpoint import Endpoint
    from mqtun.wireguard.workers import MultiEndpoint

    endpoint = (MultiEndpoint(ifname, queues=queues, offloads=offloads) if queues > 1
                else Endpoint(ifname, offloads=offloads))
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    endpoint.run(stop)
    return 0


def _detach(ifname: str, queues: int, *, offloads: bool) -> int:
    from mqtun.wireguard.control import socket_path

    child = subprocess.Popen(
        [sys.executable, "-m", "mqtun", "wg", "--foreground", "--queues", str(queues),
         *([] if offloads else ["--no-offload"]), ifname],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        start_new_session=True)
    deadline = time.monotonic() + _START_TIMEOUT
    path = socket_path(ifname)
    while time.monotonic() < deadline:
        if child.poll() is not None:
            err = child.stderr.read().decode().strip() if child.stderr else ""
            raise MqtunError(1, err or f"mqtun wg {ifname} exited with {child.returncode}",
                             op="wg")
        if os.path.exists(path):
            if child.stderr:
                child.stderr.close()
            return 0
        time.sleep(0.02)
    child.kill()
    child.wait(timeout=5)
    raise MqtunError(110, f"mqtun wg {ifname} did not start within {_START_TIMEOUT:.0f} s",
                     op="wg")


def main(argv: Sequence[str] | None = None) -> int:
    """The `mqtun-wg` console script: the same as `mqtun wg`."""
    from mqtun.cli import main as mqtun_main

    return mqtun_main(["wg", *(sys.argv[1:] if argv is None else argv)])
