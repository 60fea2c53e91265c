"""Reuseport steering for tunnels: send each datagram to the socket of the worker whose device
queue carries its inner flow, from the first packet on.

A BPF_PROG_TYPE_SOCKET_FILTER program attached to a reuseport group (SO_ATTACH_REUSEPORT_EBPF)
returns the index of the socket that gets the datagram; the kernel runs it with the data
starting just after the UDP header (net/core/sock_reuseport.c: run_bpf_filter pulls it), so a
VXLAN datagram's inner Ethernet frame is at offset 8. An index >= the group's size makes the
kernel fall back to its hash.

`inner_symmetric(queues, header_len)` is the built-in symmetric flow hash
(`programs.build_symmetric`, the very same instructions) moved by `header_len` bytes, its
result reduced as the tun driver reduces a steering program's: ``(u16)hash % queues``. With
`programs.symmetric(tap=True)` on the TAP, a flow's frames leave on queue i and its datagrams
arrive on socket i, both ways, whoever sends first: socket i is the i-th bound to the group and
worker i owns both. `queue_for(datagram, queues)` is the pure model of that choice.
"""

from __future__ import annotations

import dataclasses
import socket

from mqtun import _uapi as u
from mqtun.errors import InvalidArgumentError, kernel_error
from mqtun.steer import model as m
from mqtun.steer.asm import R0, R2, Assembler
from mqtun.steer.bpf import Program
from mqtun.steer.programs import build_symmetric

__all__ = ["attach", "detach", "inner_symmetric", "inner_symmetric_code", "queue_for", "rebase"]


def rebase(program: Assembler, base: int, *, finish: Assembler | None = None) -> Assembler:
    """`program` reading packet bytes `base` bytes further on: an ``r2 += base`` before every
    bpf_skb_load_bytes call (r2 holds the offset then). With `finish`, every exit jumps to its
    instructions instead (r0 holds the program's result there)."""
    out = Assembler()
    labels: dict[int, list[str]] = {i: [] for i in range(len(program._insns) + 1)}
    for name, index in program._labels.items():
        labels[index].append(name)
    load_bytes = u.BPF_JMP | u.BPF_CALL
    exit_code = u.BPF_JMP | u.BPF_EXIT
    for i, insn in enumerate(program._insns):
        for name in labels[i]:
            out.label(name)
        if insn.code == load_bytes and insn.imm == u.BPF_FUNC_skb_load_bytes and base:
            out.add(R2, base)
        if insn.code == exit_code and finish is not None:
            out.ja("__finish")
            continue
        out.emit(dataclasses.replace(insn))
    for name in labels[len(program._insns)]:
        out.label(name)
    if finish is not None:
        out.label("__finish")
        for insn in finish._insns:
            out.emit(dataclasses.replace(insn))
    return out


def _check(queues: int) -> None:
    if not isinstance(queues, int) or not 1 <= queues <= u.MAX_QUEUES:
        raise InvalidArgumentError(f"a reuseport group of 1..{u.MAX_QUEUES} sockets, "
                                   f"not {queues!r}", op="steer")


def inner_symmetric_code(queues: int, header_len: int = u.VXLAN_HLEN) -> bytes:
    """The program's code: symmetric hash of the Ethernet frame at `header_len`, then
    ``(hash & 0xFFFF) % queues``."""
    _check(queues)
    tail = Assembler().and32(R0, 0xFFFF).mod32(R0, queues).exit()
    return rebase(build_symmetric(tap=True), header_len, finish=tail).assemble()


def inner_symmetric(queues: int, header_len: int = u.VXLAN_HLEN) -> Program:
    """Load the program for a group of `queues` sockets."""
    return Program.load(inner_symmetric_code(queues, header_len), name="mqtun_rport")


def queue_for(datagram: bytes, queues: int, header_len: int = u.VXLAN_HLEN) -> int:
    """The socket index the program picks for a UDP payload (the model; no kernel)."""
    _check(queues)
    return (m.symmetric_hash(bytes(datagram[header_len:]), tap=True) & 0xFFFF) % queues


def attach(sock: socket.socket, program: Program) -> None:
    """SO_ATTACH_REUSEPORT_EBPF: steer the whole group `sock` belongs to with `program`."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, u.SO_ATTACH_REUSEPORT_EBPF, program.fileno())
    except OSError as exc:
        raise kernel_error(exc, "attach_reuseport_ebpf") from None


def detach(sock: socket.socket) -> None:
    """Back to the kernel's hash for the group."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, u.SO_DETACH_REUSEPORT_BPF, 0)
    except OSError as exc:
        raise kernel_error(exc, "detach_reuseport_bpf") from None
