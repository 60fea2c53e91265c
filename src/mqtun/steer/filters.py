"""Filters on the packets a device hands to its queues: eBPF, classic BPF and the MAC filter.

Three kernel mechanisms, applied in this order in tun_net_xmit (after the queue was chosen):

1. the MAC filter (TUNSETTXFILTER, TAP only): `pack_tx_filter`, modelled by `TxFilterModel`;
2. a classic BPF socket filter (TUNATTACHFILTER, TAP only): `classic_accept_dst_macs`,
   `classic_only_ethertypes`, ..., modelled by `run_classic` (a small cBPF interpreter);
3. an eBPF filter (TUNSETFILTEREBPF, TUN and TAP): `ebpf_filter`, `accept_all`, `drop_all`,
   `truncate`: the program returns how many bytes to keep, 0 drops the packet.

Each filter sees the packet as the steering program does: from the IP header (TUN) or the
Ethernet header (TAP); a VLAN tag the stack keeps out of band is not in the data.
"""

from __future__ import annotations

import struct
import zlib
from collections.abc import Iterable, Sequence

from mqtun import _uapi as u
from mqtun.errors import InvalidArgumentError
from mqtun.steer import model as m
from mqtun.steer.asm import FP, R0, R1, R6, R8, Assembler, ClassicAssembler, ClassicProgram
from mqtun.steer.bpf import Program, ProgramInfo
from mqtun.steer.programs import PROTO_SLOT, emit_parse

__all__ = [
    "ClassicProgram",
    "FilterModel",
    "FilterProgram",
    "TxFilterModel",
    "accept_all",
    "check_classic",
    "classic_accept_dst_macs",
    "classic_only_ethertypes",
    "classic_only_ipv4",
    "classic_only_ipv6",
    "drop_all",
    "ebpf_filter",
    "ebpf_filter_code",
    "ether_crc_bucket",
    "mac_bytes",
    "pack_tx_filter",
    "run_classic",
    "truncate",
]

ACCEPT_ALL = 0xFFFFFFFF  # a classic filter's "keep the whole packet"
TX_FILTER_EXACT = 8  # FLT_EXACT_COUNT in tun.c


def mac_bytes(mac: bytes | str) -> bytes:
    """A MAC address from 6 bytes or "aa:bb:cc:dd:ee:ff"."""
    if isinstance(mac, str):
        parts = mac.replace("-", ":").split(":")
        try:
            raw = bytes(int(p, 16) for p in parts)
        except ValueError:
            raw = b""
    else:
        raw = bytes(mac)
    if len(raw) != u.ETH_ALEN:
        raise InvalidArgumentError(f"not a MAC address: {mac!r}", op="filter")
    return raw


# ---- eBPF filters (TUNSETFILTEREBPF) -----------------------------------------------------------


class FilterModel:
    """What an `ebpf_filter` program returns: the bytes of the packet to keep (0 = drop)."""

    def __init__(self, *, tap: bool = False, ip_versions: Iterable[int] | None = None,
                 protocols: Iterable[int] | None = None, max_length: int | None = None,
                 drop: bool = False) -> None:
        self.tap = tap
        self.ip_versions = None if ip_versions is None else frozenset(ip_versions)
        self.protocols = None if protocols is None else frozenset(protocols)
        self.max_length = max_length
        self.drop = drop
        for v in self.ip_versions or ():
            if v not in (4, 6):
                raise InvalidArgumentError(f"IP versions are 4 and 6, not {v!r}", op="filter")
        if max_length is not None and not 1 <= max_length <= 0xFFFFFFFF:
            raise InvalidArgumentError("max_length must be positive (0 would drop all)",
                                       op="filter")

    @property
    def parses(self) -> bool:
        return self.ip_versions is not None or self.protocols is not None

    def ret(self, packet: bytes) -> int:
        """The program's return value for `packet`."""
        if self.drop:
            return 0
        if self.parses:
            flow = m.parse_flow(packet, self.tap)
            if flow is None:
                return 0
            if self.ip_versions is not None and flow.family not in self.ip_versions:
                return 0
            if self.protocols is not None and flow.proto not in self.protocols:
                return 0
        n = len(packet)
        return n if self.max_length is None else min(n, self.max_length)

    def kept(self, packet: bytes) -> int:
        """Bytes of `packet` that reach the queue (0: dropped)."""
        return min(self.ret(packet), len(packet))


def build_ebpf_filter(model: FilterModel) -> Assembler:
    a = Assembler()
    if model.drop:
        return a.ret(0)
    if model.parses:
        emit_parse(a, model.tap, none="drop", done="flow")
        a.label("flow")
        if model.ip_versions is not None:
            for v in sorted(model.ip_versions):
                a.jeq(R8, v, "version_ok")
            a.ja("drop")
            a.label("version_ok")
        if model.protocols is not None:
            a.ldxw(R1, FP, PROTO_SLOT)
            for proto in sorted(model.protocols):
                a.jeq(R1, proto, "proto_ok")
            a.ja("drop")
            a.label("proto_ok")
        a.ldxw(R0, R6, u.SKB_LEN)
    else:
        a.ldxw(R0, R1, u.SKB_LEN)
    if model.max_length is not None and model.max_length < (1 << 31):  # (longer: no skb is)
        a.jle(R0, model.max_length, "keep")
        a.mov32(R0, model.max_length)
        a.label("keep")
    a.exit()
    if model.parses:
        a.label("drop")
        a.ret(0)
    return a


def ebpf_filter_code(model: FilterModel) -> bytes:
    return build_ebpf_filter(model).assemble()


class FilterProgram:
    """A loaded eBPF filter with its model. Attach: ``dev.set_filter_program(prog)``."""

    def __init__(self, program: Program, model: FilterModel) -> None:
        self.program = program
        self.model = model

    def fileno(self) -> int:
        return self.program.fileno()

    def close(self) -> None:
        self.program.close()

    @property
    def closed(self) -> bool:
        return self.program.closed

    def __enter__(self):  # type: ignore[no-untyped-def]
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def info(self) -> ProgramInfo:
        return self.program.info()

    def kept(self, packet: bytes) -> int:
        """The model: bytes of `packet` that reach a queue (0 = dropped)."""
        return self.model.kept(packet)

    def run(self, packet: bytes) -> int:
        """The loaded program's return value for `packet` (BPF_PROG_TEST_RUN)."""
        return self.program.run(packet, tap=self.model.tap)

    def __repr__(self) -> str:
        return f"<FilterProgram {self.program!r}>"


def ebpf_filter(*, tap: bool = False, ip_versions: Iterable[int] | None = None,
                protocols: Iterable[int] | None = None,
                max_length: int | None = None) -> FilterProgram:
    """Load an eBPF filter: keep packets of these IP versions and L4 protocols (None: any),
    trimmed to `max_length` bytes. With a version or protocol given, non-IP packets drop."""
    model = FilterModel(tap=tap, ip_versions=ip_versions, protocols=protocols,
                        max_length=max_length)
    return FilterProgram(Program.load(ebpf_filter_code(model), name="mqtun_filter"), model)


def accept_all(tap: bool = False) -> FilterProgram:
    return ebpf_filter(tap=tap)


def drop_all(tap: bool = False) -> FilterProgram:
    model = FilterModel(tap=tap, drop=True)
    return FilterProgram(Program.load(ebpf_filter_code(model), name="mqtun_drop"), model)


def truncate(max_length: int, tap: bool = False) -> FilterProgram:
    """Keep at most `max_length` bytes of every packet (a snap length)."""
    return ebpf_filter(tap=tap, max_length=max_length)


# ---- classic BPF (TUNATTACHFILTER, TAP only) ---------------------------------------------------


def classic_accept_dst_macs(macs: Sequence[bytes | str]) -> ClassicProgram:
    """Keep frames whose destination MAC is one of `macs` (at most 63), drop the rest."""
    raw = [mac_bytes(x) for x in macs]
    if not raw:
        raise InvalidArgumentError("no MAC address given (that would drop everything)",
                                   op="filter")
    a = ClassicAssembler()
    for i, mac in enumerate(raw):
        hi, lo = struct.unpack("!HI", mac)
        a.ldw(2).jeq(lo, None, f"next{i}")
        a.ldh(0).jeq(hi, "accept", f"next{i}")
        a.label(f"next{i}")
    a.ret(0)
    a.label("accept")
    a.ret(ACCEPT_ALL)
    return a.assemble()


def classic_only_ethertypes(ethertypes: Iterable[int]) -> ClassicProgram:
    """Keep frames of these ethertypes, looking through one 802.1Q/802.1ad tag in the data."""
    types = sorted(set(ethertypes))
    if not types:
        raise InvalidArgumentError("no ethertype given (that would drop everything)",
                                   op="filter")
    a = ClassicAssembler()
    a.ldh(12)
    a.jeq(u.ETH_P_8021Q, "tagged")
    a.jeq(u.ETH_P_8021AD, "tagged")
    for t in types:
        a.jeq(t, "accept")
    a.ret(0)
    a.label("tagged")
    a.ldh(12 + u.VLAN_HLEN)
    for t in types:
        a.jeq(t, "accept")
    a.ret(0)
    a.label("accept")
    a.ret(ACCEPT_ALL)
    return a.assemble()


def classic_only_ipv4() -> ClassicProgram:
    return classic_only_ethertypes([u.ETH_P_IP])


def classic_only_ipv6() -> ClassicProgram:
    return classic_only_ethertypes([u.ETH_P_IPV6])


def check_classic(program: ClassicProgram) -> None:
    """Refuse what the kernel's checker (bpf_check_classic) refuses at attach time: a scratch
    memory index outside M[0..15], `ret x` (Linux has only `ret #k` and `ret a`, unlike BSD),
    a jump out of the program, a program not ending in ret."""
    insns = list(program)
    if not insns or len(insns) > u.BPF_MAXINSNS:
        raise InvalidArgumentError(f"a classic program has 1..{u.BPF_MAXINSNS} instructions",
                                   op="filter")
    for pc, (code, jt, jf, k) in enumerate(insns):
        cls = code & u.BPF_CLASS_MASK
        mem = (cls in (u.BPF_ST, u.BPF_STX)
               or (cls in (u.BPF_LD, u.BPF_LDX) and code & u.BPF_MODE_MASK == u.BPF_MEM))
        if mem and k >= u.BPF_MEMWORDS:
            raise InvalidArgumentError(
                f"instruction {pc}: scratch memory M[{k}] is outside M[0..{u.BPF_MEMWORDS - 1}] "
                "(the kernel refuses this program: EINVAL)", op="filter")
        if cls == u.BPF_RET and code & _BPF_RVAL_MASK not in (u.BPF_K, u.BPF_A):
            raise InvalidArgumentError(
                f"instruction {pc}: Linux has no `ret x` (only ret #k and ret a: use txa; ret a)"
                " and refuses this program (EINVAL)", op="filter")
        if cls == u.BPF_JMP:
            far = k if code & u.BPF_JMP_JCOND_MASK == u.BPF_JA else max(jt, jf)
            if pc + 1 + far >= len(insns):
                raise InvalidArgumentError(f"instruction {pc}: jump past the end", op="filter")
    if insns[-1][0] & u.BPF_CLASS_MASK != u.BPF_RET:
        raise InvalidArgumentError("a classic program must end with ret", op="filter")


def run_classic(program: ClassicProgram, packet: bytes) -> int:
    """Interpret a classic BPF program on `packet` as the kernel would: its return value
    (bytes to keep; 0 drops). A load past the end returns 0. Ancillary loads are not modelled.
    A program the kernel's checker would refuse is refused here (InvalidArgumentError)."""
    check_classic(program)
    insns = list(program)
    a = x = 0
    mem = [0] * u.BPF_MEMWORDS
    pc = 0
    size_of = {u.BPF_W: 4, u.BPF_H: 2, u.BPF_B: 1}
    for _ in range(len(insns) + 1):  # forward jumps only: at most one pass
        if pc >= len(insns):
            return 0
        code, jt, jf, k = insns[pc]
        pc += 1
        cls = code & u.BPF_CLASS_MASK
        if cls in (u.BPF_LD, u.BPF_LDX):
            mode = code & u.BPF_MODE_MASK
            size = size_of.get(code & u.BPF_SIZE_MASK, 4)
            if mode in (u.BPF_ABS, u.BPF_IND):
                off = (k if k < (1 << 31) else k - (1 << 32)) + (x if mode == u.BPF_IND else 0)
                if off < 0:
                    raise InvalidArgumentError("ancillary loads are not modelled", op="filter")
                if off + size > len(packet):
                    return 0
                val = int.from_bytes(packet[off : off + size], "big")
            elif mode == u.BPF_LEN:
                val = len(packet)
            elif mode == u.BPF_IMM:
                val = k
            elif mode == u.BPF_MEM:
                val = mem[k]
            elif mode == u.BPF_MSH and cls == u.BPF_LDX:
                if k >= len(packet):
                    return 0
                val = (packet[k] & 0x0F) * 4
            else:
                raise InvalidArgumentError(f"unsupported classic load {code:#x}", op="filter")
            if cls == u.BPF_LD:
                a = val
            else:
                x = val
        elif cls == u.BPF_ST:
            mem[k] = a
        elif cls == u.BPF_STX:
            mem[k] = x
        elif cls == u.BPF_ALU:
            op = code & u.BPF_ALU_OP_MASK
            operand = x if code & u.BPF_X else k
            if op == u.BPF_NEG:
                a = -a
            elif op in (u.BPF_DIV, u.BPF_MOD) and operand == 0:
                return 0
            else:
                a = _CLASSIC_ALU[op](a, operand)
            a &= 0xFFFFFFFF
        elif cls == u.BPF_JMP:
            op = code & u.BPF_JMP_JCOND_MASK
            if op == u.BPF_JA:
                pc += k
                continue
            operand = x if code & u.BPF_X else k
            taken = {
                u.BPF_JEQ: a == operand,
                u.BPF_JGT: a > operand,
                u.BPF_JGE: a >= operand,
                u.BPF_JSET: bool(a & operand),
            }[op]
            pc += jt if taken else jf
        elif cls == u.BPF_RET:
            return a if code & _BPF_RVAL_MASK == u.BPF_A else k
        elif cls == u.BPF_MISC:
            if code & u.BPF_TXA:
                a = x
            else:
                x = a
    return 0


_BPF_RVAL_MASK = u.BPF_A | u.BPF_X  # BPF_RVAL(code): where ret takes its value (K, X or A)

_CLASSIC_ALU = {
    u.BPF_ADD: lambda a, b: a + b,
    u.BPF_SUB: lambda a, b: a - b,
    u.BPF_MUL: lambda a, b: a * b,
    u.BPF_DIV: lambda a, b: a // b,
    u.BPF_MOD: lambda a, b: a % b,
    u.BPF_OR: lambda a, b: a | b,
    u.BPF_AND: lambda a, b: a & b,
    u.BPF_XOR: lambda a, b: a ^ b,
    u.BPF_LSH: lambda a, b: a << (b & 31),
    u.BPF_RSH: lambda a, b: a >> (b & 31),
}


# ---- the MAC filter (TUNSETTXFILTER, TAP only) -------------------------------------------------


def pack_tx_filter(macs: Sequence[bytes | str], allmulti: bool = False) -> bytes:
    """struct tun_filter: u16 flags, u16 count, then count 6-byte addresses."""
    raw = [mac_bytes(x) for x in macs]
    if len(raw) > 0xFFFF:
        raise InvalidArgumentError("too many addresses for a MAC filter", op="filter")
    head = struct.pack(u.TUN_FILTER_HEADER_FORMAT, u.TUN_FLT_ALLMULTI if allmulti else 0, len(raw))
    return head + b"".join(raw)


def ether_crc_bucket(mac: bytes | str) -> int:
    """The kernel's multicast hash bucket (0..63) of an address: ether_crc(6, addr) >> 26."""
    raw = zlib.crc32(mac_bytes(mac)) ^ 0xFFFFFFFF  # crc32_le(~0, ...) without the final xor
    return int(f"{raw:032b}"[::-1], 2) >> 26  # bitrev32, top 6 bits


class TxFilterModel:
    """Which destination MACs the kernel's MAC filter lets through (tun.c: update_filter,
    run_filter): the first 8 addresses match exactly; further ones must be multicast and match
    by a 64-bucket hash (so other multicast addresses can pass too); a unicast address past the
    eighth leaves the filter off; ALLMULTI passes every multicast address; no address at all
    removes the filter."""

    def __init__(self, macs: Sequence[bytes | str], allmulti: bool = False) -> None:
        raw = [mac_bytes(x) for x in macs]
        self.exact = raw[:TX_FILTER_EXACT]
        rest = raw[TX_FILTER_EXACT:]
        self.enabled = bool(raw) and all(x[0] & 1 for x in rest)
        self.buckets = {ether_crc_bucket(x) for x in rest}
        if allmulti:
            self.buckets = set(range(64))

    def accepts(self, dst: bytes | str) -> bool:
        dst = mac_bytes(dst)
        if not self.enabled or dst in self.exact:
            return True
        return bool(dst[0] & 1) and ether_crc_bucket(dst) in self.buckets
