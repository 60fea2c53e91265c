"""`mqtun forward`: two devices, one worker per queue pair, packets moved both ways.

The two devices are created in the caller's network namespace (multiqueue when more than
one queue is asked for) with identical virtio-net headers and offloads. The workers run the
runtime's one packet path (`WorkerPool.forward`, no handler): a TSO/USO super-packet read
from A is written to B whole and every other packet as read (zero-copy), except that the
plain segments and datagrams one drain holds are joined into TSO/USO super-packets where B
takes them (`coalesce`, on by default where the C loop is built; `--no-coalesce` turns it
off): fewer, larger writes, datagram boundaries and in-flow order kept, nothing waited for.
The join reads the raw buffers in C (a NEEDS_CSUM packet keeps its partial checksum), which
measured 1.21x the C forwarder on 64-byte UDP; without the C loop it would decode every packet
in Python, which measured slower than writing them as read, so there it stays off
(docs/dataplane.md has the figures). With `handler` (`--handler
MODULE:NAME`, see `mqtun.apps.handlers`) the forwarder is a middlebox: the handler sees wire
packets (or, with `handler_batch`, each drain's list of them) and what it returns is written
to the other device, coalesced by default. Either device may be
moved to another namespace after start (queue fds stay valid); at the end each device is
deleted wherever it lives then.

With `user` set, the forwarder becomes that user (setgroups/setgid/setuid) once both devices
and every queue are open and up, before any worker starts: every process that touches a
packet runs unprivileged. The devices still go away at the end, because they are not
persistent and their last queue fd closes.

Nothing here prints: the CLI passes callbacks for the READY line, the QSTAT lines and the
worker events.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass

from mqtun import _uapi
from mqtun.apps.handlers import resolve_handler
from mqtun.apps.supervise import PoolSupervisor
from mqtun.device import Device
from mqtun.errors import InvalidArgumentError, MqtunError
from mqtun.runtime.loop import DEFAULT_BATCH, DEFAULT_MODE, DEFAULT_SPIN_US, LoopConfig
from mqtun.runtime.privileges import drop_privileges, resolve_user
from mqtun.runtime.workers import WorkerEvent, WorkerPool

__all__ = ["FULL_OFFLOADS", "ForwardConfig", "Forwarder", "negotiate_offloads"]

FULL_OFFLOADS = (_uapi.TUN_F_CSUM | _uapi.TUN_F_TSO4 | _uapi.TUN_F_TSO6 | _uapi.TUN_F_TSO_ECN
                 | _uapi.TUN_F_USO4 | _uapi.TUN_F_USO6)
# What to try, best first: USO needs 6.2, everything needs CSUM.
_OFFLOAD_LADDER = (
    FULL_OFFLOADS,
    FULL_OFFLOADS & ~(_uapi.TUN_F_USO4 | _uapi.TUN_F_USO6),
    _uapi.TUN_F_CSUM | _uapi.TUN_F_TSO4 | _uapi.TUN_F_TSO6,
    _uapi.TUN_F_CSUM,
    0,
)


@dataclass(frozen=True)
class ForwardConfig:
    dev_a: str
    dev_b: str
    queues: int = 1
    tap: bool = False
    offload: bool = True
    cpus: str | None = None
    mode: str = DEFAULT_MODE
    batch: int = DEFAULT_BATCH
    spin_us: int = DEFAULT_SPIN_US
    user: str | None = None  # drop to this user after opening the queues
    group: str | None = None  # and this group (default: the user's primary group)
    attach: bool = False  # serve existing devices (e.g. persistent, owner-set) and leave them
    coalesce: bool | None = None  # join a drain's segments into TSO/USO writes (None: the
    # runtime's default -- on, except without a handler where the C loop is not built)
    handler: str | None = None  # MODULE:NAME, called with each wire packet (apps.handlers)
    handler_batch: bool = False  # the handler takes the list one drain held

    def __post_init__(self) -> None:
        if self.dev_a == self.dev_b:
            raise InvalidArgumentError("forward needs two different device names")
        if not 1 <= self.queues <= _uapi.MAX_QUEUES:
            raise InvalidArgumentError(f"queue count must be 1..256, not {self.queues}")
        if self.group is not None and self.user is None:
            raise InvalidArgumentError("a group to drop to needs a user too (--user)")
        if self.user is not None:
            resolve_user(self.user, self.group)  # an unknown user is refused before creating
        if self.handler_batch and self.handler is None:
            raise InvalidArgumentError("--handler-batch needs a handler (--handler MODULE:NAME)")
        if self.handler is not None:
            resolve_handler(self.handler)  # a bad name is refused before creating


def negotiate_offloads(devices: list[Device]) -> int:
    """The richest offload mask every device accepts (TUNSETOFFLOAD), set on all of them."""
    for mask in _OFFLOAD_LADDER:
        try:
            for d in devices:
                d.set_offloads(mask)
        except MqtunError:
            continue
        return mask
    return 0


class Forwarder(PoolSupervisor):
    """Create the two devices, start the workers, supervise, clean up."""

    NOUN = "forwarder"
    STOPPED = "forwarding stopped"
    OP = "forward"

    def __init__(self, config: ForwardConfig,
                 on_event: Callable[[WorkerEvent], None] | None = None) -> None:
        self.config = config
        self.on_event = on_event
        self.dev_a: Device | None = None
        self.dev_b: Device | None = None
        self.pool: WorkerPool | None = None
        self.offloads = 0
        self.ids: tuple[int, int] | None = None  # (uid, gid) after dropping privileges
        self._stats_requested = False
        self._stop_requested = False

    def open(self) -> None:
        """Create both devices with every queue open, and start one worker per queue pair."""
        cfg = self.config
        loop = LoopConfig(mode=cfg.mode, batch=cfg.batch, spin_us=cfg.spin_us)
        kw: dict[str, bool | int | None] = {"tap": cfg.tap, "multi_queue": cfg.queues > 1,
                                            "vnet_hdr": cfg.offload, "offloads": 0}
        if cfg.attach:  # the flags must match; packet info is never forwarded
            kw.update(multi_queue=True if cfg.queues > 1 else None, packet_info=False)
        make = Device.attach if cfg.attach else Device.create
        try:
            self.dev_a = make(cfg.dev_a, cfg.queues, **kw)  # type: ignore[arg-type]
            self.dev_b = make(cfg.dev_b, cfg.queues, **kw)  # type: ignore[arg-type]
            if cfg.offload:
                self.offloads = negotiate_offloads([self.dev_a, self.dev_b])
            for d in (self.dev_a, self.dev_b):
                if not (cfg.attach and d.info().up):  # up already: no CAP_NET_ADMIN needed
                    d.link.up()
            if cfg.user is not None:
                self.ids = drop_privileges(cfg.user, cfg.group)
            handler = resolve_handler(cfg.handler) if cfg.handler is not None else None
            self.pool = WorkerPool.forward(
                self.dev_a, self.dev_b, handler, batch=cfg.handler_batch,
                coalesce=cfg.coalesce, cpus=cfg.cpus, loop=loop, name="forward",
                on_event=self.on_event,
            )
            self.pool.start()
        except BaseException:
            self.close()
            raise

    @property
    def queue_count(self) -> int:
        return len(self.pool.workers) if self.pool else 0

    def qstat_lines(self) -> list[str]:
        """One `QSTAT q=<i> ...` line per queue pair, from the live shared counters.

        `*_pkts` count writes as the kernel counts them (IFLA_STATS64: a super-packet once),
        `*_wire` the wire packets they held; `reads` the packets read from both devices (as
        the kernel counts them: its tx_packets), `read_wire` the wire packets they held;
        `drops` are wire packets: read_wire = a2b_wire + b2a_wire + drops."""
        out: list[str] = []
        if self.pool is None:
            return out
        for i, w in enumerate(self.pool.workers):
            a, b = w.stats
            out.append(
                f"QSTAT q={i} a2b_pkts={b.written_packets} b2a_pkts={a.written_packets} "
                f"a2b_bytes={b.written_bytes} b2a_bytes={a.written_bytes} "
                f"drops={a.dropped_total + b.dropped_total} "
                f"a2b_wire={b.written_wire_packets} b2a_wire={a.written_wire_packets} "
                f"reads={a.read_packets + b.read_packets} "
                f"read_wire={a.read_wire_packets + b.read_wire_packets}"
            )
        return out

    def close(self) -> None:
        """Stop the workers and delete both devices, wherever they live now."""
        if self.pool is not None:
            self.pool.stop()
        for d in (self.dev_a, self.dev_b):
            if d is not None:
                if d.created:  # attached devices are someone else's: only our queues go
                    with contextlib.suppress(MqtunError):
                        d.delete()
                with contextlib.suppress(MqtunError):
                    d.close()

    def __enter__(self) -> Forwarder:
        self.open()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
