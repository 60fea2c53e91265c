"""The eBPF and classic BPF assemblers: encodings, labels, errors. Pure: no kernel."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mqtun import _uapi as u
from mqtun.errors import InvalidArgumentError
from mqtun.steer.asm import (
    FP,
    R0,
    R1,
    R2,
    R6,
    R10,
    AsmError,
    Assembler,
    ClassicAssembler,
    Reg,
    disassemble,
)

pytestmark = pytest.mark.sans_io  # pure: runs as any user, no namespace


def insn(code: int, dst: int = 0, src: int = 0, off: int = 0, imm: int = 0) -> bytes:
    return struct.pack("<BBhi", code, (src << 4) | dst, off, imm)


def test_the_documented_two_instruction_program() -> None:
    # KERNEL_TUN.md: `r0 = 2; exit` is (0xb7, dst 0, imm 2), (0x95)
    code = Assembler().mov(R0, 2).exit().assemble()
    assert code == insn(0xB7, imm=2) + insn(0x95)


@pytest.mark.parametrize(
    ("build", "expected"),
    [
        (lambda a: a.mov(R1, R2), insn(0xBF, 1, 2)),
        (lambda a: a.mov32(R1, 0xFFFFFFFF), insn(0xB4, 1, imm=-1)),
        (lambda a: a.add(R1, -4), insn(0x07, 1, imm=-4)),
        (lambda a: a.xor32(R0, R1), insn(0xAC, 0, 1)),
        (lambda a: a.rsh32(R0, 15), insn(0x74, 0, imm=15)),
        (lambda a: a.neg(R2), insn(0x87, 2)),
        (lambda a: a.be16(R1), insn(0xDC, 1, imm=16)),
        (lambda a: a.le32(R1), insn(0xD4, 1, imm=32)),
        (lambda a: a.bswap(R1, 64), insn(0xD7, 1, imm=64)),
        (lambda a: a.ldxw(R0, R1, 0), insn(0x61, 0, 1)),
        (lambda a: a.ldxb(R2, FP, -56), insn(0x71, 2, 10, -56)),
        (lambda a: a.ldxdw(R2, R1, 8), insn(0x79, 2, 1, 8)),
        (lambda a: a.stxh(FP, -2, R1), insn(0x6B, 10, 1, -2)),
        (lambda a: a.stw(FP, -4, 7), insn(0x62, 10, 0, -4, 7)),
        (lambda a: a.ld_abs("h", 12), insn(0x28, imm=12)),
        (lambda a: a.ld_ind("b", R1, 3), insn(0x50, 0, 1, 0, 3)),
        (lambda a: a.call("map_lookup_elem"), insn(0x85, imm=1)),
        (lambda a: a.call(8), insn(0x85, imm=8)),
    ],
)
def test_single_instruction_encodings(build, expected: bytes) -> None:  # type: ignore[no-untyped-def]
    a = Assembler()
    build(a)
    assert a.assemble() == expected


def test_ld_imm64_takes_two_slots_and_map_fds_are_pseudo_loads() -> None:
    a = Assembler().ld_imm64(R1, 0x1122334455667788).ld_map_fd(R2, 9).exit()
    code = a.assemble()
    assert len(a) == 5 and len(code) == 40
    assert code[:16] == insn(0x18, 1, imm=0x55667788) + insn(0, imm=0x11223344)
    assert code[16:32] == insn(0x18, 2, u.BPF_PSEUDO_MAP_FD, imm=9) + insn(0)

    class FakeMap:
        def fileno(self) -> int:
            return 12

    assert Assembler().ld_map_fd(R1, FakeMap()).exit().assemble()[4:8] == struct.pack("<i", 12)


def test_labels_resolve_forward_and_backward_across_wide_loads() -> None:
    a = Assembler()
    a.label("top")
    a.jeq(R1, 0x800, "ipv4")  # slot 0 -> slot 4
    a.ld_imm64(R2, 1)  # slots 1-2
    a.ja("top")  # slot 3 -> slot 0: off -4
    a.label("ipv4")
    a.exit()
    code = a.assemble()
    assert struct.unpack_from("<h", code, 2)[0] == 3
    assert struct.unpack_from("<h", code, 24 + 2)[0] == -4
    listing = [line.strip() for line in a.listing().splitlines()]
    assert listing == ["top:", "0: if r1 == 2048 goto ipv4", "1: r2 = 0x1 ll", "3: goto top",
                       "ipv4:", "4: exit"]


def test_a_label_at_the_very_end_is_allowed_for_jumps_past_the_last_insn() -> None:
    a = Assembler().ja("end").label("end")
    assert struct.unpack_from("<h", a.assemble(), 2)[0] == 0


def test_jmp32_and_register_operands() -> None:
    a = Assembler().jgt32(R1, R2, "x").jset(R1, 4, "x").label("x").exit()
    code = a.assemble()
    assert code[0] == 0x2E and code[1] == (2 << 4) | 1
    assert code[8] == 0x45


def test_errors_unknown_duplicate_and_far_labels() -> None:
    with pytest.raises(AsmError, match="unknown label 'nowhere'"):
        Assembler().ja("nowhere").exit().assemble()
    with pytest.raises(AsmError, match="duplicate label 'x'"):
        Assembler().label("x").exit().label("x")
    a = Assembler().ja("far")
    for _ in range(40000):
        a.mov(R0, 0)
    a.label("far").exit()
    with pytest.raises(AsmError, match="signed 16-bit"):
        a.assemble()


def test_errors_are_the_libraries_invalid_argument() -> None:
    with pytest.raises(InvalidArgumentError):
        Assembler().mov(R0, 1 << 40)
    with pytest.raises(AsmError, match="ld_imm64"):
        Assembler().add(R0, 0x80000000)
    with pytest.raises(AsmError, match="register"):
        Assembler().mov(5, 1)  # type: ignore[arg-type]
    with pytest.raises(AsmError):
        Reg(11)
    with pytest.raises(AsmError, match="shift"):
        Assembler().lsh32(R0, 32)
    with pytest.raises(AsmError, match="division"):
        Assembler().div(R0, 0)
    with pytest.raises(AsmError, match="size"):
        Assembler().ldx("q", R0, R1)
    with pytest.raises(AsmError, match="unknown helper"):
        Assembler().call("no_such_helper")
    with pytest.raises(AsmError, match="empty"):
        Assembler().assemble()
    with pytest.raises(AsmError, match="offset"):
        Assembler().ldxw(R0, R1, 1 << 15)


def test_disassembler_reads_back_what_was_written() -> None:
    a = Assembler()
    a.mov(R6, R1).ldxw(R0, R6, 0).jne(R0, 0, "out").ld_imm64(R1, 5).label("out")
    a.be32(R0).call(8).ret(0)
    lines = disassemble(a.assemble())
    assert lines == [
        "mov r6, r1",
        "r0 = *(u32 *)(r6 +0)",
        "if r0 != 0 goto 5",
        "r1 = 0x5 ll",
        "(ld_imm64 cont.)",
        "r0 = be32 r0",
        "call 8",
        "mov r0, 0",
        "exit",
    ]


@given(
    ops=st.lists(
        st.tuples(
            st.sampled_from(["add", "sub", "mul", "or_", "and_", "xor", "mov", "lsh", "rsh"]),
            st.booleans(),
            st.integers(0, 9),
            st.one_of(st.integers(0, 9).map(Reg), st.integers(0, 31)),
        ),
        min_size=1,
        max_size=30,
    )
)
def test_every_alu_instruction_is_one_slot_of_8_bytes(ops) -> None:  # type: ignore[no-untyped-def]
    a = Assembler()
    for name, wide, dst, src in ops:
        method = getattr(a, name if wide else name.rstrip("_") + "32")
        method(Reg(dst), src)
    a.exit()
    code = a.assemble()
    assert len(code) == 8 * (len(ops) + 1) == 8 * len(a)
    assert len(disassemble(code)) == len(ops) + 1


def test_frame_pointer_is_r10() -> None:
    assert FP == R10 == 10 and repr(FP) == "r10"


# ---- classic ---------------------------------------------------------------------------------


def test_classic_encodings_match_tcpdump_dd() -> None:
    # `tcpdump -dd ip`: ldh [12]; jeq #0x800 jt 0 jf 1; ret #262144; ret #0
    a = ClassicAssembler()
    a.ldh(12).jeq(0x800, None, "drop").ret(262144).label("drop").ret(0)
    prog = a.assemble()
    assert prog.count == 4 == len(prog)
    assert list(prog) == [(0x28, 0, 0, 12), (0x15, 0, 1, 0x800), (0x06, 0, 0, 262144),
                          (0x06, 0, 0, 0)]
    assert prog.code[:8] == struct.pack("=HBBI", 0x28, 0, 0, 12)


def test_classic_other_opcodes() -> None:
    a = ClassicAssembler()
    a.ldx_msh(14).ld_ind("h", 16).alu("and", 0xFF).alu("add", "x").st(3).ldx_mem(3)
    a.tax().txa().ld_len().ld_ancillary(u.SKF_AD_VLAN_TAG_PRESENT).ja("end")
    a.ret(1).label("end").ret_a()
    codes = [c for c, *_ in a.assemble()]
    assert codes == [0xB1, 0x48, 0x54, 0x0C, 0x02, 0x61, 0x07, 0x87, 0x80, 0x20, 0x05, 0x06,
                     0x16]
    assert list(a.assemble())[9][3] == (u.SKF_AD_OFF + u.SKF_AD_VLAN_TAG_PRESENT) & 0xFFFFFFFF
    assert list(a.assemble())[10][3] == 1  # ja skips one instruction


def test_classic_jumps_only_forward_and_at_most_255() -> None:
    a = ClassicAssembler().label("back").ld_len().jeq(1, "back").ret(0)
    with pytest.raises(AsmError, match="backwards"):
        a.assemble()
    a = ClassicAssembler().ld_len().jeq(1, "far")
    for _ in range(256):
        a.ld_len()
    a.label("far").ret(0)
    with pytest.raises(AsmError, match="255"):
        a.assemble()
    with pytest.raises(AsmError, match="end with ret"):
        ClassicAssembler().ld_len().assemble()
    with pytest.raises(AsmError, match="unknown label"):
        ClassicAssembler().jeq(1, "nope").ret(0).assemble()
    with pytest.raises(AsmError, match="slot"):
        ClassicAssembler().st(16)
