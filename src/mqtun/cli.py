"""The `mqtun` command line: argument parsing and exit codes only; the work is in mqtun.apps.

Exit codes: 0 ok, 1 the kernel (or the system) refused, 2 bad usage. Errors are one line on
stderr, never a traceback.
"""

from __future__ import annotations

import argparse
import dataclasses
import errno
import json
import sys
from collections.abc import Callable, Sequence
from typing import Any

from mqtun.apps.args import device_name as _name
from mqtun.errors import InvalidArgumentError, MqtunError, PermissionDeniedError
from mqtun.wireguard.command import add_wg_command

EXIT_OK, EXIT_REFUSED, EXIT_USAGE = 0, 1, 2


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """`--help` names each option's default, except where there is none to name."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if (action.default in (None, argparse.SUPPRESS) or action.nargs == 0
                or not action.option_strings  # nargs 0: a flag, whose default says nothing
                or "default" in (action.help or "")):  # its help names it already
            return action.help
        return super()._get_help_string(action)


class _Parser(argparse.ArgumentParser):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", _HelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> None:  # type: ignore[override]
        self.print_usage(sys.stderr)
        print(f"mqtun: error: {message}", file=sys.stderr)
        raise SystemExit(EXIT_USAGE)


def _new_name(value: str) -> str:
    """A name for a device to create: a fixed name, or a pattern such as mq%d."""
    value = _name(value)
    if "%" in value and not value.replace("%d", "").strip("0123456789"):
        raise argparse.ArgumentTypeError(
            f"{value!r} would make a device named by a number only; give the pattern a "
            f"prefix, e.g. mq{value}")
    return value


def _already_exists(exc: MqtunError, remedy: str) -> MqtunError:
    """The library's "already exists" speaks Python (Device.attach); say it in commands."""
    if exc.errno == errno.EBUSY and exc.op == "create" and exc.device:
        return MqtunError(exc.errno, f"device {exc.device} already exists: {remedy}",
                          device=exc.device, op=exc.op)
    return exc


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
_batch = _number(int, "the batch size (packets)", 1, 4096)
_spin_us = _number(int, "the spin time (microseconds)", 0, 1_000_000)
_steal_pct = _number(float, "steal (% of the cores)", 0, 100)


# ---- commands -------------------------------------------------------------------------------
def _add_create(sub: Any) -> None:
    p = sub.add_parser("create", help="create a persistent tun/tap device")
    p.add_argument("name", type=_new_name, help="device name, or a pattern such as mq%%d")
    p.add_argument("--tap", action="store_true", help="a TAP (Ethernet) device, not TUN (IP)")
    p.add_argument("--multi-queue", action="store_true", help="allow more than one queue")
    p.add_argument("--vnet-hdr", action="store_true", help="queues carry a virtio-net header")
    p.add_argument("--packet-info", action="store_true", help="keep the 4-byte PI header")
    p.add_argument("--owner", metavar="USER",
                   help="user allowed to open queues without CAP_NET_ADMIN")
    p.add_argument("--group", metavar="GROUP",
                   help="group allowed to open queues without CAP_NET_ADMIN")
    p.set_defaults(run=_run_create)


def _run_create(args: argparse.Namespace) -> int:
    from mqtun.apps.manage import create_persistent

    try:
        name = create_persistent(args.name, tap=args.tap, multi_queue=args.multi_queue,
                                 vnet_hdr=args.vnet_hdr, packet_info=args.packet_info,
                                 owner=args.owner, group=args.group)
    except MqtunError as exc:
        pattern = (args.name.rstrip("0123456789") or "mq") + "%d"
        raise _already_exists(exc, f"delete it first (`mqtun delete {args.name}`), or give "
                              f"a pattern such as {pattern}, which picks a free name") from None
    print(name)
    return EXIT_OK


def _add_delete(sub: Any) -> None:
    p = sub.add_parser("delete", help="delete a tun/tap device")
    p.add_argument("name", type=_name, help="the device's name")
    p.set_defaults(run=_run_delete)


def _run_delete(args: argparse.Namespace) -> int:
    from mqtun.apps.manage import delete_device

    delete_device(args.name)
    return EXIT_OK


def _add_show(sub: Any) -> None:
    p = sub.add_parser("show", help="show tun/tap devices, their queues and who holds them")
    p.add_argument("name", nargs="?", type=_name, help="one device (default: every one)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--clean", action="store_true",
                   help="first remove counters regions left by dead processes (kill -9)")
    p.set_defaults(run=_run_show)


def _run_show(args: argparse.Namespace) -> int:
    from mqtun.apps.manage import describe, live_queues
    from mqtun.apps.render import render_show

    if args.clean:
        from mqtun.runtime.shm import remove_stale_regions

        for path in remove_stale_regions():
            print(f"removed {path}", file=sys.stderr)
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
    from mqtun.runtime.loop import DEFAULT_BATCH, DEFAULT_MODE, DEFAULT_SPIN_US, MODES

    p = sub.add_parser("forward", help="move packets between two devices, one worker per "
                       "queue pair (creates them, or --attach to existing ones)")
    p.add_argument("dev_a", type=_name, metavar="DEV_A", help="the first device")
    p.add_argument("dev_b", type=_name, metavar="DEV_B", help="the second device")
    p.add_argument("--queues", type=_queue_count, default=1, help="queues per device (1..256)")
    p.add_argument("--attach", action="store_true",
                   help="serve two existing devices (e.g. made by `mqtun create --owner USER`, "
                        "opened as that USER) instead of creating them; they are left in place "
                        "at exit")
    p.add_argument("--tap", action="store_true", help="TAP (Ethernet) devices, not TUN (IP)")
    off = p.add_mutually_exclusive_group()
    off.add_argument("--no-offload", dest="offload", action="store_false",
                     help="no virtio-net header, no CSUM/TSO/USO offloads")
    off.add_argument("--vnet-hdr", dest="offload", action="store_true",
                     help="virtio-net header and offloads (the default)")
    p.add_argument("--cpus", help="pin workers to these CPUs, e.g. 0-3,6 or auto")
    p.add_argument("--mode", choices=MODES, default=DEFAULT_MODE, help="I/O loop mode")
    p.add_argument("--batch", type=_batch, default=DEFAULT_BATCH,
                   help="packets drained per queue per turn (1..4096)")
    p.add_argument("--spin-us", type=_spin_us, default=DEFAULT_SPIN_US,
                   help="adaptive mode: the longest spin (microseconds) before sleeping; the "
                        "spin adapts below it to how soon packets follow")
    p.add_argument("--user", help="after opening the queues, run as this user (drop root)")
    p.add_argument("--group", help="with --user: run as this group (default: the user's)")
    co = p.add_mutually_exclusive_group()
    co.add_argument("--coalesce", dest="coalesce", action="store_true", default=None,
                    help="join a drain's TCP segments and UDP datagrams into TSO/USO super-packets "
                         "where the other device takes them (the default; without --handler "
                         "only where mqtun's C loop is built, which does it on the raw reads)")
    co.add_argument("--no-coalesce", dest="coalesce", action="store_false",
                    help="write every packet as read or returned, one write each")
    p.add_argument("--handler", metavar="MODULE:NAME",
                   help="a middlebox: call NAME from MODULE with each wire packet (IP packet or "
                        "Ethernet frame, no header, checksums complete) and write what it "
                        "returns (a packet, packets, or None to drop) to the other device; "
                        "e.g. mqtun.apps.handlers:identity")
    p.add_argument("--handler-batch", action="store_true",
                   help="with --handler: call it with the list of packets one drain held; it "
                        "returns an iterable of packets")

    def run(args: argparse.Namespace) -> int:

        from mqtun.apps.forward import ForwardConfig, Forwarder
        from mqtun.runtime.workers import WorkerEvent, parse_cpus

        parse_cpus(args.cpus)  # a bad list is a usage error before anything is created
        if args.attach:
            for name in (args.dev_a, args.dev_b):
                _check_attachable(name, args)

        def on_event(ev: WorkerEvent) -> None:
            # "gone" is not printed per worker: the one line at the end says which device went
            if ev.kind in ("crashed", "restarted", "gave-up"):
                print(f"mqtun: {ev}", file=sys.stderr, flush=True)

        fwd = Forwarder(ForwardConfig(args.dev_a, args.dev_b, args.queues, args.tap,
                                      args.offload, args.cpus, args.mode, args.batch,
                                      args.spin_us, user=args.user, group=args.group,
                                      attach=args.attach, coalesce=args.coalesce,
                                      handler=args.handler,
                                      handler_batch=args.handler_batch),
                              on_event=on_event)
        try:
            fwd.run_command(lambda: f"READY queues={fwd.queue_count}")
        except PermissionDeniedError as exc:
            if args.attach and exc.op == "up":  # the one step of --attach that needs a cap
                raise PermissionDeniedError(
                    exc.errno or errno.EPERM, f"{exc.device} is down, and bringing a link up needs "
                    f"CAP_NET_ADMIN: bring it up first (as root: ip link set {exc.device} up)",
                    device=exc.device, op=exc.op) from None
            raise
        except MqtunError as exc:
            raise _already_exists(exc, "serve it with `mqtun forward --attach ...`, or delete "
                                  f"it first (`mqtun delete {exc.device}`)") from None
        finally:
            fwd.close()
        return EXIT_OK

    p.set_defaults(run=run)


def _check_attachable(name: str, args: argparse.Namespace) -> None:
    """`forward --attach`: the device must have the flags the options ask for; say which
    option (or which `mqtun create` option) makes them agree, in the CLI's own words."""
    from mqtun.link import find_link

    info = find_link(name)
    if info is None:
        raise MqtunError(errno.ENODEV, f"no tun/tap device named {name} in this network "
                         f"namespace; create it first (`mqtun create {name} --multi-queue "
                         "--vnet-hdr --owner USER`)", device=name, op="attach")
    problems = []
    if (info.kind == "tap") != args.tap:
        problems.append(f"it is a {info.kind.upper()}: "
                        + ("add --tap" if info.kind == "tap" else "leave out --tap"))
    if info.vnet_hdr != args.offload:
        problems.append("it has a virtio-net header: leave out --no-offload" if info.vnet_hdr
                        else "it has no virtio-net header: add --no-offload, or recreate it "
                        f"with `mqtun create {name} --vnet-hdr`")
    if info.packet_info:
        problems.append("it carries packet info, which forward does not: recreate it "
                        "without --packet-info")
    if args.queues > 1 and not info.multi_queue:
        problems.append(f"it is single-queue: use --queues 1, or recreate it with "
                        f"`mqtun create {name} --multi-queue`")
    if problems:
        raise InvalidArgumentError(f"cannot attach to {name}: {'; '.join(problems)}",
                                   device=name, op="attach")


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
                   help="traffic time, half TCP and half UDP")
    p.add_argument("--queues", type=_queue_count, default=2, help="forwarder queues")

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
    from mqtun.apps.bench import CONFIGS, DEFAULT_MAX_STEAL, WORKLOADS

    p = sub.add_parser("bench", help="forwarder throughput, request/response and packet rate "
                       "against veth and python-pytun (root; namespaces only)")
    p.add_argument("--repeat", type=_repeat_count, default=5, help="runs of everything")
    p.add_argument("--seconds", type=_positive_seconds, default=3.0,
                   help="seconds per workload run")
    p.add_argument("--configs", help=f"comma-separated subset of: {', '.join(CONFIGS)}")
    p.add_argument("--workloads", help=f"comma-separated subset of: {', '.join(WORKLOADS)}")
    p.add_argument("--short", action="store_true",
                   help="test mode: 1 repeat of 1 s, configs veth,mqtun-1q,c-1q,pytun-1q unless "
                        "--configs says otherwise")
    p.add_argument("--out", default="bench/results", help="directory for results.json, "
                   "table.md and chart.png")
    p.add_argument("--tool-cpus", help="pin iperf3/sockperf to these CPUs (taskset -c LIST); "
                   "default: not pinned")
    p.add_argument("--max-steal", type=_steal_pct, default=DEFAULT_MAX_STEAL, metavar="PCT",
                   help="measure a run again (at most twice) when a hypervisor took more than "
                        "PCT %% of the cores during it; 100 keeps every run (default: "
                        "%(default)g)")

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
                           tool_cpus=args.tool_cpus, max_steal=args.max_steal,
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
COMMANDS.append(lambda sub: __import__("mqtun.apps.tunnel").apps.tunnel.add_parser(sub))

COMMANDS.append(add_wg_command)  # mqtun wg: the parser lives in mqtun.wireguard.command


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="mqtun", description="Multiqueue TUN/TAP devices for Python.")
    parser.add_argument("--version", action="version", version="mqtun 0.1.0")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    for add in COMMANDS:
        add(sub)
    _name_defaults(parser)
    return parser


def _name_defaults(parser: argparse.ArgumentParser) -> None:
    """Every parser, nested ones too (`tunnel vxlan`), names its options' defaults."""
    parser.formatter_class = _HelpFormatter
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for child in action.choices.values():
                _name_defaults(child)


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
