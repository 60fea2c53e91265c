"""`mqtun tunnel vxlan`: a TAP device whose queues are the two ends of a VXLAN tunnel.

One worker per TAP queue, each with its own UDP socket in one SO_REUSEPORT group on the local
address and port; nothing is shared between workers. Per worker:

- TAP -> wire: a frame (a TSO/USO super-frame included) is read with its virtio-net header,
  split into wire frames (`packet.gso.split`), each behind the VXLAN header, and sent with
  UDP GSO (one sendmsg for the frames of one super-frame). The outer source port is the inner
  flow's hash mapped into the local port range (`packet.vxlan.source_port`), as the kernel's
  VXLAN does, from a socket bound to that port.
- wire -> TAP: reads with UDP GRO; each datagram is checked (source = the remote, header, VNI,
  length), the batch's frames are coalesced (`packet.gro.coalesce`) into super-frames and
  written with a virtio-net header. A tunnel super-datagram (a kernel VXLAN peer on a veth
  hands its TSO packets over whole) is written as the GSO super-frame it is.

Flow affinity needs no steering program: the reuseport group hashes the outer 4-tuple, which a
VXLAN peer keeps fixed per inner flow, so each inner flow's datagrams reach one worker; that
worker writes the flow's frames to its own TAP queue, and the kernel's tun flow table sends the
flow's outgoing frames to the queue that last wrote it: the same worker, both ways.

Every datagram or frame that is not delivered is counted under a DropReason on the worker's
queue counters (shared memory, as `mqtun forward` has them). Nothing here prints but the
command's own `run` (READY, QSTAT and errors, as `mqtun forward`).
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import ipaddress
import os
import select
import signal
import socket
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from mqtun import _uapi
from mqtun.apps.forward import negotiate_offloads
from mqtun.device import Device, validate_name
from mqtun.errors import DeviceGoneError, InvalidArgumentError, MqtunError
from mqtun.packet import ZERO_HEADER, MalformedPacket, coalesce, decode, encode, split, vxlan
from mqtun.runtime.loop import _read_error, _write_error
from mqtun.runtime.sockets import (
    SourcePorts,
    UdpEndpoint,
    family_of,
    path_mtu,
    reuseport_group,
)
from mqtun.runtime.workers import WorkerEvent, WorkerInfo, WorkerPool
from mqtun.stats import (
    READ_BYTES,
    READ_ERRORS,
    READ_PACKETS,
    WRITE_ERRORS,
    WRITTEN_BYTES,
    WRITTEN_PACKETS,
    DropReason,
)
from mqtun.steer import programs, reuseport

__all__ = ["STEERING", "TunnelConfig", "VxlanTunnel", "add_parser"]

STEERING = ("bpf", "hash")

_DROP_FOR_REASON = {
    "vxlan-short": DropReason.VXLAN_SHORT,
    "vxlan-bad-flags": DropReason.VXLAN_BAD_FLAGS,
    "vxlan-wrong-vni": DropReason.VXLAN_WRONG_VNI,
    "vxlan-truncated": DropReason.VXLAN_TRUNCATED,
}
_DROP_FOR_SEND_ERRNO = {
    errno.EMSGSIZE: DropReason.TOO_BIG,
    errno.EHOSTUNREACH: DropReason.NO_PEER,
    errno.ENETUNREACH: DropReason.NO_PEER,
    errno.ECONNREFUSED: DropReason.NO_PEER,
}
_READ_SIZE = 65536 + _uapi.VIRTIO_NET_HDR_V1_HASH_TUNNEL_SIZE + 64
_RCVBUF = 8 << 20
_SPIN_S = 50e-6


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


class VxlanTunnel:
    """Create the TAP and the sockets, start a worker per queue, supervise, clean up."""

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
            self.pool = WorkerPool([self.device], self._program, cpus=cfg.cpus, name="tunnel",
                                   on_event=self.on_event)
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

    def _program(self, info: WorkerInfo) -> list[Any]:
        """Runs in the worker process: serve until SIGTERM, then exit (never returns)."""
        mine = self.endpoints[info.index % len(self.endpoints)]
        for ep in self.endpoints:
            if ep is not mine:
                ep.close()
        max_frame = self.path_mtu - (self.config.overhead - _uapi.ETH_HLEN)
        _Worker(info, self.config, mine, max_frame, _local_port_range(), self.mtu).run()
        os._exit(0)

    def request_stop(self) -> None:
        """Safe in a signal handler."""
        self._stop_requested = True
        if self.pool is not None:
            self.pool.request_stop()

    def request_stats(self) -> None:
        """Safe in a signal handler."""
        self._stats_requested = True
        if self.pool is not None:
            self.pool.wake()

    def run(self, on_stats: Callable[[list[str]], None] | None = None) -> None:
        pool = self.pool
        if pool is None:
            raise InvalidArgumentError("open() the tunnel first")
        while not self._stop_requested and not pool.gone:
            pool.poll(0.5)
            if self._stats_requested:
                self._stats_requested = False
                if on_stats is not None:
                    on_stats(self.qstat_lines())
        if pool.gone and not self._stop_requested:
            raise DeviceGoneError(_uapi.EBADFD, f"tunnel stopped: {pool.gone[0]}", op="tunnel")

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
        return out

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


class _Worker:
    """One worker's loop: its TAP queue and its socket, both ways."""

    def __init__(self, info: WorkerInfo, cfg: TunnelConfig, endpoint: UdpEndpoint,
                 max_frame: int, port_range: tuple[int, int], mtu: int) -> None:
        self.queue = info.queues[0]
        self.counters = self.queue.counters
        self.cfg = cfg
        self.endpoint = endpoint
        self.max_frame = max_frame
        self.inner_mtu = max_frame - _uapi.ETH_HLEN
        self.mtu = mtu  # the TAP's
        self.rx_limit = mtu + _uapi.ETH_HLEN + 2 * _uapi.VLAN_HLEN  # larger: a super-frame
        self.low, self.high = port_range
        self.vni = cfg.vni
        self.vx_header = vxlan.header(cfg.vni)
        self.peer: Any = ((cfg.remote, cfg.port, 0, 0)
                          if family_of(cfg.remote) == socket.AF_INET6 else (cfg.remote, cfg.port))
        self.remote = ipaddress.ip_address(cfg.remote).compressed
        self.ports = SourcePorts(cfg.local, endpoint)
        self.hsize = self.queue.device.vnet_hdr_size
        self.zero = encode(ZERO_HEADER, self.hsize)
        self._out: dict[int, tuple[list[Any], list[int]]] = {}
        self.stopping = False
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)

    def _stop(self, *_: object) -> None:
        self.stopping = True
        with contextlib.suppress(OSError):
            os.write(self._wake_w, b"\0")

    def run(self) -> None:
        signal.signal(signal.SIGTERM, self._stop)
        qfd = self.queue.fd
        os.set_blocking(qfd, False)
        ep = select.epoll()
        ep.register(qfd, select.EPOLLIN)
        ep.register(self.endpoint.fileno(), select.EPOLLIN)
        ep.register(self._wake_r, select.EPOLLIN)
        clock = time.perf_counter
        try:
            while not self.stopping:
                if self._from_tap() + self._from_wire():
                    continue
                until = clock() + _SPIN_S
                moved = 0
                while not moved and clock() < until and not self.stopping:
                    os.sched_yield()
                    moved = self._from_tap() + self._from_wire()
                if moved or self.stopping:
                    continue
                for fd, _ev in ep.poll(1.0):
                    if fd == self._wake_r:
                        with contextlib.suppress(OSError):
                            os.read(self._wake_r, 512)
        finally:
            ep.close()
            self.ports.close()

    # ---- TAP -> wire --------------------------------------------------------------------
    def _from_tap(self) -> int:
        q, c = self.queue, self.counters
        slots = c.slots
        fd, hsize, batch = q.fd, self.hsize, self.cfg.batch
        n = 0
        while n < batch:
            try:
                data = os.read(fd, _READ_SIZE)
            except BlockingIOError:
                break
            except OSError as exc:
                _read_error(q, exc)
                break
            n += 1
            slots[READ_PACKETS] += 1
            slots[READ_BYTES] += len(data) - hsize
            try:
                hdr = decode(data, hsize)
                frame = memoryview(data)[hsize:]
                segments = split(hdr, frame, tap=True) if hdr.flags or hdr.gso_type else [frame]
            except MalformedPacket:
                c.drop(DropReason.OFFLOAD)
                continue
            self._queue(segments)
        if self._out:
            self._send_queued()
        return n

    def _queue(self, segments: list[Any]) -> None:
        """Encapsulate a frame's segments for sending (by outer source port: a drain's
        datagrams of one flow go out together, equal sizes in one UDP GSO send)."""
        c = self.counters
        limit = self.max_frame
        if len(segments[0]) > limit or len(segments[-1]) > limit:
            fit = [s for s in segments if len(s) <= limit]
            c.drop(DropReason.TOO_BIG, len(segments) - len(fit))
            # tell the sender, as the kernel's tunnels do: it lowers its path MTU
            big = segments[0] if len(segments[0]) > limit else segments[-1]
            reply = vxlan.too_big_reply(big, self.inner_mtu)
            if reply is not None:
                self._write(self.zero, reply)
            if not fit:
                return
            segments = fit
        port = vxlan.source_port(vxlan.flow_hash(segments[0]), self.low, self.high)
        hdr = self.vx_header
        out = self._out.get(port)
        if out is None:
            out = self._out[port] = ([], [])
        out[0].extend([(hdr, s) for s in segments])
        out[1].extend([_uapi.VXLAN_HLEN + len(s) for s in segments])

    def _send_queued(self) -> None:
        c = self.counters
        for port, (datagrams, sizes) in self._out.items():
            sent, err = self.ports.get(port).send(self.peer, datagrams, sizes)
            if err:
                c.slots[WRITE_ERRORS] += 1
                c.drop(_DROP_FOR_SEND_ERRNO.get(err, DropReason.WRITE_ERROR), len(datagrams) - sent)
        self._out.clear()

    # ---- wire -> TAP --------------------------------------------------------------------
    def _from_wire(self) -> int:
        c = self.counters
        recv = self.endpoint.recv
        check, vni, remote, limit = vxlan.check, self.vni, self.remote, self.rx_limit
        pending: list[memoryview] = []
        n = 0
        while n < self.cfg.batch:
            try:
                got = recv()
            except MqtunError:
                c.slots[READ_ERRORS] += 1
                break
            if got is None:
                break
            n += 1
            data, seg, (addr, _port) = got
            mv = memoryview(data)
            parts = vxlan.datagrams(mv, seg)
            if addr != remote and ipaddress.ip_address(addr).compressed != remote:
                c.drop(DropReason.WRONG_SOURCE, len(parts))
                continue
            whole = seg > 0 and len(mv) > seg and len(parts) == 1
            for d in parts:
                reason = check(d, vni)
                if reason is not None:
                    c.drop(_DROP_FOR_REASON[reason])
                    continue
                if whole or len(d) - _uapi.VXLAN_HLEN > limit:  # a super-frame: as it is
                    self._flush(pending)
                    frame = d[_uapi.VXLAN_HLEN :]
                    hdr = vxlan.receive_header(frame, seg if whole else 0, self.mtu)
                    self._write(encode(hdr, self.hsize), frame)
                else:
                    pending.append(d[_uapi.VXLAN_HLEN :])
        self._flush(pending)
        return n

    def _flush(self, frames: list[memoryview]) -> None:
        if not frames:
            return
        hsize = self.hsize
        for hdr, data in coalesce(frames, tap=True):
            if not (hdr.flags or hdr.gso_type):
                hdr = vxlan.receive_header(data)
            self._write(encode(hdr, hsize) if hdr.flags or hdr.gso_type else self.zero, data)
        frames.clear()

    def _write(self, head: bytes, frame: Any) -> None:
        q = self.queue
        try:
            n = os.writev(q.fd, (head, frame))
        except OSError as exc:
            _write_error(q, exc.errno)
            return
        slots = self.counters.slots
        slots[WRITTEN_PACKETS] += 1
        slots[WRITTEN_BYTES] += n - self.hsize


# ---- the command line -------------------------------------------------------------------------
_EXIT_USAGE = 2


class _OneLineParser(argparse.ArgumentParser):
    """Bad arguments: one line on stderr, exit 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        print(f"mqtun {self.prog.split(' ', 1)[-1]}: error: {message}", file=sys.stderr)
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


def _device_name(value: str) -> str:
    try:
        if not value:
            raise InvalidArgumentError("the device name is empty")
        validate_name(value)
    except InvalidArgumentError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return value


def add_parser(sub: Any) -> None:
    """Add `tunnel vxlan ...` to the `mqtun` command's subparsers."""
    p = sub.add_parser("tunnel", help="a TAP device whose queues are the ends of a UDP tunnel, "
                       "one worker per queue")
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
    v.add_argument("--name", type=_device_name, default="vx%d", help="TAP name (default vx%%d)")
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
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: tun.request_stop())
    signal.signal(signal.SIGUSR1, lambda *_: tun.request_stats())
    try:
        tun.open()
        print(f"READY queues={tun.queue_count} dev={tun.name}", flush=True)
        tun.run(on_stats=lambda lines: print("\n".join(lines), file=sys.stderr, flush=True))
    finally:
        tun.close()
    return 0
