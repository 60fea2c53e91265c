"""Built-in steering programs: symmetric flow hash, RSS (Toeplitz), by CPU, fixed queue.

Each is a BPF_PROG_TYPE_SOCKET_FILTER program assembled in Python (`mqtun.steer.asm`) and
loaded with bpf(2); the kernel calls it for every packet it hands to the device and puts the
packet on queue ``(u16)ret % numqueues`` (drivers/net/tun.c, tun_ebpf_select_queue). Each
program object carries the pure-Python model of itself (`mqtun.steer.model`), so
``prog.queue_for(packet, n)`` says where a packet goes without a device::

    prog = programs.rss(queues=4, tap=False)
    dev.set_steering_program(prog)          # TUNSETSTEERINGEBPF
    prog.set_table([0, 0, 1, 1] * 32)       # rebalance at run time: no reload

Programs are built for TUN (packet = IP header first) or TAP (Ethernet first): pass the same
`tap` as the device's. What they parse is documented in `mqtun.steer.model`.

How the pieces are laid out in every parsing program (r6 = ctx throughout):

- the parse step leaves r8 = address family (4/6), the L4 protocol at fp-8, the ports at
  fp-16 (zero when absent) and the addresses at fp-48 (IPv4: src, dst; IPv6: src[16], dst[16]);
- packet bytes are copied to the stack with bpf_skb_load_bytes (a failed copy means "too
  short": not a flow, or addresses only for ports);
- the RSS program reads one precomputed Toeplitz table entry per input byte from a 36 KiB
  array-map value (``table[position][byte]``, 36 x 256 u32), then the queue from an
  indirection-table map: both maps are rewritten from userspace without a reload.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

from mqtun import _uapi as u
from mqtun.errors import InvalidArgumentError
from mqtun.steer import model as m
from mqtun.steer.asm import FP, R0, R1, R2, R3, R4, R5, R6, R7, R8, R9, Assembler, Reg
from mqtun.steer.bpf import ArrayMap, BpfObject, Program, ProgramInfo

__all__ = [
    "ByCpuProgram",
    "FixedProgram",
    "RssProgram",
    "SteeringProgram",
    "SymmetricProgram",
    "by_cpu",
    "by_cpu_code",
    "even_table",
    "fixed",
    "fixed_code",
    "rss",
    "rss_code",
    "symmetric",
    "symmetric_code",
]

MAX_QUEUE = 0xFFFF  # the kernel keeps the low 16 bits of the return value
RSS_TABLE_SIZE = 128
_TOEPLITZ_ROW = 256 * 4  # bytes per input position in the Toeplitz map value

# stack slots (offsets from the frame pointer) shared by the parsing programs
KEY_SLOT = -4  # u32 map key
PROTO_SLOT = -8  # u32 L4 protocol
PORTS_SLOT = -16  # be16 sport, be16 dport (zero when absent)
ADDR_SLOT = -48  # IPv4: src@-48 dst@-44; IPv6: src@-48..-33 dst@-32..-17
SCRATCH_SLOT = -56  # two bytes: an ethertype or an IPv6 extension header's first bytes
V6_HEAD_SLOT = -64  # the first 8 bytes of an IPv6 header
V4_HEAD_SLOT = -88  # a 20-byte IPv4 header


def _load_bytes(a: Assembler, off: Reg | int, slot: int, size: int, fail: str) -> None:
    """Copy `size` packet bytes at `off` to the stack at fp+slot, or jump to `fail`."""
    a.mov(R1, R6)
    if not (isinstance(off, Reg) and off == R2):
        a.mov(R2, off)
    a.mov(R3, FP)
    a.add(R3, slot)
    a.mov(R4, size)
    a.call("skb_load_bytes")
    a.jne(R0, 0, fail)


def emit_parse(a: Assembler, tap: bool, *, none: str, done: str, p: str = "p") -> None:
    """The flow parser of `mqtun.steer.model.parse_flow`, in eBPF.

    Expects r1 = ctx. Jumps to `none` for a packet that is not a flow and to `done` with
    r8 = family, the protocol, ports and addresses on the stack (see the module doc)."""
    a.mov(R6, R1)
    a.stw(FP, PORTS_SLOT, 0)
    if tap:
        _load_bytes(a, 12, SCRATCH_SLOT, 2, none)
        a.ldxh(R8, FP, SCRATCH_SLOT).be16(R8)
        a.mov(R7, u.ETH_HLEN)
        for i in range(m.MAX_VLAN_TAGS):
            a.jeq(R8, u.ETH_P_8021Q, f"{p}_vlan{i}")
            a.jeq(R8, u.ETH_P_8021AD, f"{p}_vlan{i}")
            a.ja(f"{p}_l3")
            a.label(f"{p}_vlan{i}")
            a.mov(R2, R7).add(R2, 2)
            _load_bytes(a, R2, SCRATCH_SLOT, 2, none)
            a.ldxh(R8, FP, SCRATCH_SLOT).be16(R8)
            a.add(R7, u.VLAN_HLEN)
        a.label(f"{p}_l3")
        a.jeq(R8, u.ETH_P_IP, f"{p}_v4")
        a.jeq(R8, u.ETH_P_IPV6, f"{p}_v6")
        a.ja(none)
    else:
        _load_bytes(a, 0, SCRATCH_SLOT, 1, none)
        a.ldxb(R8, FP, SCRATCH_SLOT).rsh(R8, 4)
        a.mov(R7, 0)
        a.jeq(R8, 4, f"{p}_v4")
        a.jeq(R8, 6, f"{p}_v6")
        a.ja(none)

    # IPv4: r7 = offset of the IP header
    a.label(f"{p}_v4")
    _load_bytes(a, R7, V4_HEAD_SLOT, u.IPV4_HDR_MIN, none)
    a.ldxw(R1, FP, V4_HEAD_SLOT + 12).stxw(FP, ADDR_SLOT, R1)
    a.ldxw(R1, FP, V4_HEAD_SLOT + 16).stxw(FP, ADDR_SLOT + 4, R1)
    a.mov(R8, 4)
    a.ldxb(R1, FP, V4_HEAD_SLOT + 9).stxw(FP, PROTO_SLOT, R1)
    a.ldxb(R2, FP, V4_HEAD_SLOT).and_(R2, 0x0F).lsh(R2, 2)
    a.jlt(R2, u.IPV4_HDR_MIN, done)
    a.ldxh(R3, FP, V4_HEAD_SLOT + 6).be16(R3).and_(R3, u.IP_MF | u.IP_OFFSET)
    a.jne(R3, 0, done)
    a.add(R7, R2)
    a.jeq(R1, u.IPPROTO_TCP, f"{p}_ports")
    a.jeq(R1, u.IPPROTO_UDP, f"{p}_ports")
    a.ja(done)

    # IPv6: walk up to MAX_IPV6_EXT_HEADERS extension headers, r9 = next header
    a.label(f"{p}_v6")
    _load_bytes(a, R7, V6_HEAD_SLOT, 8, none)
    a.mov(R2, R7).add(R2, 8)
    _load_bytes(a, R2, ADDR_SLOT, 32, none)
    a.mov(R8, 6)
    a.ldxb(R9, FP, V6_HEAD_SLOT + 6)
    a.add(R7, u.IPV6_HDR_LEN)
    for i in range(m.MAX_IPV6_EXT_HEADERS):
        a.jeq(R9, u.IPPROTO_HOPOPTS, f"{p}_ext{i}")
        a.jeq(R9, u.IPPROTO_ROUTING, f"{p}_ext{i}")
        a.jeq(R9, u.IPPROTO_DSTOPTS, f"{p}_ext{i}")
        a.ja(f"{p}_v6l4")
        a.label(f"{p}_ext{i}")
        _load_bytes(a, R7, SCRATCH_SLOT, 2, f"{p}_v6short")
        a.ldxb(R9, FP, SCRATCH_SLOT)
        a.ldxb(R1, FP, SCRATCH_SLOT + 1).add(R1, 1).lsh(R1, 3)
        a.add(R7, R1)
    a.label(f"{p}_v6l4")
    a.stxw(FP, PROTO_SLOT, R9)
    a.jeq(R9, u.IPPROTO_TCP, f"{p}_ports")
    a.jeq(R9, u.IPPROTO_UDP, f"{p}_ports")
    a.ja(done)
    a.label(f"{p}_v6short")
    a.stxw(FP, PROTO_SLOT, R9)
    a.ja(done)

    # ports at r7 (the helper zeroes the destination when the packet is too short)
    a.label(f"{p}_ports")
    _load_bytes(a, R7, PORTS_SLOT, 4, f"{p}_noports")
    a.ja(done)
    a.label(f"{p}_noports")
    a.stw(FP, PORTS_SLOT, 0)
    a.ja(done)


def _mix32(a: Assembler, h: Reg, word: Reg, tmp: Reg) -> None:
    a.xor32(h, word).mul32(h, m._MIX)
    a.mov32(tmp, h).rsh32(tmp, 15).xor32(h, tmp)


def _fmix32(a: Assembler, h: Reg, tmp: Reg) -> None:
    a.mov32(tmp, h).rsh32(tmp, 16).xor32(h, tmp).mul32(h, m._FMIX1)
    a.mov32(tmp, h).rsh32(tmp, 13).xor32(h, tmp).mul32(h, m._FMIX2)
    a.mov32(tmp, h).rsh32(tmp, 16).xor32(h, tmp)


def build_symmetric(tap: bool) -> Assembler:
    """The symmetric flow hash of `mqtun.steer.model.symmetric_hash`."""
    a = Assembler()
    emit_parse(a, tap, none="none", done="flow")
    a.label("flow")
    a.jeq(R8, 6, "fold6")
    a.ldxw(R1, FP, ADDR_SLOT).be32(R1)
    a.ldxw(R2, FP, ADDR_SLOT + 4).be32(R2)
    a.ja("ports")
    a.label("fold6")
    for reg, base in ((R1, ADDR_SLOT), (R2, ADDR_SLOT + 16)):
        a.ldxw(reg, FP, base)
        for k in (4, 8, 12):
            a.ldxw(R3, FP, base + k).xor(reg, R3)
        a.be32(reg)
    a.label("ports")
    a.ldxh(R3, FP, PORTS_SLOT).be16(R3)
    a.ldxh(R4, FP, PORTS_SLOT + 2).be16(R4)
    # order the two ends: (address, port) of the smaller end first
    a.jgt(R1, R2, "swap")
    a.jlt(R1, R2, "mix")
    a.jgt(R3, R4, "swap")
    a.ja("mix")
    a.label("swap")
    a.mov(R5, R1).mov(R1, R2).mov(R2, R5)
    a.mov(R5, R3).mov(R3, R4).mov(R4, R5)
    a.label("mix")
    a.lsh(R3, 16).or_(R3, R4)
    a.mov32(R0, m.SYMMETRIC_SEED)
    for word in (R1, R2, R3):
        _mix32(a, R0, word, R5)
    _fmix32(a, R0, R5)
    a.exit()
    a.label("none")
    a.ret(0)
    return a


def symmetric_code(tap: bool = False) -> bytes:
    return build_symmetric(tap).assemble()


def _rss_positions(family: int, l4: bool) -> list[tuple[int, int]]:
    """(input position, stack offset) of every byte the Toeplitz hash reads."""
    alen = 4 if family == 4 else 16
    pos = [(i, ADDR_SLOT + i) for i in range(alen)]
    dst = ADDR_SLOT + (4 if family == 4 else 16)
    pos += [(alen + i, dst + i) for i in range(alen)]
    if l4:
        pos += [(2 * alen + i, PORTS_SLOT + i) for i in range(4)]
    return pos


def build_rss(tap: bool, key_map_fd: int, table_map_fd: int, table_size: int,
              l4: bool = True) -> Assembler:
    """RSS: Toeplitz hash through a per-byte table map, then an indirection-table map."""
    _check_table_size(table_size)
    a = Assembler()
    emit_parse(a, tap, none="none", done="flow")
    a.label("flow")
    a.stw(FP, KEY_SLOT, 0)
    a.mov(R2, FP).add(R2, KEY_SLOT)
    a.ld_map_fd(R1, key_map_fd)
    a.call("map_lookup_elem")
    a.jeq(R0, 0, "none")
    a.mov(R7, R0)  # r7 = &toeplitz[0][0]
    a.mov32(R9, 0)  # r9 = hash
    a.jeq(R8, 6, "hash6")
    for family, end in ((4, "index"), (6, None)):
        if family == 6:
            a.label("hash6")
        for position, slot in _rss_positions(family, l4):
            a.ldxb(R1, FP, slot).lsh(R1, 2)
            if position:
                a.add(R1, position * _TOEPLITZ_ROW)
            a.mov(R2, R7).add(R2, R1)
            a.ldxw(R1, R2, 0)
            a.xor32(R9, R1)
        if end:
            a.ja(end)
    a.label("index")
    a.and32(R9, table_size - 1)
    a.stxw(FP, KEY_SLOT, R9)
    a.mov(R2, FP).add(R2, KEY_SLOT)
    a.ld_map_fd(R1, table_map_fd)
    a.call("map_lookup_elem")
    a.jeq(R0, 0, "none")
    a.ldxw(R0, R0, 0)
    a.exit()
    a.label("none")
    a.ret(0)
    return a


def rss_code(tap: bool, key_map_fd: int, table_map_fd: int, table_size: int = RSS_TABLE_SIZE,
             l4: bool = True) -> bytes:
    return build_rss(tap, key_map_fd, table_map_fd, table_size, l4).assemble()


def build_by_cpu(map_fd: int | None = None, size: int = 0) -> Assembler:
    """r0 = the CPU running the program (the sending CPU), through a table map if given."""
    a = Assembler()
    a.call("get_smp_processor_id")
    if map_fd is None:
        return a.exit()
    a.mod32(R0, size)
    a.stxw(FP, KEY_SLOT, R0)
    a.mov(R2, FP).add(R2, KEY_SLOT)
    a.ld_map_fd(R1, map_fd)
    a.call("map_lookup_elem")
    a.jeq(R0, 0, "none")
    a.ldxw(R0, R0, 0)
    a.exit()
    a.label("none")
    return a.ret(0)


def by_cpu_code(map_fd: int | None = None, size: int = 0) -> bytes:
    return build_by_cpu(map_fd, size).assemble()


def fixed_code(queue: int) -> bytes:
    _check_queue(queue)
    return Assembler().mov32(R0, queue).exit().assemble()


def _check_queue(q: int) -> None:
    if not isinstance(q, int) or not 0 <= q <= MAX_QUEUE:
        raise InvalidArgumentError(f"a queue number is 0..{MAX_QUEUE}, not {q!r}", op="steer")


def _check_table_size(size: int) -> None:
    if not 1 <= size <= 1 << 16 or size & (size - 1):
        raise InvalidArgumentError(
            f"the indirection table size must be a power of two in 1..65536, not {size}",
            op="steer",
        )


def even_table(queues: int, size: int = RSS_TABLE_SIZE) -> list[int]:
    """An indirection table that spreads its slots round-robin over `queues` queues."""
    if queues <= 0:
        raise InvalidArgumentError("at least one queue", op="steer")
    return [i % queues for i in range(size)]


# ---- loaded programs ---------------------------------------------------------------------------


class SteeringProgram:
    """A loaded steering program with its model. Attach: ``dev.set_steering_program(prog)``.

    `fileno()` is the program fd. `close()` releases this process's references; a device that
    has the program attached keeps it running until it is detached or replaced."""

    kind = "steering"

    def __init__(self, program: Program, model: m.Model, maps: Sequence[BpfObject] = ()) -> None:
        self.program = program
        self.model = model
        self.maps = tuple(maps)

    @property
    def tap(self) -> bool:
        return self.model.tap

    def fileno(self) -> int:
        return self.program.fileno()

    def close(self) -> None:
        self.program.close()
        for mp in self.maps:
            mp.close()

    @property
    def closed(self) -> bool:
        return self.program.closed

    def __enter__(self):  # type: ignore[no-untyped-def]
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def info(self) -> ProgramInfo:
        return self.program.info()

    def queue_for(self, packet: bytes, numqueues: int, cpu: int | None = None) -> int:
        """The model's queue for `packet` on a device with `numqueues` active queues."""
        return self.model.queue_for(packet, numqueues, cpu)

    def run(self, packet: bytes, cpu: int | None = None) -> int:
        """Run the loaded program on `packet` (BPF_PROG_TEST_RUN): its return value.

        With `cpu`, the calling thread runs pinned to that CPU for the call."""
        with _pinned(cpu):
            return self.program.run(packet, tap=self.tap)

    def __repr__(self) -> str:
        side = "tap" if self.tap else "tun"
        return f"<{type(self).__name__} {self.kind} {side} {self.program!r}>"


@contextmanager
def _pinned(cpu: int | None) -> Iterator[None]:
    if cpu is None:
        yield
        return
    before = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {cpu})
    try:
        yield
    finally:
        os.sched_setaffinity(0, before)


class SymmetricProgram(SteeringProgram):
    kind = "symmetric"


class FixedProgram(SteeringProgram):
    kind = "fixed"


class ByCpuProgram(SteeringProgram):
    kind = "by-cpu"

    def set_table(self, table: Sequence[int]) -> None:
        """Rewrite the CPU -> queue table (same length as at load time): no reload."""
        if not self.maps:
            raise InvalidArgumentError("this by-CPU program has no table (built with "
                                       "table=None)", op="steer")
        cpu_map = self.maps[0]
        assert isinstance(cpu_map, ArrayMap)
        table = _table_values(table, cpu_map.max_entries)
        cpu_map.update_many({i: struct.pack("=I", q) for i, q in enumerate(table)})
        self.model = m.ByCpuModel(table)


class RssProgram(SteeringProgram):
    """RSS: Toeplitz hash with `key`, queue = ``table[hash & (len(table) - 1)]``."""

    kind = "rss"
    model: m.RssModel

    def __init__(self, program: Program, model: m.RssModel, key_map: ArrayMap,
                 table_map: ArrayMap) -> None:
        super().__init__(program, model, (key_map, table_map))
        self.key_map = key_map
        self.table_map = table_map

    @property
    def key(self) -> bytes:
        return self.model.key

    @property
    def table(self) -> list[int]:
        return list(self.model.table)

    def set_table(self, table: Sequence[int]) -> list[int]:
        """Rewrite the indirection table in place (no reload); only changed slots are written,
        in one syscall. Returns the slots that changed."""
        new = _table_values(table, self.table_map.max_entries)
        changed = [i for i, (old, q) in enumerate(zip(self.model.table, new, strict=True))
                   if old != q]
        self.table_map.update_many({i: struct.pack("=I", new[i]) for i in changed})
        self.model.table = new
        return changed

    def set_key(self, key: bytes) -> None:
        """Rewrite the Toeplitz key (no reload)."""
        self.key_map.update(0, _toeplitz_value(key))
        self.model.key = bytes(key)

    def read_table(self) -> list[int]:
        """The table as the kernel holds it (read back from the map)."""
        return [struct.unpack("=I", v)[0] for v in self.table_map]


def _table_values(table: Sequence[int], size: int) -> list[int]:
    values = list(table)
    if len(values) != size:
        raise InvalidArgumentError(f"the table has {size} slots, not {len(values)}", op="steer")
    for q in values:
        _check_queue(q)
    return values


def _toeplitz_value(key: bytes) -> bytes:
    rows = m.toeplitz_table(bytes(key), m.RSS_INPUT_MAX)
    return b"".join(struct.pack("=256I", *row) for row in rows)


def symmetric(tap: bool = False) -> SymmetricProgram:
    """Load the symmetric flow hash: both directions of a flow on one queue."""
    prog = Program.load(symmetric_code(tap), name="mqtun_sym")
    return SymmetricProgram(prog, m.SymmetricModel(tap))


def rss(
    queues: int | None = None,
    *,
    table: Sequence[int] | None = None,
    table_size: int = RSS_TABLE_SIZE,
    key: bytes = m.RSS_DEFAULT_KEY,
    l4: bool = True,
    tap: bool = False,
) -> RssProgram:
    """Load RSS. The table is `table`, or `even_table(queues, table_size)`; `l4=False` hashes
    addresses only. Key and table can be rewritten later without reloading."""
    if table is None:
        if queues is None:
            raise InvalidArgumentError("rss() needs `queues` or an explicit `table`", op="steer")
        table = even_table(queues, table_size)
    table = list(table)
    _check_table_size(len(table))
    model = m.RssModel(key, table, l4=l4, tap=tap)
    key_map = ArrayMap.create(m.RSS_INPUT_MAX * _TOEPLITZ_ROW, 1, name="mqtun_rss_key")
    table_map: ArrayMap | None = None
    try:
        key_map.update(0, _toeplitz_value(key))
        table_map = ArrayMap.create(4, len(table), name="mqtun_rss_tbl")
        table_map.update_many({i: struct.pack("=I", q) for i, q in enumerate(_table_values(
            table, len(table)))})
        code = rss_code(tap, key_map.fileno(), table_map.fileno(), len(table), l4)
        prog = Program.load(code, name="mqtun_rss", maps=(key_map, table_map))
    except BaseException:
        key_map.close()
        if table_map is not None:
            table_map.close()
        raise
    return RssProgram(prog, model, key_map, table_map)


def by_cpu(table: Sequence[int] | None = None) -> ByCpuProgram:
    """Load the by-CPU program: queue = the sending CPU (mod numqueues), or
    ``table[cpu % len(table)]``; the table can be rewritten later."""
    if table is None:
        return ByCpuProgram(Program.load(by_cpu_code(), name="mqtun_cpu"), m.ByCpuModel())
    values = list(table)
    if not values:
        raise InvalidArgumentError("an empty CPU table", op="steer")
    cpu_map = ArrayMap.create(4, len(values), name="mqtun_cpu_tbl")
    try:
        cpu_map.update_many({i: struct.pack("=I", q) for i, q in enumerate(
            _table_values(values, len(values)))})
        prog = Program.load(by_cpu_code(cpu_map.fileno(), len(values)), name="mqtun_cpu",
                            maps=(cpu_map,))
    except BaseException:
        cpu_map.close()
        raise
    return ByCpuProgram(prog, m.ByCpuModel(values), (cpu_map,))


def fixed(queue: int) -> FixedProgram:
    """Load a program that sends everything to one queue (``queue % numqueues``)."""
    return FixedProgram(Program.load(fixed_code(queue), name="mqtun_fixed"),
                        m.FixedModel(queue))
