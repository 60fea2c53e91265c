"""`mqtun tunnel vxlan`: a TAP device whose queues are the two ends of a VXLAN tunnel.

One worker per TAP queue, each with its own UDP socket in one SO_REUSEPORT group on the local
address and port; nothing is shared between workers. Each worker runs a
`mqtun.runtime.sockets.SocketLoop` with `VxlanCodec`:

- TAP -> wire: a frame (a TSO/USO super-frame included) is read with its virtio-net header,
  split into wire frames (`packet.gso.split`), each behind the VXLAN header, and sent with
  UDP GSO. The outer source port is the inner flow's hash mapped into the local port range
  (`packet.vxlan.source_port`), as the kernel's VXLAN does, from a socket bound to that port.
- wire -> TAP: reads with UDP GRO; each datagram is checked (source = the remote, header, VNI,
  length), the batch's frames are coalesced (`packet.gro.coalesce`) into super-frames and
  written with a virtio-net header. A tunnel super-datagram (a kernel VXLAN peer on a veth
  hands its TSO packets over whole) is written as the GSO super-frame it is.

Flow affinity (`--steering`): `bpf` puts the symmetric flow hash on the TAP and the same hash
of the inner frame on the reuseport group (`mqtun.steer.reuseport`), so a flow's queue and
socket belong to one worker from its first packet; `hash` relies on the peer's per-flow outer
source port and the tun flow table, which learns a flow's queue from the worker that writes it.

Every datagram or frame that is not delivered is counted under a DropReason on the worker's
queue counters (shared memory, as `mqtun forward` has them). Nothing here prints but the
command's own `run` (READY, QSTAT and errors, as `mqtun forward`). What the kernel drops on
the TAP before a worker sees it (a queue's ring full while its worker stalls) is the device's
tx_dropped, printed after the QSTAT lines as DEVSTAT ring_full=.
"""

from __future__ import annotations

import argparse
import contextlib
import ipaddress
import socket
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from mqtun import _uapi
from mqtun.apps.args import device_name
from mqtun.apps.forward import negotiate_offloads
from mqtun.apps.supervise import PoolSupervisor
from mqtun.device import Device, validate_name
from mqtun.errors import InvalidArgumentError, MqtunError
from mqtun.packet import vxlan
from mqtun.packet.vnet import VnetHeader
from mqtun.runtime.sockets import (
    SocketRoute,
    UdpEndpoint,
    family_of,
    path_mtu,
    reuseport_group,
    socket_program,
)
from mqtun.runtime.workers import WorkerEvent, WorkerInfo, WorkerPool
from mqtun.stats import DropReason
from mqtun.steer import programs, reuseport

__all__ = ["STEERING", "TunnelConfig", "VxlanCodec", "VxlanTunnel", "add_parser"]

STEERING = ("bpf", "hash")

_DROP_FOR_REASON = {
    "vxlan-short": DropReason.VXLAN_SHORT,
    "vxlan-bad-flags": DropReason.VXLAN_BAD_FLAGS,
    "vxlan-wrong-vni": DropReason.VXLAN_WRONG_VNI,
    "vxlan-truncated": DropReason.VXLAN_TRUNCATED,
}
_RCVBUF = 8 << 20


@dataclass(frozen=True)
class TunnelConfig:
    local: str
    remote: str
    vni: int
    port: int = _uapi.VXLAN_PORT
    queues: int = 1
    name: str = "vx%d"
    mtu: int | None = None  # default: the path MTU less the VXLAN overhead, as the kernel's
    cpus: str | None = None
    batch: int = 64
    steering: str = "bpf"  # "bpf": eBPF on the TAP and the reuseport group; "hash": none

    def __post_init__(self) -> None:
        if self.steering not in STEERING:
            raise InvalidArgumentError(f"steering {self.steering!r}: choose one of "
                                       f"{', '.join(STEERING)}")
        if family_of(self.local) != family_of(self.remote):
            raise InvalidArgumentError(f"--local {self.local} and --remote {self.remote} must "
                                       "be of one address family")
        if not 0 <= self.vni <= _uapi.VXLAN_VNI_MAX:
            raise InvalidArgumentError(f"the VNI must be 0..{_uapi.VXLAN_VNI_MAX}, not {self.vni}")
        if not 1 <= self.port <= 65535:
            raise InvalidArgumentError(f"the port must be 1..65535, not {self.port}")
        if not 1 <= self.queues <= _uapi.MAX_QUEUES:
            raise InvalidArgumentError(f"queue count must be 1..256, not {self.queues}")
        if self.mtu is not None and not 68 <= self.mtu <= 65535:
            raise InvalidArgumentError(f"the MTU must be 68..65535, not {self.mtu}")
        validate_name(self.name)

    @property
    def overhead(self) -> int:
        """Bytes the encapsulation adds to an IP packet of the TAP (outer IP, UDP, VXLAN, L2)."""
        v6 = family_of(self.local) == socket.AF_INET6
        return _uapi.VXLAN_OVERHEAD_IPV6 if v6 else _uapi.VXLAN_OVERHEAD_IPV4


def _local_port_range() -> tuple[int, int]:
    """net.ipv4.ip_local_port_range of this namespace: the kernel's VXLAN source port range."""
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            low, high = (int(x) for x in f.read().split())
        if 0 < low < high <= 65535:
            return low, high
    except (OSError, ValueError):
        pass
    return _uapi.IP_LOCAL_PORT_RANGE_DEFAULT


class VxlanTunnel(PoolSupervisor):
    """Create the TAP and the sockets, start a worker per queue, supervise, clean up."""

    NOUN = "tunnel"
    STOPPED = "tunnel stopped"
    OP = "tunnel"

    def __init__(self, config: TunnelConfig,
                 on_event: Callable[[WorkerEvent], None] | None = None) -> None:
        self.config = config
        self.on_event = on_event
        self.device: Device | None = None
        self.endpoints: list[UdpEndpoint] = []
        self.pool: WorkerPool | None = None
        self.offloads = 0
        self.path_mtu = 0
        self.mtu = 0
        self._programs: list[Any] = []
        self._stats_requested = False
        self._stop_requested = False

    def open(self) -> None:
        cfg = self.config
        try:
            self.path_mtu = path_mtu(cfg.local, cfg.remote, cfg.port)
            self.mtu = cfg.mtu or self.path_mtu - cfg.overhead
            self.endpoints = reuseport_group(cfg.local, cfg.port, cfg.queues, gro=True,
                                             rcvbuf=_RCVBUF)
            self.device = Device.create(cfg.name, cfg.queues, tap=True,
                                        multi_queue=cfg.queues > 1, vnet_hdr=True, offloads=0)
            self.offloads = negotiate_offloads([self.device])
            if cfg.steering == "bpf" and cfg.queues > 1:
                self._steer()
            self.device.link.set_mtu(self.mtu)
            self.device.link.up()
            self.pool = WorkerPool([self.device], socket_program(self._route), cpus=cfg.cpus,
                                   name="tunnel", on_event=self.on_event,
                                   keep_fds=[ep.fileno() for ep in self.endpoints])
            self.pool.start()
        except BaseException:
            self.close()
            raise

    def _steer(self) -> None:
        """The TAP's symmetric flow hash, and the same hash of the inner frame for the
        reuseport group: a flow's queue i and socket i, from its first packet."""
        assert self.device is not None
        tap_prog = programs.symmetric(tap=True)
        self._programs.append(tap_prog)
        self.device.set_steering_program(tap_prog)
        group_prog = reuseport.inner_symmetric(len(self.endpoints))
        self._programs.append(group_prog)
        reuseport.attach(self.endpoints[0].sock, group_prog)

    @property
    def name(self) -> str:
        return self.device.name if self.device else ""

    @property
    def queue_count(self) -> int:
        return len(self.pool.workers) if self.pool else 0

    def _route(self, info: WorkerInfo) -> SocketRoute:
        """In the worker process: its queue, its socket (the others' are closed here)."""
        cfg = self.config
        mine = self.endpoints[info.index % len(self.endpoints)]
        for ep in self.endpoints:
            if ep is not mine:
                ep.close()
        return SocketRoute(
            info.queues[0], mine, cfg.remote, cfg.port,
            VxlanCodec(cfg.vni, _local_port_range()),
            max_frame=self.path_mtu - (cfg.overhead - _uapi.ETH_HLEN), mtu=self.mtu,
            local=cfg.local, batch=cfg.batch,
        )

    def qstat_lines(self) -> list[str]:
        """One `QSTAT q=<i> ...` line per worker: frames encapsulated (read from the TAP) and
        decapsulated (written to it), their bytes, drops, then each drop reason counted."""
        out: list[str] = []
        if self.pool is None:
            return out
        for i, w in enumerate(self.pool.workers):
            (s,) = w.stats
            reasons = "".join(f" {k}={v}" for k, v in sorted(s.dropped.items()))
            out.append(f"QSTAT q={i} encap_pkts={s.read_packets} decap_pkts={s.written_packets} "
                       f"encap_bytes={s.read_bytes} decap_bytes={s.written_bytes} "
                       f"drops={s.dropped_total}{reasons}")
        out.append(self.devstat_line())
        return out

    def devstat_line(self) -> str:
        """`DEVSTAT dev=<name> ring_full=<n> write_dropped=<n>`: what the TAP lost that no
        worker can count, from the kernel's device counters. ring_full (tx_dropped): frames the
        stack sent while a queue's ring was full (its worker stalled or too slow) -- they never
        reach encapsulation; write_dropped (rx_dropped): frames the kernel refused after a
        write it accepted."""
        if self.device is None:
            return "DEVSTAT dev= ring_full=0 write_dropped=0"
        try:
            st = self.device.link.stats()
        except MqtunError:
            st = {}
        return (f"DEVSTAT dev={self.device.name} ring_full={st.get('tx_dropped', 0)} "
                f"write_dropped={st.get('rx_dropped', 0)}")

    def close(self) -> None:
        if self.pool is not None:
            self.pool.stop()
            self.pool = None
        for ep in self.endpoints:
            ep.close()
        self.endpoints = []
        for prog in self._programs:
            prog.close()
        self._programs = []
        if self.device is not None:
            with contextlib.suppress(MqtunError):
                self.device.delete()
            with contextlib.suppress(MqtunError):
                self.device.close()
            self.device = None

    def __enter__(self) -> VxlanTunnel:
        self.open()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class VxlanCodec:
    """VXLAN for `SocketLoop`: packet.vxlan's functions for one VNI and source port range."""

    header_len = _uapi.VXLAN_HLEN

    def __init__(self, vni: int, port_range: tuple[int, int] = _uapi.IP_LOCAL_PORT_RANGE_DEFAULT
                 ) -> None:
        self.vni = vni
        self._header = vxlan.header(vni)
        self.low, self.high = port_range

    def encapsulate(self, frame: memoryview) -> bytes:
        return self._header

    def source_port(self, frame: memoryview) -> int:
        return vxlan.source_port(vxlan.flow_hash(frame), self.low, self.high)

    def check(self, datagram: memoryview) -> DropReason | None:
        reason = vxlan.check(datagram, self.vni)
        return None if reason is None else _DROP_FOR_REASON[reason]

    def datagrams(self, buf: memoryview, segment_size: int) -> list[memoryview]:
        return vxlan.datagrams(buf, segment_size)

    def receive_header(self, frame: memoryview, gso_size: int, mtu: int) -> VnetHeader:
        return vxlan.receive_header(frame, gso_size, mtu)

    def too_big_reply(self, frame: memoryview, mtu: int) -> bytes | None:
        return vxlan.too_big_reply(frame, mtu)


# ---- the command line -------------------------------------------------------------------------
_EXIT_USAGE = 2


class _OneLineParser(argparse.ArgumentParser):
    """Bad arguments: one line on stderr, exit 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        _one_line_error(self, message)


def _one_line_error(parser: argparse.ArgumentParser, message: str) -> None:
    print(f"mqtun {parser.prog.split(' ', 1)[-1]}: error: {message}", file=sys.stderr)
    raise SystemExit(_EXIT_USAGE)


def _bounded(what: str, low: int, high: int) -> Callable[[str], int]:
    def parse(value: str) -> int:
        try:
            n = int(value, 0)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a number: {value!r}") from None
        if not low <= n <= high:
            raise argparse.ArgumentTypeError(f"{what} must be {low}..{high}, not {value}")
        return n

    return parse


def _address(value: str) -> str:
    try:
        return ipaddress.ip_address(value).compressed
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an IP address: {value!r}") from None


def add_parser(sub: Any) -> None:
    """Add `tunnel vxlan ...` to the `mqtun` command's subparsers."""
    p = sub.add_parser("tunnel", help="a TAP device whose queues are the ends of a UDP tunnel, "
                       "one worker per queue")
    p.error = lambda message: _one_line_error(p, message)  # `mqtun tunnel` alone: one line too
    kinds = p.add_subparsers(dest="kind", required=True, parser_class=_OneLineParser)
    v = kinds.add_parser("vxlan", help="VXLAN (RFC 7348) to a remote VTEP, e.g. the kernel's "
                         "own vxlan device")
    v.add_argument("--local", type=_address, required=True, help="underlay address to bind")
    v.add_argument("--remote", type=_address, required=True, help="the peer's underlay address")
    v.add_argument("--vni", type=_bounded("the VNI", 0, _uapi.VXLAN_VNI_MAX), required=True)
    v.add_argument("--port", type=_bounded("the port", 1, 65535), default=_uapi.VXLAN_PORT,
                   help="UDP port, local and remote (default 4789)")
    v.add_argument("--queues", type=_bounded("queue count", 1, _uapi.MAX_QUEUES), default=1,
                   help="TAP queues and workers (1..256)")
    v.add_argument("--name", type=device_name, default="vx%d", help="TAP name (default vx%%d)")
    v.add_argument("--mtu", type=_bounded("the MTU", 68, 65535),
                   help="TAP MTU (default: the path MTU less 50, or 70 over IPv6)")
    v.add_argument("--cpus", help="pin workers to these CPUs, e.g. 0-3 or auto")
    v.add_argument("--steering", choices=STEERING, default="bpf",
                   help="bpf (default): eBPF on the TAP and the socket group keeps each flow on "
                   "one worker from its first packet; hash: the kernel's hashes and flow table")
    v.set_defaults(run=_run_vxlan)


def _run_vxlan(args: argparse.Namespace) -> int:
    from mqtun.runtime.workers import parse_cpus

    parse_cpus(args.cpus)

    def report(ev: WorkerEvent) -> None:
        if ev.kind in ("crashed", "restarted", "gave-up", "gone"):
            print(f"mqtun: {ev}", file=sys.stderr, flush=True)

    tun = VxlanTunnel(TunnelConfig(args.local, args.remote, args.vni, args.port, args.queues,
                                   args.name, args.mtu, args.cpus, steering=args.steering),
                      on_event=report)
    try:
        tun.run_command(lambda: f"READY queues={tun.queue_count} dev={tun.name}")
    finally:
        tun.close()
    return 0
