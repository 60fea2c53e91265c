"""The `mqtun` command line: argument parsing and exit codes only; the work is in mqtun.apps.

Exit codes: 0 ok, 1 the kernel (or the system) refused, 2 bad usage. Errors are one line on
stderr, never a traceback.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from collections.abc import Callable, Sequence
from typing import Any

from mqtun.errors import InvalidArgumentError, MqtunError
from mqtun.wireguard.command import add_wg_command

EXIT_OK, EXIT_REFUSED, EXIT_USAGE = 0, 1, 2


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        self.print_usage(sys.stderr)
        print(f"mqtun: error: {message}", file=sys.stderr)
        raise SystemExit(EXIT_USAGE)


def _name(value: str) -> str:
    from mqtun.device import validate_name

    try:
        if not value:
            raise InvalidArgumentError("the device name is empty")
        validate_name(value)
    except InvalidArgumentError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return value


def _number(convert: Callable[[str], Any], what: str, low: float, high: float, *,
            above: bool = False) -> Callable[[str], Any]:
    """An argparse type: a number in [low, high] (or (low, high] when `above`)."""
    bounds = f"({low}, {high}]" if above else f"{low}..{high}"

    def parse(value: str) -> Any:
        try:
            n = convert(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a number: {value!r}") from None
        if not (low < n if above else low <= n) or n > high:
            raise argparse.ArgumentTypeError(f"{what} must be {bounds}, not {value}")
        return n

    return parse


_queue_count = _number(int, "queue count", 1, 256)
_repeat_count = _number(int, "repeat count", 1, 1000)
_frame_count = _number(int, "iterations", 1, 10**9)
_interval = _number(float, "interval (seconds)", 0.05, 3600)
_positive_seconds = _number(float, "seconds", 0, 3600, above=True)


# ---- commands -------------------------------------------------------------------------------
def _add_create(sub: Any) -> None:
    p = sub.add_parser("create", help="create a persistent tun/tap device")
    p.add_argument("name", type=_name, help="device name, or a pattern such as mq%%d")
    p.add_argument("--tap", action="store_true", help="a TAP (Ethernet) device, not TUN (IP)")
    p.add_argument("--multi-queue", action="store_true", help="allow more than one queue")
    p.add_argument("--vnet-hdr", action="store_true", help="queues carry a virtio-net header")
    p.add_argument("--packet-info", action="store_true", help="keep the 4-byte PI header")
    p.add_argument("--owner", help="user allowed to open queues without CAP_NET_ADMIN")
    p.add_argument("--group", help="group allowed to open queues without CAP_NET_ADMIN")
    p.set_defaults(run=_run_create)


def _run_create(args: argparse.Namespace) -> int:
    from mqtun.apps.manage import create_persistent

    print(create_persistent(args.name, tap=args.tap, multi_queue=args.multi_queue,
                            vnet_hdr=args.vnet_hdr, packet_info=args.packet_info,
                            owner=args.owner, group=args.group))
    return EXIT_OK


def _add_delete(sub: Any) -> None:
    p = sub.add_parser("delete", help="delete a tun/tap device")
    p.add_argument("name", type=_name)
    p.set_defaults(run=_run_delete)


def _run_delete(args: argparse.Namespace) -> int:
    from mqtun.apps.manage import delete_device

    delete_device(args.name)
    return EXIT_OK


def _add_show(sub: Any) -> None:
    p = sub.add_parser("show", help="show tun/tap devices, their queues and who holds them")
    p.add_argument("name", nargs="?", type=_name)
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(run=_run_show)


def _run_show(args: argparse.Namespace) -> int:
    from mqtun.apps.manage import describe, live_queues
    from mqtun.apps.render import render_show

    rows = describe(args.name)
    live = live_queues(rows)
    if args.json:
        print(json.dumps([{**info.as_dict(), "holders": [dataclasses.asdict(h) for h in holders],
                           "live_queues": [q.as_dict() for q in live.get(info.name, [])]}
                          for info, holders in rows], indent=2))
    else:
        print(render_show(rows, live), end="")
    return EXIT_OK


def _add_forward(sub: Any) -> None:
    from mqtun.runtime.loop import DEFAULT_MODE, MODES

    p = sub.add_parser("forward", help="create two devices and move packets between them, "
                       "one worker per queue pair")
    p.add_argument("dev_a", type=_name, metavar="DEV_A")
    p.add_argument("dev_b", type=_name, metavar="DEV_B")
    p.add_argument("--queues", type=_queue_count, default=1, help="queues per device (1..256)")
    p.add_argument("--tap", action="store_true", help="TAP (Ethernet) devices, not TUN (IP)")
    off = p.add_mutually_exclusive_group()
    off.add_argument("--no-offload", dest="offload", action="store_false",
                     help="no virtio-net header, no CSUM/TSO/USO offloads")
    off.add_argument("--vnet-hdr", dest="offload", action="store_true",
                     help="virtio-net header and offloads (the default)")
    p.add_argument("--cpus", help="pin workers to these CPUs, e.g. 0-3,6 or auto")
    p.add_argument("--mode", choices=MODES, default=DEFAULT_MODE, help="I/O loop mode")
    p.add_argument("--batch", type=int, default=64, help="packets drained per queue per turn")
    p.add_argument("--spin-us", type=int, default=50, help="adaptive mode: spin before sleeping")
    p.add_argument("--user", help="after opening the queues, run as this user (drop root)")
    p.add_argument("--group", help="with --user: run as this group (default: the user's)")

    def run(args: argparse.Namespace) -> int:
        import signal

        from mqtun.apps.forward import ForwardConfig, Forwarder
        from mqtun.runtime.workers import parse_cpus

        parse_cpus(args.cpus)  # a bad list is a usage error before anything is created
        fwd = Forwarder(ForwardConfig(args.dev_a, args.dev_b, args.queues, args.tap,
                                      args.offload, args.cpus, args.mode, args.batch,
                                      args.spin_us, user=args.user, group=args.group),
                        on_event=lambda ev: ev.kind in ("crashed", "restarted", "gave-up",
                                                        "gone")
                        and print(f"mqtun: {ev}", file=sys.stderr, flush=True))
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: fwd.request_stop())
        signal.signal(signal.SIGUSR1, lambda *_: fwd.request_stats())
        try:
            fwd.open()
            print(f"READY queues={fwd.queue_count}", flush=True)
            fwd.run(on_stats=lambda lines: print("\n".join(lines), file=sys.stderr,
                                                 flush=True))
        finally:
            fwd.close()
        return EXIT_OK

    p.set_defaults(run=run)


def _add_top(sub: Any) -> None:
    p = sub.add_parser("top", help="live per-queue rates of a running mqtun process")
    p.add_argument("which", nargs="?", metavar="PID|NAME",
                   help="the process: its pid, its pool's name or PID.NAME (default: the "
                        "only one running)")
    p.add_argument("--interval", type=_interval, default=1.0, help="seconds between refreshes")
    frames = p.add_mutually_exclusive_group()
    frames.add_argument("--iterations", type=_frame_count, metavar="N",
                        help="print N snapshots, one per interval, and exit (no screen)")
    frames.add_argument("--once", dest="iterations", action="store_const", const=1,
                        help="print one snapshot and exit")

    def run(args: argparse.Namespace) -> int:
        import signal

        from mqtun.apps.top import TopEnd, find_region, run_top

        region = find_region(args.which)

        def interrupt(*_: object) -> None:
            raise KeyboardInterrupt  # leave the screen the way q does

        for sig in (signal.SIGTERM, signal.SIGHUP):
            signal.signal(sig, interrupt)
        try:
            end = run_top(region, interval=args.interval, iterations=args.iterations,
                          out=sys.stdout, keys=sys.stdin)
        finally:
            region.close()
        if end is TopEnd.EXITED:
            print(f"mqtun top: pid {region.pid} ({region.name}) has exited", file=sys.stderr)
        return EXIT_OK

    p.set_defaults(run=run)


def _add_demo(sub: Any) -> None:
    p = sub.add_parser("demo", help="a 2-queue forwarder between two namespaces, TCP and UDP "
                       "through it, per-queue shares (root; everything is removed after)")
    p.add_argument("--seconds", type=_positive_seconds, default=6.0,
                   help="traffic time, half TCP and half UDP (default 6)")
    p.add_argument("--queues", type=_queue_count, default=2, help="forwarder queues (default 2)")

    def run(args: argparse.Namespace) -> int:
        import signal

        from mqtun.apps.demo import render_demo, run_demo

        def interrupt(*_: object) -> None:
            raise KeyboardInterrupt  # SIGTERM cleans up the way Ctrl-C does

        signal.signal(signal.SIGTERM, interrupt)
        result = run_demo(args.seconds, args.queues,
                          report=lambda line: print(f"mqtun demo: {line}", flush=True))
        print(render_demo(result), end="")
        return EXIT_OK

    p.set_defaults(run=run)


def _add_bench(sub: Any) -> None:
    from mqtun.apps.bench import CONFIGS, WORKLOADS

    p = sub.add_parser("bench", help="forwarder throughput, request/response and packet rate "
                       "against veth and python-pytun (root; namespaces only)")
    p.add_argument("--repeat", type=_repeat_count, default=3, help="runs of everything (3)")
    p.add_argument("--seconds", type=_positive_seconds, default=3.0,
                   help="seconds per workload run (3)")
    p.add_argument("--configs", help=f"comma-separated subset of: {', '.join(CONFIGS)}")
    p.add_argument("--workloads", help=f"comma-separated subset of: {', '.join(WORKLOADS)}")
    p.add_argument("--short", action="store_true",
                   help="test mode: 1 repeat of 1 s, configs veth,mqtun-2q,pytun-1q unless "
                        "--configs says otherwise")
    p.add_argument("--out", default="bench/results", help="directory for results.json, "
                   "table.md and chart.png (default bench/results)")
    p.add_argument("--tool-cpus", help="pin iperf3/sockperf to these CPUs (taskset -c LIST); "
                   "default: not pinned")

    def run(args: argparse.Namespace) -> int:
        import signal
        from pathlib import Path

        from mqtun.apps.bench import SHORT_CONFIGS, parse_names, run_bench, write_report

        configs = parse_names(args.configs or (",".join(SHORT_CONFIGS) if args.short else None),
                              list(CONFIGS), "configuration")
        workloads = parse_names(args.workloads, list(WORKLOADS), "workload")
        repeat, seconds = (1, 1.0) if args.short else (args.repeat, args.seconds)

        def interrupt(*_: object) -> None:
            raise KeyboardInterrupt  # SIGTERM cleans up the way Ctrl-C does

        signal.signal(signal.SIGTERM, interrupt)
        result = run_bench(configs, workloads, seconds=seconds, repeat=repeat,
                           tool_cpus=args.tool_cpus,
                           progress=lambda line: print(line, file=sys.stderr, flush=True))
        paths = write_report(result, Path(args.out))
        print(paths["table"].read_text(), end="")
        print(f"\nwritten: {', '.join(str(x) for x in paths.values())}")
        return EXIT_OK

    p.set_defaults(run=run)


# Each entry adds one subcommand. A new command: one function here, one line in this table.
COMMANDS: list[Callable[[Any], None]] = [_add_create, _add_delete, _add_show]
COMMANDS.append(_add_forward)
COMMANDS.append(_add_demo)
COMMANDS.append(_add_bench)
COMMANDS.append(_add_top)

COMMANDS.append(add_wg_command)  # mqtun wg: the parser lives in mqtun.wireguard.command


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="mqtun", description="Multiqueue TUN/TAP devices for Python.")
    parser.add_argument("--version", action="version", version="mqtun 0.1.0")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    for add in COMMANDS:
        add(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.run(args))
    except InvalidArgumentError as exc:
        print(f"mqtun: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except MqtunError as exc:
        print(f"mqtun: {exc}", file=sys.stderr)
        return EXIT_REFUSED
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # output piped into `head` and closed early
        sys.stderr.close()
        return EXIT_OK
