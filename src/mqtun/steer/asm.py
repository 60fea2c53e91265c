"""A small, readable eBPF assembler, and a classic BPF (cBPF) one. Pure: both produce bytes.

eBPF, one Python call per instruction, jumps by label name::

    a = Assembler()
    a.ldxw(R2, R1, SKB_LEN)         # r2 = skb->len
    a.jlt(R2, 20, "short")          # if r2 < 20 goto short
    a.mov(R0, 1)
    a.exit()
    a.label("short")
    a.ret(0)                        # r0 = 0; exit
    code = a.assemble()             # bytes: 8 per slot, ld_imm64 takes two

Naming: an operation is 64-bit (ALU64/JMP) unless its name ends in ``32`` (ALU/JMP32);
``src_or_imm`` is a register (``R0``..``R10``) or a Python int. Loads and stores are
``ldx{b,h,w,dw}(dst, src, off)``, ``stx{b,h,w,dw}(dst, off, src)`` and ``st{b,h,w,dw}(dst, off,
imm)``. Labels are resolved by `assemble()`: an unknown or duplicate label, or a jump further
than a signed 16-bit offset, raises `AsmError`.

Classic BPF (`ClassicAssembler`) has the accumulator A and index X; its conditional jumps take a
"true" and a "false" label (``None`` = the next instruction) and may only jump forward, at most
255 instructions, as the kernel demands.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Protocol

from mqtun import _uapi as u
from mqtun.errors import InvalidArgumentError

__all__ = [
    "FP",
    "R0",
    "R1",
    "R2",
    "R3",
    "R4",
    "R5",
    "R6",
    "R7",
    "R8",
    "R9",
    "R10",
    "AsmError",
    "Assembler",
    "ClassicAssembler",
    "ClassicProgram",
    "Reg",
    "disassemble",
]


class AsmError(InvalidArgumentError):
    """A program that cannot be assembled: unknown/duplicate label, bad operand, far jump."""

    def __init__(self, message: str) -> None:
        super().__init__(message, op="assemble")


class Reg(int):
    """An eBPF register, r0..r10 (r10 is the read-only frame pointer)."""

    def __new__(cls, n: int) -> Reg:
        if not 0 <= n <= 10:
            raise AsmError(f"no register r{n}: eBPF has r0..r10")
        return super().__new__(cls, n)

    def __repr__(self) -> str:
        return f"r{int(self)}"

    __str__ = __repr__


R0, R1, R2, R3, R4, R5, R6, R7, R8, R9, R10 = (Reg(i) for i in range(11))
FP = R10

_S16 = (-(1 << 15), (1 << 15) - 1)
_S32 = (-(1 << 31), (1 << 31) - 1)

_SIZES = {"b": u.BPF_B, "h": u.BPF_H, "w": u.BPF_W, "dw": u.BPF_DW}
_SIZE_NAMES = {v: k for k, v in _SIZES.items()}

_ALU_OPS = {
    "add": u.BPF_ADD,
    "sub": u.BPF_SUB,
    "mul": u.BPF_MUL,
    "div": u.BPF_DIV,
    "or": u.BPF_OR,
    "and": u.BPF_AND,
    "lsh": u.BPF_LSH,
    "rsh": u.BPF_RSH,
    "mod": u.BPF_MOD,
    "xor": u.BPF_XOR,
    "mov": u.BPF_MOV,
    "arsh": u.BPF_ARSH,
}
_ALU_NAMES = {v: k for k, v in _ALU_OPS.items()} | {u.BPF_NEG: "neg", u.BPF_END: "end"}

_JMP_OPS = {
    "jeq": u.BPF_JEQ,
    "jgt": u.BPF_JGT,
    "jge": u.BPF_JGE,
    "jset": u.BPF_JSET,
    "jne": u.BPF_JNE,
    "jsgt": u.BPF_JSGT,
    "jsge": u.BPF_JSGE,
    "jlt": u.BPF_JLT,
    "jle": u.BPF_JLE,
    "jslt": u.BPF_JSLT,
    "jsle": u.BPF_JSLE,
}
_JMP_NAMES = {v: k for k, v in _JMP_OPS.items()}
_JMP_SYMBOLS = {
    "jeq": "==",
    "jne": "!=",
    "jgt": ">",
    "jge": ">=",
    "jlt": "<",
    "jle": "<=",
    "jsgt": "s>",
    "jsge": "s>=",
    "jslt": "s<",
    "jsle": "s<=",
    "jset": "&",
}


class _HasFileno(Protocol):
    def fileno(self) -> int: ...


@dataclass
class _Insn:
    code: int
    dst: int = 0
    src: int = 0
    off: int = 0
    imm: int = 0
    target: str | None = None  # label the `off` field jumps to
    wide: bool = False  # ld_imm64: two slots, imm is 64-bit

    @property
    def slots(self) -> int:
        return 2 if self.wide else 1


def _reg(x: object, what: str) -> Reg:
    if isinstance(x, Reg):
        return x
    raise AsmError(f"{what} must be a register (R0..R10), not {x!r}")


def _check_range(value: int, lo_hi: tuple[int, int], what: str) -> int:
    lo, hi = lo_hi
    if not lo <= value <= hi:
        raise AsmError(f"{what} {value} does not fit in [{lo}, {hi}]")
    return value


def _imm32(value: int, wide_ok: bool, what: str = "immediate") -> int:
    """A 32-bit immediate; 32-bit operations also take 0..2**32-1 (wrapped to signed)."""
    if not isinstance(value, int) or isinstance(value, Reg):
        raise AsmError(f"{what} must be an int, not {value!r}")
    if wide_ok and (1 << 31) <= value < (1 << 32):
        return value - (1 << 32)
    hint = "" if wide_ok else " (use ld_imm64 for 64-bit constants)"
    lo_hi = _S32
    if not lo_hi[0] <= value <= lo_hi[1]:
        raise AsmError(f"{what} {value:#x} does not fit in a signed 32-bit field{hint}")
    return value


class Assembler:
    """Build an eBPF program one instruction at a time; `assemble()` gives the bytes."""

    def __init__(self) -> None:
        self._insns: list[_Insn] = []
        self._labels: dict[str, int] = {}  # label -> index into _insns
        self._slots = 0

    # ---- structure ---------------------------------------------------------------------------
    def __len__(self) -> int:
        """Program length in 8-byte slots (what the kernel calls insn_cnt)."""
        return self._slots

    def label(self, name: str) -> Assembler:
        """Mark the next instruction with `name`."""
        if not isinstance(name, str) or not name:
            raise AsmError(f"a label is a non-empty string, not {name!r}")
        if name in self._labels:
            raise AsmError(f"duplicate label {name!r}")
        self._labels[name] = len(self._insns)
        return self

    def has_label(self, name: str) -> bool:
        return name in self._labels

    def emit(self, insn: _Insn) -> Assembler:
        self._insns.append(insn)
        self._slots += insn.slots
        return self

    def raw(self, code: int, dst: int = 0, src: int = 0, off: int = 0, imm: int = 0) -> Assembler:
        """Any instruction, by its fields (for opcodes this class has no name for)."""
        return self.emit(_Insn(code, dst, src, _check_range(off, _S16, "offset"), imm))

    # ---- ALU ---------------------------------------------------------------------------------
    def _alu(self, op: int, dst: Reg, src: Reg | int, wide: bool) -> Assembler:
        cls = u.BPF_ALU64 if wide else u.BPF_ALU
        dst = _reg(dst, "destination")
        if isinstance(src, Reg):
            return self.emit(_Insn(cls | op | u.BPF_X, dst, src))
        if op in (u.BPF_LSH, u.BPF_RSH, u.BPF_ARSH):
            _check_range(src, (0, 63 if wide else 31), "shift count")
        if op in (u.BPF_DIV, u.BPF_MOD) and src == 0:
            raise AsmError("division by the constant 0")
        return self.emit(_Insn(cls | op | u.BPF_K, dst, 0, 0, _imm32(src, not wide)))

    def mov(self, dst: Reg, src: Reg | int) -> Assembler:
        return self._alu(u.BPF_MOV, dst, src, True)

    def mov32(self, dst: Reg, src: Reg | int) -> Assembler:
        return self._alu(u.BPF_MOV, dst, src, False)

    def add(self, dst: Reg, src: Reg | int) -> Assembler:
        return self._alu(u.BPF_ADD, dst, src, True)

    def add32(self, dst: Reg, src: Reg | int) -> Assembler:
        return self._alu(u.BPF_ADD, dst, src, False)

    def sub(self, dst: Reg, src: Reg | int) -> Assembler:
        return self._alu(u.BPF_SUB, dst, src, True)

    def sub32(self, dst: Reg, src: Reg | int) -> Assembler:
        return self._alu(u.BPF_SUB, dst, src, False)

    def mul(self, dst: Reg, src: Reg | int) -> Assembler:
        return self._alu(u.BPF_MUL, dst, src, True)

    def mul32(self, dst: Reg, src: Reg | int) -> Assembler:
        return self._alu(u.BPF_MUL, dst, src, False)

    def div(self, dst: Reg, src: Reg | int) -> Assembler:
        return self._alu(u.BPF_DIV, dst, src, True)

    def div32(self, dst: Reg, src: Reg | int) -> Assembler:
        return self._alu(u.BPF_DIV, dst, src, False)

    def mod(self, dst: Reg, src: Reg | int) -> Assembler:
        return self._alu(u.BPF_MOD, dst, src, True)

    def mod32(self, dst: Reg, src: Reg | int) -> Assembler:
        return self._alu(u.BPF_MOD, dst, src, False)

    def and_(self, dst: Reg, src: Reg | int) -> Assembler:
        return self._alu(u.BPF_AND, dst, src, True)

    def and32(self, dst: Reg, src: Reg | int) -> Assembler:
        return self._alu(u.BPF_AND, dst, src, False)

    def or_(self, dst: Reg, src: Reg | int) -> Assembler:
        return self._alu(u.BPF_OR, dst, src, True)

    def or32(self, dst: Reg, src: Reg | int) -> Assembler:
        return self._alu(u.BPF_OR, dst, src, False)

    def xor(self, dst: Reg, src: Reg | int) -> Assembler:
        return self._alu(u.BPF_XOR, dst, src, True)

    def xor32(self, dst: Reg, src: Reg | int) -> Assembler:
        return self._alu(u.BPF_XOR, dst, src, False)

    def lsh(self, dst: Reg, src: Reg | int) -> Assembler:
        return self._alu(u.BPF_LSH, dst, src, True)

    def lsh32(self, dst: Reg, src: Reg | int) -> Assembler:
        return self._alu(u.BPF_LSH, dst, src, False)

    def rsh(self, dst: Reg, src: Reg | int) -> Assembler:
        return self._alu(u.BPF_RSH, dst, src, True)

    def rsh32(self, dst: Reg, src: Reg | int) -> Assembler:
        return self._alu(u.BPF_RSH, dst, src, False)

    def arsh(self, dst: Reg, src: Reg | int) -> Assembler:
        return self._alu(u.BPF_ARSH, dst, src, True)

    def arsh32(self, dst: Reg, src: Reg | int) -> Assembler:
        return self._alu(u.BPF_ARSH, dst, src, False)

    def neg(self, dst: Reg) -> Assembler:
        return self.emit(_Insn(u.BPF_ALU64 | u.BPF_NEG, _reg(dst, "destination")))

    def neg32(self, dst: Reg) -> Assembler:
        return self.emit(_Insn(u.BPF_ALU | u.BPF_NEG, _reg(dst, "destination")))

    # ---- byte swaps --------------------------------------------------------------------------
    def _end(self, dst: Reg, bits: int, source: int, cls: int = u.BPF_ALU) -> Assembler:
        if bits not in (16, 32, 64):
            raise AsmError(f"byte swap width is 16, 32 or 64, not {bits}")
        return self.emit(_Insn(cls | u.BPF_END | source, _reg(dst, "destination"), 0, 0, bits))

    def be16(self, dst: Reg) -> Assembler:
        """dst = htobe16(dst): network order <-> host order, upper bits cleared."""
        return self._end(dst, 16, u.BPF_TO_BE)

    def be32(self, dst: Reg) -> Assembler:
        return self._end(dst, 32, u.BPF_TO_BE)

    def be64(self, dst: Reg) -> Assembler:
        return self._end(dst, 64, u.BPF_TO_BE)

    def le16(self, dst: Reg) -> Assembler:
        return self._end(dst, 16, u.BPF_TO_LE)

    def le32(self, dst: Reg) -> Assembler:
        return self._end(dst, 32, u.BPF_TO_LE)

    def le64(self, dst: Reg) -> Assembler:
        return self._end(dst, 64, u.BPF_TO_LE)

    def bswap(self, dst: Reg, bits: int) -> Assembler:
        """Unconditional byte swap (BPF_ALU64 | BPF_END, kernel 6.6+)."""
        return self._end(dst, bits, u.BPF_TO_LE, u.BPF_ALU64)

    # ---- 64-bit immediates and map references ------------------------------------------------
    def ld_imm64(self, dst: Reg, value: int) -> Assembler:
        """dst = a 64-bit constant (two slots)."""
        if not -(1 << 63) <= value < (1 << 64):
            raise AsmError(f"{value:#x} does not fit in 64 bits")
        return self.emit(
            _Insn(u.BPF_LD | u.BPF_DW | u.BPF_IMM, _reg(dst, "destination"), 0, 0,
                  value & ((1 << 64) - 1), wide=True)
        )

    def ld_map_fd(self, dst: Reg, map_fd: int | _HasFileno) -> Assembler:
        """dst = pointer to the map whose fd is `map_fd` (the loader turns the fd into it)."""
        fd = map_fd if isinstance(map_fd, int) else map_fd.fileno()
        if fd < 0:
            raise AsmError(f"map fd {fd} is not open")
        return self.emit(
            _Insn(u.BPF_LD | u.BPF_DW | u.BPF_IMM, _reg(dst, "destination"),
                  u.BPF_PSEUDO_MAP_FD, 0, fd, wide=True)
        )

    # ---- memory ------------------------------------------------------------------------------
    def ldx(self, size: str, dst: Reg, src: Reg, off: int = 0) -> Assembler:
        """dst = *(size *)(src + off)."""
        return self.emit(
            _Insn(u.BPF_LDX | _size(size) | u.BPF_MEM, _reg(dst, "destination"),
                  _reg(src, "source"), _check_range(off, _S16, "offset"))
        )

    def stx(self, size: str, dst: Reg, off: int, src: Reg) -> Assembler:
        """*(size *)(dst + off) = src."""
        return self.emit(
            _Insn(u.BPF_STX | _size(size) | u.BPF_MEM, _reg(dst, "destination"),
                  _reg(src, "source"), _check_range(off, _S16, "offset"))
        )

    def st(self, size: str, dst: Reg, off: int, imm: int) -> Assembler:
        """*(size *)(dst + off) = imm."""
        return self.emit(
            _Insn(u.BPF_ST | _size(size) | u.BPF_MEM, _reg(dst, "destination"), 0,
                  _check_range(off, _S16, "offset"), _imm32(imm, size != "dw"))
        )

    def ldxb(self, dst: Reg, src: Reg, off: int = 0) -> Assembler:
        return self.ldx("b", dst, src, off)

    def ldxh(self, dst: Reg, src: Reg, off: int = 0) -> Assembler:
        return self.ldx("h", dst, src, off)

    def ldxw(self, dst: Reg, src: Reg, off: int = 0) -> Assembler:
        return self.ldx("w", dst, src, off)

    def ldxdw(self, dst: Reg, src: Reg, off: int = 0) -> Assembler:
        return self.ldx("dw", dst, src, off)

    def stxb(self, dst: Reg, off: int, src: Reg) -> Assembler:
        return self.stx("b", dst, off, src)

    def stxh(self, dst: Reg, off: int, src: Reg) -> Assembler:
        return self.stx("h", dst, off, src)

    def stxw(self, dst: Reg, off: int, src: Reg) -> Assembler:
        return self.stx("w", dst, off, src)

    def stxdw(self, dst: Reg, off: int, src: Reg) -> Assembler:
        return self.stx("dw", dst, off, src)

    def stb(self, dst: Reg, off: int, imm: int) -> Assembler:
        return self.st("b", dst, off, imm)

    def sth(self, dst: Reg, off: int, imm: int) -> Assembler:
        return self.st("h", dst, off, imm)

    def stw(self, dst: Reg, off: int, imm: int) -> Assembler:
        return self.st("w", dst, off, imm)

    def stdw(self, dst: Reg, off: int, imm: int) -> Assembler:
        return self.st("dw", dst, off, imm)

    def ld_abs(self, size: str, off: int) -> Assembler:
        """r0 = ntoh(*(size *)(skb->data + off)); needs r6 = ctx; clobbers r1-r5.

        A load past the end ends the program with return value 0."""
        if size == "dw":
            raise AsmError("ld_abs loads b, h or w")
        return self.emit(_Insn(u.BPF_LD | _size(size) | u.BPF_ABS, 0, 0, 0, _imm32(off, False)))

    def ld_ind(self, size: str, src: Reg, off: int) -> Assembler:
        """r0 = ntoh(*(size *)(skb->data + src + off)); like ld_abs."""
        if size == "dw":
            raise AsmError("ld_ind loads b, h or w")
        return self.emit(
            _Insn(u.BPF_LD | _size(size) | u.BPF_IND, 0, _reg(src, "source"), 0,
                  _imm32(off, False))
        )

    # ---- jumps, calls ------------------------------------------------------------------------
    def ja(self, target: str) -> Assembler:
        return self.emit(_Insn(u.BPF_JMP | u.BPF_JA, target=_label(target)))

    def _jmp(self, op: int, dst: Reg, src: Reg | int, target: str, wide: bool) -> Assembler:
        cls = u.BPF_JMP if wide else u.BPF_JMP32
        dst = _reg(dst, "compared register")
        if isinstance(src, Reg):
            return self.emit(_Insn(cls | op | u.BPF_X, dst, src, target=_label(target)))
        return self.emit(
            _Insn(cls | op | u.BPF_K, dst, 0, 0, _imm32(src, not wide), target=_label(target))
        )

    def jeq(self, dst: Reg, src: Reg | int, target: str) -> Assembler:
        return self._jmp(u.BPF_JEQ, dst, src, target, True)

    def jne(self, dst: Reg, src: Reg | int, target: str) -> Assembler:
        return self._jmp(u.BPF_JNE, dst, src, target, True)

    def jgt(self, dst: Reg, src: Reg | int, target: str) -> Assembler:
        return self._jmp(u.BPF_JGT, dst, src, target, True)

    def jge(self, dst: Reg, src: Reg | int, target: str) -> Assembler:
        return self._jmp(u.BPF_JGE, dst, src, target, True)

    def jlt(self, dst: Reg, src: Reg | int, target: str) -> Assembler:
        return self._jmp(u.BPF_JLT, dst, src, target, True)

    def jle(self, dst: Reg, src: Reg | int, target: str) -> Assembler:
        return self._jmp(u.BPF_JLE, dst, src, target, True)

    def jsgt(self, dst: Reg, src: Reg | int, target: str) -> Assembler:
        return self._jmp(u.BPF_JSGT, dst, src, target, True)

    def jsge(self, dst: Reg, src: Reg | int, target: str) -> Assembler:
        return self._jmp(u.BPF_JSGE, dst, src, target, True)

    def jslt(self, dst: Reg, src: Reg | int, target: str) -> Assembler:
        return self._jmp(u.BPF_JSLT, dst, src, target, True)

    def jsle(self, dst: Reg, src: Reg | int, target: str) -> Assembler:
        return self._jmp(u.BPF_JSLE, dst, src, target, True)

    def jset(self, dst: Reg, src: Reg | int, target: str) -> Assembler:
        return self._jmp(u.BPF_JSET, dst, src, target, True)

    def jeq32(self, dst: Reg, src: Reg | int, target: str) -> Assembler:
        return self._jmp(u.BPF_JEQ, dst, src, target, False)

    def jne32(self, dst: Reg, src: Reg | int, target: str) -> Assembler:
        return self._jmp(u.BPF_JNE, dst, src, target, False)

    def jgt32(self, dst: Reg, src: Reg | int, target: str) -> Assembler:
        return self._jmp(u.BPF_JGT, dst, src, target, False)

    def jge32(self, dst: Reg, src: Reg | int, target: str) -> Assembler:
        return self._jmp(u.BPF_JGE, dst, src, target, False)

    def jlt32(self, dst: Reg, src: Reg | int, target: str) -> Assembler:
        return self._jmp(u.BPF_JLT, dst, src, target, False)

    def jle32(self, dst: Reg, src: Reg | int, target: str) -> Assembler:
        return self._jmp(u.BPF_JLE, dst, src, target, False)

    def jset32(self, dst: Reg, src: Reg | int, target: str) -> Assembler:
        return self._jmp(u.BPF_JSET, dst, src, target, False)

    def call(self, helper: int | str) -> Assembler:
        """Call a kernel helper by id or by name ("map_lookup_elem" = BPF_FUNC_map_lookup_elem).

        Arguments go in r1-r5, the result comes back in r0; r1-r5 are clobbered."""
        if isinstance(helper, str):
            helper_id = getattr(u, f"BPF_FUNC_{helper}", None)
            if helper_id is None:
                raise AsmError(f"unknown helper {helper!r}: pass its numeric id")
            helper = int(helper_id)
        return self.emit(_Insn(u.BPF_JMP | u.BPF_CALL, 0, 0, 0, _imm32(helper, False)))

    def exit(self) -> Assembler:
        return self.emit(_Insn(u.BPF_JMP | u.BPF_EXIT))

    def ret(self, value: Reg | int) -> Assembler:
        """r0 = value; exit."""
        if not (isinstance(value, Reg) and value == R0):
            self.mov(R0, value)
        return self.exit()

    # ---- output ------------------------------------------------------------------------------
    def assemble(self) -> bytes:
        """The program as bytes, labels resolved."""
        if not self._insns:
            raise AsmError("an empty program")
        slot_of: list[int] = []
        slot = 0
        for insn in self._insns:
            slot_of.append(slot)
            slot += insn.slots
        label_slot = {
            name: (slot_of[i] if i < len(slot_of) else slot) for name, i in self._labels.items()
        }
        out = bytearray()
        for insn, here in zip(self._insns, slot_of, strict=True):
            off = insn.off
            if insn.target is not None:
                if insn.target not in label_slot:
                    raise AsmError(f"jump to unknown label {insn.target!r}")
                off = label_slot[insn.target] - (here + 1)
                if not _S16[0] <= off <= _S16[1]:
                    raise AsmError(
                        f"jump to {insn.target!r} is {off} slots away: more than a signed "
                        "16-bit offset"
                    )
            regs = (insn.src << 4) | insn.dst
            if insn.wide:
                out += struct.pack(u.BPF_INSN_FORMAT, insn.code, regs, 0,
                                   _signed32(insn.imm & 0xFFFFFFFF))
                out += struct.pack(u.BPF_INSN_FORMAT, 0, 0, 0, _signed32(insn.imm >> 32))
            else:
                out += struct.pack(u.BPF_INSN_FORMAT, insn.code, regs, off, insn.imm)
        return bytes(out)

    def listing(self) -> str:
        """A readable listing with labels, for debugging and error messages."""
        names: dict[int, list[str]] = {}
        for name, i in self._labels.items():
            names.setdefault(i, []).append(name)
        code = self.assemble()
        text = disassemble(code)
        lines: list[str] = []
        slot = 0
        for i, insn in enumerate(self._insns):
            for name in names.get(i, []):
                lines.append(f"{name}:")
            line = text[slot]
            if insn.target is not None:
                head = line.rsplit("goto ", 1)[0]
                line = f"{head}goto {insn.target}"
            lines.append(f"  {slot:4d}: {line}")
            slot += insn.slots
        for name in names.get(len(self._insns), []):
            lines.append(f"{name}:")
        return "\n".join(lines)


def _signed32(x: int) -> int:
    x &= 0xFFFFFFFF
    return x - (1 << 32) if x & 0x80000000 else x


def _size(size: str) -> int:
    try:
        return _SIZES[size]
    except KeyError:
        raise AsmError(f"size is one of b, h, w, dw, not {size!r}") from None


def _label(name: str) -> str:
    if not isinstance(name, str) or not name:
        raise AsmError(f"a jump target is a label name, not {name!r}")
    return name


def _insns(code: bytes) -> Iterator[tuple[int, int, int, int, int]]:
    if len(code) % u.BPF_INSN_SIZE:
        raise AsmError(f"{len(code)} bytes is not a whole number of instructions")
    for i in range(0, len(code), u.BPF_INSN_SIZE):
        c, regs, off, imm = struct.unpack_from(u.BPF_INSN_FORMAT, code, i)
        yield c, regs & 0x0F, regs >> 4, off, imm


def disassemble(code: bytes) -> list[str]:
    """One line per slot (the second slot of ld_imm64 reads "(ld_imm64 cont.)")."""
    out: list[str] = []
    items = list(_insns(code))
    i = 0
    while i < len(items):
        c, dst, src, off, imm = items[i]
        out.append(_disasm_one(c, dst, src, off, imm, i, items))
        if c == u.BPF_LD | u.BPF_DW | u.BPF_IMM:
            out.append("(ld_imm64 cont.)")
            i += 1
        i += 1
    return out


def _disasm_one(c: int, dst: int, src: int, off: int, imm: int, i: int,
                items: list[tuple[int, int, int, int, int]]) -> str:
    cls = c & u.BPF_CLASS_MASK
    if cls in (u.BPF_ALU, u.BPF_ALU64):
        w = "" if cls == u.BPF_ALU64 else "32"
        op = c & u.BPF_ALU_OP_MASK
        if op == u.BPF_END:
            kind = "bswap" if cls == u.BPF_ALU64 else ("be" if c & u.BPF_SRC_MASK else "le")
            return f"r{dst} = {kind}{imm} r{dst}"
        if op == u.BPF_NEG:
            return f"neg{w} r{dst}"
        operand = f"r{src}" if c & u.BPF_X else _imm_text(imm)
        return f"{_ALU_NAMES.get(op, hex(op))}{w} r{dst}, {operand}"
    if cls in (u.BPF_JMP, u.BPF_JMP32):
        op = c & u.BPF_JMP_JCOND_MASK
        target = i + 1 + off
        if op == u.BPF_JA:
            return f"goto {target}"
        if op == u.BPF_CALL:
            return f"call {imm}"
        if op == u.BPF_EXIT:
            return "exit"
        w = "32" if cls == u.BPF_JMP32 else ""
        operand = f"r{src}" if c & u.BPF_X else _imm_text(imm)
        name = _JMP_NAMES.get(op, hex(op))
        return f"if{w} r{dst} {_JMP_SYMBOLS.get(name, name)} {operand} goto {target}"
    size = _SIZE_NAMES.get(c & u.BPF_SIZE_MASK, "?")
    mode = c & u.BPF_MODE_MASK
    if cls == u.BPF_LD and mode == u.BPF_IMM and size == "dw":
        hi = items[i + 1][4] if i + 1 < len(items) else 0
        value = (imm & 0xFFFFFFFF) | ((hi & 0xFFFFFFFF) << 32)
        if src == u.BPF_PSEUDO_MAP_FD:
            return f"r{dst} = map_fd({imm})"
        return f"r{dst} = {value:#x} ll"
    if cls == u.BPF_LD and mode == u.BPF_ABS:
        return f"r0 = ld_abs_{size}[{imm}]"
    if cls == u.BPF_LD and mode == u.BPF_IND:
        return f"r0 = ld_ind_{size}[r{src} + {imm}]"
    if cls == u.BPF_LDX:
        return f"r{dst} = *(u{_bits(size)} *)(r{src} {off:+d})"
    if cls == u.BPF_STX:
        return f"*(u{_bits(size)} *)(r{dst} {off:+d}) = r{src}"
    if cls == u.BPF_ST:
        return f"*(u{_bits(size)} *)(r{dst} {off:+d}) = {imm}"
    return f"insn code={c:#04x} dst={dst} src={src} off={off} imm={imm}"


def _imm_text(imm: int) -> str:
    return str(imm) if abs(imm) < 4096 else f"{imm:#x}"


def _bits(size: str) -> int:
    return {"b": 8, "h": 16, "w": 32, "dw": 64}.get(size, 0)


# ==== classic BPF =============================================================================


@dataclass(frozen=True)
class ClassicProgram:
    """An assembled classic BPF program: `code` is `count` packed struct sock_filter."""

    code: bytes
    count: int

    def __len__(self) -> int:
        return self.count

    def __iter__(self) -> Iterator[tuple[int, int, int, int]]:
        """(code, jt, jf, k) per instruction."""
        return iter(struct.iter_unpack(u.SOCK_FILTER_FORMAT, self.code))


@dataclass
class _CInsn:
    code: int
    k: int = 0
    jt: str | None = None
    jf: str | None = None
    ja: str | None = None


class ClassicAssembler:
    """Classic BPF as TUNATTACHFILTER (and SO_ATTACH_FILTER) takes it.

    A is the accumulator, X the index register, M[0..15] scratch memory. Loads from the packet
    are big-endian. `ret(n)` accepts n bytes of the packet (0 drops it); `ret_a()` returns A.
    """

    def __init__(self) -> None:
        self._insns: list[_CInsn] = []
        self._labels: dict[str, int] = {}

    def __len__(self) -> int:
        return len(self._insns)

    def label(self, name: str) -> ClassicAssembler:
        if not isinstance(name, str) or not name:
            raise AsmError(f"a label is a non-empty string, not {name!r}")
        if name in self._labels:
            raise AsmError(f"duplicate label {name!r}")
        self._labels[name] = len(self._insns)
        return self

    def _emit(self, code: int, k: int = 0, **targets: str | None) -> ClassicAssembler:
        if not isinstance(k, int):
            raise AsmError(f"k must be an int, not {k!r}")
        if not -(1 << 31) <= k < (1 << 32):
            raise AsmError(f"k {k:#x} does not fit in 32 bits")
        self._insns.append(_CInsn(code, k & 0xFFFFFFFF, **targets))
        return self

    # loads into A
    def ld(self, size: str, offset: int) -> ClassicAssembler:
        """A = packet[offset] as a big-endian b/h/w (negative offsets reach SKF_AD_OFF & co)."""
        return self._emit(u.BPF_LD | _csize(size) | u.BPF_ABS, offset)

    def ldb(self, offset: int) -> ClassicAssembler:
        return self.ld("b", offset)

    def ldh(self, offset: int) -> ClassicAssembler:
        return self.ld("h", offset)

    def ldw(self, offset: int) -> ClassicAssembler:
        return self.ld("w", offset)

    def ld_ind(self, size: str, offset: int) -> ClassicAssembler:
        """A = packet[X + offset]."""
        return self._emit(u.BPF_LD | _csize(size) | u.BPF_IND, offset)

    def ld_len(self) -> ClassicAssembler:
        return self._emit(u.BPF_LD | u.BPF_W | u.BPF_LEN)

    def ld_imm(self, k: int) -> ClassicAssembler:
        return self._emit(u.BPF_LD | u.BPF_W | u.BPF_IMM, k)

    def ld_mem(self, slot: int) -> ClassicAssembler:
        return self._emit(u.BPF_LD | u.BPF_W | u.BPF_MEM, _mem(slot))

    def ld_ancillary(self, what: int) -> ClassicAssembler:
        """A = an skb field: `what` is one of _uapi.SKF_AD_* (e.g. SKF_AD_VLAN_TAG_PRESENT)."""
        return self._emit(u.BPF_LD | u.BPF_W | u.BPF_ABS, u.SKF_AD_OFF + what)

    # loads into X
    def ldx_imm(self, k: int) -> ClassicAssembler:
        return self._emit(u.BPF_LDX | u.BPF_W | u.BPF_IMM, k)

    def ldx_len(self) -> ClassicAssembler:
        return self._emit(u.BPF_LDX | u.BPF_W | u.BPF_LEN)

    def ldx_mem(self, slot: int) -> ClassicAssembler:
        return self._emit(u.BPF_LDX | u.BPF_W | u.BPF_MEM, _mem(slot))

    def ldx_msh(self, offset: int) -> ClassicAssembler:
        """X = 4 * (packet[offset] & 0xf): the IPv4 header length idiom."""
        return self._emit(u.BPF_LDX | u.BPF_B | u.BPF_MSH, offset)

    # stores
    def st(self, slot: int) -> ClassicAssembler:
        """M[slot] = A."""
        return self._emit(u.BPF_ST, _mem(slot))

    def stx(self, slot: int) -> ClassicAssembler:
        """M[slot] = X."""
        return self._emit(u.BPF_STX, _mem(slot))

    # ALU on A
    def alu(self, op: str, operand: int | str) -> ClassicAssembler:
        """A = A <op> operand; operand is an int or the string "x"."""
        try:
            code = _ALU_OPS[op]
        except KeyError:
            raise AsmError(f"unknown classic ALU op {op!r}") from None
        if code == u.BPF_MOV or code == u.BPF_ARSH:
            raise AsmError(f"classic BPF has no {op}")
        if operand == "x":
            return self._emit(u.BPF_ALU | code | u.BPF_X)
        if not isinstance(operand, int):
            raise AsmError(f"operand is an int or 'x', not {operand!r}")
        if code in (u.BPF_DIV, u.BPF_MOD) and operand == 0:
            raise AsmError("division by the constant 0")
        return self._emit(u.BPF_ALU | code | u.BPF_K, operand)

    def neg(self) -> ClassicAssembler:
        return self._emit(u.BPF_ALU | u.BPF_NEG)

    def tax(self) -> ClassicAssembler:
        return self._emit(u.BPF_MISC | u.BPF_TAX)

    def txa(self) -> ClassicAssembler:
        return self._emit(u.BPF_MISC | u.BPF_TXA)

    # jumps: `true`/`false` are label names, None means "the next instruction"
    def _jmp(self, op: int, k: int | str, true: str | None, false: str | None) -> ClassicAssembler:
        if k == "x":
            return self._emit(u.BPF_JMP | op | u.BPF_X, 0, jt=true, jf=false)
        if not isinstance(k, int):
            raise AsmError(f"compare with an int or 'x', not {k!r}")
        return self._emit(u.BPF_JMP | op | u.BPF_K, k, jt=true, jf=false)

    def jeq(self, k: int | str, true: str | None = None,
            false: str | None = None) -> ClassicAssembler:
        return self._jmp(u.BPF_JEQ, k, true, false)

    def jne(self, k: int | str, true: str | None = None,
            false: str | None = None) -> ClassicAssembler:
        """Sugar: jeq with the targets swapped (classic BPF has no JNE)."""
        return self._jmp(u.BPF_JEQ, k, false, true)

    def jgt(self, k: int | str, true: str | None = None,
            false: str | None = None) -> ClassicAssembler:
        return self._jmp(u.BPF_JGT, k, true, false)

    def jge(self, k: int | str, true: str | None = None,
            false: str | None = None) -> ClassicAssembler:
        return self._jmp(u.BPF_JGE, k, true, false)

    def jset(self, k: int | str, true: str | None = None,
            false: str | None = None) -> ClassicAssembler:
        return self._jmp(u.BPF_JSET, k, true, false)

    def ja(self, target: str) -> ClassicAssembler:
        return self._emit(u.BPF_JMP | u.BPF_JA, ja=_label(target))

    def ret(self, k: int) -> ClassicAssembler:
        """Accept k bytes of the packet (0: drop; 0xFFFFFFFF: all of it)."""
        return self._emit(u.BPF_RET | u.BPF_K, k)

    def ret_a(self) -> ClassicAssembler:
        return self._emit(u.BPF_RET | u.BPF_A)

    def assemble(self) -> ClassicProgram:
        if not self._insns:
            raise AsmError("an empty program")
        if len(self._insns) > u.BPF_MAXINSNS:
            raise AsmError(f"{len(self._insns)} instructions: classic BPF allows {u.BPF_MAXINSNS}")
        last = self._insns[-1].code
        if last & u.BPF_CLASS_MASK != u.BPF_RET and not (
            last & u.BPF_CLASS_MASK == u.BPF_JMP and last & u.BPF_JMP_JCOND_MASK == u.BPF_JA
        ):
            raise AsmError("a classic program must end with ret (or a jump)")
        out = bytearray()
        for i, insn in enumerate(self._insns):
            jt = self._forward(i, insn.jt, 255)
            jf = self._forward(i, insn.jf, 255)
            k = insn.k
            if insn.ja is not None:
                k = self._forward(i, insn.ja, 0xFFFFFFFF)
            out += struct.pack(u.SOCK_FILTER_FORMAT, insn.code, jt, jf, k)
        return ClassicProgram(bytes(out), len(self._insns))

    def _forward(self, i: int, name: str | None, limit: int) -> int:
        if name is None:
            return 0
        if name not in self._labels:
            raise AsmError(f"jump to unknown label {name!r}")
        target = self._labels[name]
        if target >= len(self._insns):
            raise AsmError(f"label {name!r} is past the last instruction")
        off = target - (i + 1)
        if off < 0:
            raise AsmError(f"jump to {name!r} goes backwards: classic BPF only jumps forward")
        if off > limit:
            raise AsmError(f"jump to {name!r} is {off} instructions away: more than {limit}")
        return off


def _csize(size: str) -> int:
    if size not in ("b", "h", "w"):
        raise AsmError(f"classic loads are b, h or w, not {size!r}")
    return _SIZES[size]


def _mem(slot: int) -> int:
    if not 0 <= slot < u.BPF_MEMWORDS:
        raise AsmError(f"scratch memory slot {slot} is not in 0..{u.BPF_MEMWORDS - 1}")
    return slot
