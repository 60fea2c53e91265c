"""steer.reuseport: the inner-flow reuseport program, run by the kernel (BPF_PROG_TEST_RUN)
against its model, and the model against the TAP's symmetric steering program: the two pick
the same index for a flow, which is what keeps a tunnel flow on one worker both ways."""

from __future__ import annotations

import warnings
from collections.abc import Iterator

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mqtun.packet import vxlan
from mqtun.steer import reuseport
from mqtun.steer.bpf import Program
from mqtun.steer.model import SymmetricModel

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    from scapy.layers.inet import IP, TCP, UDP
    from scapy.layers.inet6 import IPv6
    from scapy.layers.l2 import ARP, Dot1Q, Ether
    from scapy.packet import Raw

_v4 = st.tuples(st.integers(0, 255), st.integers(0, 255)).map(lambda t: f"198.19.{t[0]}.{t[1]}")
_v6 = st.integers(1, 0xFFFF).map(lambda n: f"fd00:19::{n:x}")


@st.composite
def inner_frames(draw: st.DrawFn) -> bytes:
    kind = draw(st.sampled_from(["tcp4", "udp4", "tcp6", "udp6", "arp", "vlan"]))
    eth = Ether(src="02:00:00:00:00:0a", dst="02:00:00:00:00:0b")
    if kind == "arp":
        return bytes(eth / ARP(psrc=draw(_v4), pdst=draw(_v4)))
    sport, dport = draw(st.integers(1, 65535)), draw(st.integers(1, 65535))
    six = kind.endswith("6")
    ip = IPv6(src=draw(_v6), dst=draw(_v6)) if six else IP(src=draw(_v4), dst=draw(_v4))
    l4 = TCP(sport=sport, dport=dport) if kind.startswith("tcp") else UDP(sport=sport,
                                                                          dport=dport)
    if kind == "vlan":
        return bytes(eth / Dot1Q(vlan=5) / IP(src=draw(_v4), dst=draw(_v4))
                     / UDP(sport=sport, dport=dport))
    return bytes(eth / ip / l4 / Raw(b"p" * draw(st.integers(0, 40))))


@pytest.fixture(scope="module")
def loaded() -> Iterator[dict[int, Program]]:
    progs = {n: reuseport.inner_symmetric(n) for n in (1, 2, 3, 4)}
    yield progs
    for p in progs.values():
        p.close()


@given(inner_frames(), st.integers(0, 0xFFFFFF))
def test_kernel_runs_the_model(loaded: dict[int, Program], frame: bytes,
                               vni: int) -> None:
    datagram = vxlan.encapsulate(frame, vni)
    for n, prog in loaded.items():
        assert prog.run(datagram) == reuseport.queue_for(datagram, n)


@given(inner_frames())
def test_same_index_as_the_tap_steering_program(frame: bytes) -> None:
    tap = SymmetricModel(tap=True)  # the model of programs.symmetric(tap=True)
    for n in (1, 2, 3, 4, 7):
        assert reuseport.queue_for(vxlan.encapsulate(frame, 1), n) == tap.queue_for(frame, n)


def test_both_directions_of_a_flow_agree() -> None:
    a = bytes(Ether() / IP(src="198.19.0.1", dst="198.19.0.2") / TCP(sport=1000, dport=80))
    b = bytes(Ether() / IP(src="198.19.0.2", dst="198.19.0.1") / TCP(sport=80, dport=1000))
    for n in (2, 3, 4):
        assert reuseport.queue_for(vxlan.encapsulate(a, 1), n) == \
            reuseport.queue_for(vxlan.encapsulate(b, 1), n)


def test_bad_group_size() -> None:
    from mqtun.errors import InvalidArgumentError

    with pytest.raises(InvalidArgumentError):
        reuseport.inner_symmetric_code(0)
