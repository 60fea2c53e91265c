"""Steering: choose the queue of each packet with eBPF programs built from Python.

No compiler: programs are assembled in Python (`mqtun.steer.asm`), loaded with bpf(2)
(`mqtun.steer.bpf`), and each built-in program (`mqtun.steer.programs`) comes with a pure
model that predicts its queue (`mqtun.steer.model`). Filters live in `mqtun.steer.filters`.

    from mqtun import Device
    from mqtun.steer import programs

    dev = Device.create("mq%d", queues=4)
    prog = programs.symmetric()              # or rss(queues=4), by_cpu(), fixed(0)
    dev.set_steering_program(prog)           # replaces any previous program atomically
    prog.queue_for(packet, 4)                # where the kernel puts `packet`
    dev.set_steering_program(None)           # back to the kernel's flow-table default
"""

from mqtun.steer.asm import AsmError, Assembler, ClassicAssembler, ClassicProgram
from mqtun.steer.bpf import ArrayMap, BpfError, Program, VerifierError
from mqtun.steer.filters import FilterProgram, TxFilterModel, ebpf_filter, pack_tx_filter
from mqtun.steer.model import KernelDefault, kernel_queue, parse_flow, toeplitz_hash
from mqtun.steer.programs import (
    ByCpuProgram,
    FixedProgram,
    RssProgram,
    SteeringProgram,
    SymmetricProgram,
    by_cpu,
    even_table,
    fixed,
    rss,
    symmetric,
)

__all__ = [
    "ArrayMap",
    "AsmError",
    "Assembler",
    "BpfError",
    "ByCpuProgram",
    "ClassicAssembler",
    "ClassicProgram",
    "FilterProgram",
    "FixedProgram",
    "KernelDefault",
    "Program",
    "RssProgram",
    "SteeringProgram",
    "SymmetricProgram",
    "TxFilterModel",
    "VerifierError",
    "by_cpu",
    "ebpf_filter",
    "even_table",
    "fixed",
    "kernel_queue",
    "pack_tx_filter",
    "parse_flow",
    "rss",
    "symmetric",
    "toeplitz_hash",
]
