"""Every built-in program against its model, on synthetic packets run in the kernel
(BPF_PROG_TEST_RUN): the full 32-bit return value must agree, for TUN and TAP views."""

from __future__ import annotations

import os
import random
import socket
import struct
from collections.abc import Iterator

import pytest
from hypothesis import given
from test_steer_packets import ether, ipv4, l4_header, packets, random_packet

from mqtun import _uapi as u
from mqtun.errors import InvalidArgumentError
from mqtun.steer import programs
from mqtun.steer.model import RSS_DEFAULT_KEY
from mqtun.steer.programs import SteeringProgram

FUZZ_PACKETS = 5000  # per program and view, on top of hypothesis' examples


@pytest.fixture(scope="module")
def loaded() -> Iterator[dict[tuple[str, bool], SteeringProgram]]:
    progs: dict[tuple[str, bool], SteeringProgram] = {}
    for tap in (False, True):
        progs["symmetric", tap] = programs.symmetric(tap)
        progs["rss", tap] = programs.rss(4, tap=tap)
        progs["rss-l3", tap] = programs.rss(table=list(range(16)), l4=False, tap=tap)
        progs["fixed", tap] = programs.fixed(3 if tap else 2)
    yield progs
    for prog in progs.values():
        prog.close()


KINDS = ["symmetric", "rss", "rss-l3", "fixed"]


@pytest.mark.parametrize("tap", [False, True], ids=["tun", "tap"])
@pytest.mark.parametrize("kind", KINDS)
def test_program_equals_model_on_fuzzed_packets(loaded, kind: str, tap: bool) -> None:  # type: ignore[no-untyped-def]
    prog = loaded[kind, tap]
    rnd = random.Random(f"{kind}-{tap}")
    mismatches = []
    for _ in range(FUZZ_PACKETS):
        pkt = random_packet(rnd, tap)
        got, want = prog.run(pkt), prog.model.ret(pkt)
        if got != want:
            mismatches.append((pkt.hex(), got, want))
    assert not mismatches[:5], f"{len(mismatches)} of {FUZZ_PACKETS} disagree"


@pytest.mark.parametrize("tap", [False, True], ids=["tun", "tap"])
@pytest.mark.parametrize("kind", KINDS)
def test_program_equals_model_on_hypothesis_packets(loaded, kind: str, tap: bool) -> None:  # type: ignore[no-untyped-def]
    prog = loaded[kind, tap]

    @given(pkt=packets(tap))
    def check(pkt: bytes) -> None:
        assert prog.run(pkt) == prog.model.ret(pkt), pkt.hex()

    check()


def test_programs_fit_comfortably_in_the_verifier(loaded) -> None:  # type: ignore[no-untyped-def]
    for prog in loaded.values():
        assert prog.program.insn_count < 1000
        assert prog.info().type == u.BPF_PROG_TYPE_SOCKET_FILTER


def test_rss_table_rewrite_takes_effect_without_reload() -> None:
    a, b = socket.inet_aton("198.18.0.1"), socket.inet_aton("198.18.0.2")
    pkts = [ipv4(a, b, u.IPPROTO_UDP, l4_header(17, sp, 53)) for sp in range(20000, 20400)]
    with programs.rss(4) as prog:
        prog_id = prog.info().id
        before = [prog.run(p) for p in pkts]
        assert before == [prog.model.ret(p) for p in pkts]
        table = prog.table
        table[::2] = [3] * 64  # every even slot to queue 3
        changed = prog.set_table(table)
        assert changed == [i for i in range(0, 128, 2) if i % 4 != 3]
        assert prog.read_table() == table
        after = [prog.run(p) for p in pkts]
        assert after == [prog.model.ret(p) for p in pkts]
        for p, old, new in zip(pkts, before, after, strict=True):
            slot = prog.model.hash(p) & 127  # type: ignore[operator]
            assert new == (3 if slot % 2 == 0 else old)
        prog.set_key(bytes(range(40)))
        assert [prog.run(p) for p in pkts] == [prog.model.ret(p) for p in pkts]
        assert prog.info().id == prog_id  # same program all along
        with pytest.raises(InvalidArgumentError, match="slots"):
            prog.set_table([0] * 3)
        with pytest.raises(InvalidArgumentError, match="queue"):
            prog.set_table([70000] * 128)


def test_rss_key_and_table_arguments() -> None:
    with pytest.raises(InvalidArgumentError, match="power of two"):
        programs.rss(table=[0, 1, 2])
    with pytest.raises(InvalidArgumentError, match="queues"):
        programs.rss()
    with programs.rss(2, key=RSS_DEFAULT_KEY, table_size=8) as prog:
        assert prog.table == [0, 1] * 4 and prog.key == RSS_DEFAULT_KEY


def test_by_cpu_returns_the_running_cpu_or_its_table_entry() -> None:
    cpus = sorted(os.sched_getaffinity(0))
    pkt = ether(b"\x45" + bytes(39), u.ETH_P_IP)
    with programs.by_cpu() as plain, programs.by_cpu([7, 5, 3]) as mapped:
        for cpu in cpus:
            assert plain.run(pkt, cpu=cpu) == cpu == plain.model.ret(pkt, cpu)
            assert mapped.run(pkt, cpu=cpu) == [7, 5, 3][cpu % 3] == mapped.model.ret(pkt, cpu)
        mapped.set_table([1, 1, 1])
        assert {mapped.run(pkt, cpu=c) for c in cpus} == {1}
    assert os.sched_getaffinity(0) == set(cpus)  # pinning is undone


def test_fixed_queue_is_kept_to_16_bits_by_the_kernel() -> None:
    with programs.fixed(0xFFFF) as prog:
        assert prog.run(b"\x45" + bytes(19)) == 0xFFFF
        assert prog.queue_for(b"", 4) == 0xFFFF % 4
    with pytest.raises(InvalidArgumentError):
        programs.fixed(0x10000)


def test_symmetric_program_puts_both_directions_together() -> None:
    a, b = socket.inet_aton("198.18.0.1"), socket.inet_aton("198.18.0.2")
    with programs.symmetric() as prog:
        for sp in range(1000, 1100):
            there = ipv4(a, b, u.IPPROTO_TCP, l4_header(6, sp, 443))
            back = ipv4(b, a, u.IPPROTO_TCP, l4_header(6, 443, sp))
            assert prog.run(there) == prog.run(back)
        assert struct.pack("=I", prog.run(there)) != struct.pack("=I", 0)
