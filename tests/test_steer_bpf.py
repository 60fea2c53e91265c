"""bpf(2) through ctypes: program loading, the verifier's log in errors, array maps, test runs."""

from __future__ import annotations

import os
import struct

import pytest

from mqtun import _uapi as u
from mqtun.errors import InvalidArgumentError, MqtunError
from mqtun.steer.asm import FP, R0, R1, R2, R6, Assembler
from mqtun.steer.bpf import (
    ArrayMap,
    BpfError,
    Program,
    VerifierError,
    loaded_program_ids,
    tap_view,
    tun_view,
)


def test_load_run_and_describe_a_program() -> None:
    code = Assembler().ldxw(R0, R1, u.SKB_LEN).exit().assemble()
    with Program.load(code, name="skb-len!") as prog:
        assert prog.fileno() >= 0
        assert prog.test_run(tun_view(bytes(60))).retval == 60
        assert prog.run(bytes(33), tap=True) == 33
        info = prog.info()
        assert info.type == u.BPF_PROG_TYPE_SOCKET_FILTER
        assert info.name == "skb_len_"  # sanitised to the kernel's charset
        assert info.id in loaded_program_ids()
        assert len(info.tag) == 16 and info.xlated_len == len(code)
    assert prog.closed
    with pytest.raises(BpfError, match="closed"):
        prog.fileno()


def test_a_refused_program_raises_with_the_verifiers_log() -> None:
    # r0 is never written: the verifier says "R0 !read_ok"
    with pytest.raises(VerifierError) as caught:
        Program.load(Assembler().exit().assemble(), name="no_r0")
    err = caught.value
    assert isinstance(err, MqtunError)
    assert "R0 !read_ok" in str(err) and "R0 !read_ok" in err.log
    assert "verifier" in str(err) and "no_r0" in str(err)


def test_an_out_of_bounds_stack_read_is_explained_too() -> None:
    a = Assembler().ldxdw(R0, FP, 8).exit()
    with pytest.raises(VerifierError, match=r"invalid (read from stack|.*stack)"):
        Program.load(a.assemble(), name="oob")


def test_a_program_that_is_not_whole_instructions_is_refused_before_the_kernel() -> None:
    with pytest.raises(InvalidArgumentError):
        Program.load(b"\x95" * 7)


def test_array_map_create_update_lookup_and_batch() -> None:
    with ArrayMap.create(4, 8, name="mqtun-test") as mp:
        assert len(mp) == 8 and mp.lookup(5) == bytes(4)
        mp[5] = struct.pack("=I", 0xDEADBEEF)
        assert mp[5] == struct.pack("=I", 0xDEADBEEF)
        mp.update_many({0: b"aaaa", 7: b"bbbb"})
        values = list(mp)
        assert values[0] == b"aaaa" and values[7] == b"bbbb"
        info = mp.info()
        assert (info.type, info.key_size, info.value_size, info.max_entries) == (
            u.BPF_MAP_TYPE_ARRAY, 4, 4, 8)
        with pytest.raises(InvalidArgumentError, match="outside"):
            mp.lookup(8)
        with pytest.raises(InvalidArgumentError, match="4-byte"):
            mp.update(0, b"toolong")


def test_a_program_reads_a_map_that_userspace_rewrites_without_reload() -> None:
    with ArrayMap.create(4, 1, name="q") as mp:
        a = Assembler()
        a.stw(FP, -4, 0).mov(R2, FP).add(R2, -4).ld_map_fd(R1, mp).call("map_lookup_elem")
        a.jeq(R0, 0, "none").ldxw(R0, R0, 0).exit().label("none").ret(0)
        with Program.load(a.assemble(), maps=[mp]) as prog:
            assert prog.info().map_ids == (mp.info().id,)
            for value in (3, 7, 0xFFFF):
                mp[0] = struct.pack("=I", value)
                assert prog.run(bytes(20)) == value


def test_helpers_see_the_cpu_the_caller_runs_on() -> None:
    with Program.load(Assembler().call("get_smp_processor_id").exit().assemble()) as prog:
        before = os.sched_getaffinity(0)
        try:
            for cpu in sorted(before):
                os.sched_setaffinity(0, {cpu})
                assert prog.run(bytes(20)) == cpu
        finally:
            os.sched_setaffinity(0, before)


def test_views_put_the_packet_at_offset_zero() -> None:
    # r0 = the first byte of the data the program sees
    code = Assembler().mov(R6, R1).ld_abs("b", 0).exit().assemble()
    with Program.load(code) as prog:
        assert prog.run(b"\x45" + bytes(19)) == 0x45
        assert prog.run(b"\x60" + bytes(3)) == 0x60  # short: a neutral ethertype is used
        assert prog.run(b"\x02" + bytes(13), tap=True) == 0x02
        assert len(tap_view(b"x" * 14)) == 28 and len(tun_view(b"y")) == 15
        with pytest.raises(InvalidArgumentError):
            prog.test_run(b"short")


def test_syscall_numbers_are_per_architecture() -> None:
    from mqtun import _uapi
    from mqtun.errors import MqtunError

    assert _uapi.syscall_number("bpf", "x86_64") == 321
    assert _uapi.syscall_number("bpf", "aarch64") == 280
    assert _uapi.syscall_number("pidfd_getfd", "aarch64") == 438
    with pytest.raises(MqtunError, match="does not know the number of the bpf syscall on s390x"):
        _uapi.syscall_number("bpf", "s390x")
