"""`mqtun bench`: how fast is a forwarder between two namespaces, next to the kernel, to C and
to python-pytun, and what does each packet cost it?

Topology (`mqtun.apps.topology`): namespaces A and B joined by a forwarder in namespace F.
Configurations, all in one run so that the ratios compare like with like (`DESCRIPTIONS`):

    veth                  a veth pair from A to B: the kernel-only ceiling (no F)
    mqtun-1q, mqtun-2q    `mqtun forward --queues N` (offloads on: the default)
    c-1q, c-2q            the minimal C forwarder (read/write, a thread per queue pair) with
                          the same virtio-net header and offloads: built here with `cc`
    mqtun-1q-nooff, ...   `mqtun forward --no-offload`; c-1q-nooff the C one without offloads
    pytun-1q, pytun-2q    python-pytun, one process per queue, select/read/write
    compat-1q, compat-2q  that python-pytun program, unchanged, on `mqtun.compat.pytun`
    mqtun-1q-coalesce     `mqtun forward --coalesce`: each drain's segments joined on write
    mqtun-1q-nocoalesce   `mqtun forward --no-coalesce`: every buffer written as read
    mqtun-1q-epoll        `mqtun forward --mode epoll`: no spinning (the spin policy's baseline)
    mqtun-1q-handler      `mqtun forward --handler` with a pass-through handler: the handler
                          sees wire packets (super-packets split, then coalesced on write)
    mqtun-1q-handler-nocoalesce  the same handler, `--no-coalesce`
    mqtun-1q-batch        the same with `--handler-batch`: a list of packets per drain

Workloads, each measured with a standard tool in A (client) and B (server):

    tcp1, tcp4   TCP stream, 1 and 4 flows (iperf3 -P): bit/s received
    rr1, rr8     TCP request/response of 64 bytes, 1 and 8 connections (sockperf ping-pong
                 --tcp --full-rtt, one client per connection): transactions/s summed, and the
                 round trip's p50/p99 (the median over the clients of each client's percentile)
    rr1k         the same, 1 connection paced at 1,000 transactions/s (sockperf --mps): sparse
                 traffic, where the forwarder's CPU is what waiting costs (a spin that does not
                 pay shows here)
    udp16        UDP 64-byte datagrams from 16 flows (sockperf throughput to 16 ports):
                 datagrams/s delivered to B's sockets (B's Udp InDatagrams), the loss against
                 what A sent (OutDatagrams), and where it was lost: before the forwarder (A's
                 device queue), in it (read from A's device, never reaching B's UDP), after
                 it (reaching B's UDP, not delivered to B's sockets: a full socket buffer)

Per run also the forwarder's CPU (utime + stime of every process in F: % of one core, CPU
microseconds per packet it wrote -- the kernel's rx counters of both devices -- and bit/s,
packets or transactions per forwarder CPU-second) and the machine's (/proc/stat, % of all cores,
and the steal: the share of the cores' time a hypervisor gave to other guests, a VM's noise).

Repeats are interleaved (config after config, then again), so a noisy moment hits all alike;
the report gives medians with min-max, ratios to a baseline of the same run and the targets of
the performance issue as met or missed. What cannot run here (no python-pytun, no compiler, no
matplotlib, no iperf3 or sockperf) is skipped with a one-line note, never a crash. Nothing here
prints: progress and notes go to a callback; the CLI writes the files and prints the table.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.resources
import json
import os
import re
import shutil
import statistics
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from mqtun.apps.topology import (
    B_IP,
    PACKAGES,
    ForwarderSpec,
    LinkCounters,
    Topology,
    check_lab,
    cpu_seconds,
    lab_errors,
    udp_counters,
)
from mqtun.errors import InvalidArgumentError, MqtunError
from mqtun.netns import NetNamespace

__all__ = ["CONFIGS", "DEFAULT_MAX_STEAL", "DEFAULT_REPEAT", "DESCRIPTIONS", "SPARSE_RATE",
           "STEAL_RETRIES", "WORKLOADS",
           "BenchResult", "Sample", "Target", "baseline", "build_c_forwarder", "feed_files",
           "measure", "parse_ping_pong", "plan", "render_markdown", "run_bench", "targets",
           "write_chart", "write_report"]

CONFIGS: dict[str, ForwarderSpec] = {
    "veth": ForwarderSpec("veth"),
    "mqtun-1q": ForwarderSpec("mqtun", 1, offload=True),
    "c-1q": ForwarderSpec("c", 1, offload=True),
    "mqtun-2q": ForwarderSpec("mqtun", 2, offload=True),
    "c-2q": ForwarderSpec("c", 2, offload=True),
    "mqtun-1q-nooff": ForwarderSpec("mqtun", 1, offload=False),
    "pytun-1q": ForwarderSpec("pytun", 1, offload=False),
    "c-1q-nooff": ForwarderSpec("c", 1, offload=False),
    "mqtun-2q-nooff": ForwarderSpec("mqtun", 2, offload=False),
    "pytun-2q": ForwarderSpec("pytun", 2, offload=False),
    "compat-1q": ForwarderSpec("pytun", 1, offload=False, compat=True),
    "compat-2q": ForwarderSpec("pytun", 2, offload=False, compat=True),
    "mqtun-1q-coalesce": ForwarderSpec("mqtun", 1, offload=True, coalesce=True),
    "mqtun-1q-nocoalesce": ForwarderSpec("mqtun", 1, offload=True, coalesce=False),
    "mqtun-1q-epoll": ForwarderSpec("mqtun", 1, offload=True, mode="epoll"),
    "mqtun-1q-handler": ForwarderSpec("mqtun", 1, offload=True,
                                      handler="mqtun.apps.handlers:identity"),
    "mqtun-1q-handler-nocoalesce": ForwarderSpec("mqtun", 1, offload=True, coalesce=False,
                                                 handler="mqtun.apps.handlers:identity"),
    "mqtun-1q-batch": ForwarderSpec("mqtun", 1, offload=True,
                                    handler="mqtun.apps.handlers:identity_batch",
                                    handler_batch=True),
}
DESCRIPTIONS = {
    "veth": "veth pair A-B, no userspace: the kernel's ceiling",
    "mqtun-1q": "mqtun forward, 1 queue, offloads on (the default)",
    "c-1q": "C read/write forwarder, 1 queue, the same offloads",
    "mqtun-2q": "mqtun forward, 2 queues, offloads on",
    "c-2q": "C read/write forwarder, 2 queues (threads), the same offloads",
    "mqtun-1q-nooff": "mqtun forward --no-offload, 1 queue",
    "pytun-1q": "python-pytun select/read/write, 1 queue",
    "c-1q-nooff": "C read/write forwarder, 1 queue, no offloads",
    "mqtun-2q-nooff": "mqtun forward --no-offload, 2 queues",
    "pytun-2q": "python-pytun select/read/write, 2 queues (processes)",
    "compat-1q": "the python-pytun program on mqtun.compat.pytun, 1 queue",
    "compat-2q": "the python-pytun program on mqtun.compat.pytun, 2 queues",
    "mqtun-1q-coalesce": "mqtun forward --coalesce, 1 queue: each drain joined into TSO/USO "
                         "(the default where the C loop is built)",
    "mqtun-1q-nocoalesce": "mqtun forward --no-coalesce, 1 queue: every buffer written as read",
    "mqtun-1q-epoll": "mqtun forward --mode epoll, 1 queue: sleeps at once, never spins",
    "mqtun-1q-handler": "mqtun forward with a pass-through handler (wire packets: split, "
                        "handler, coalesce), 1 queue",
    "mqtun-1q-handler-nocoalesce": "the same handler with --no-coalesce, 1 queue",
    "mqtun-1q-batch": "the same with a batch handler (a list per drain), 1 queue",
}
SHORT_CONFIGS = ("veth", "mqtun-1q", "c-1q", "pytun-1q")
DEFAULT_REPEAT = 5


@dataclass(frozen=True)
class Workload:
    key: str
    title: str
    count_unit: str  # what `Sample.count` counts: bit, trans, pkt; values are count_unit/s
    unit: str  # what the table shows: value / scale
    scale: float
    tool: str

    @property
    def value_unit(self) -> str:
        return f"{self.count_unit}/s"


WORKLOADS: dict[str, Workload] = {w.key: w for w in (
    Workload("tcp1", "TCP stream, 1 flow", "bit", "Gbit/s", 1e9, "iperf3"),
    Workload("tcp4", "TCP stream, 4 flows", "bit", "Gbit/s", 1e9, "iperf3"),
    Workload("rr1", "TCP req/resp, 1 conn", "trans", "k trans/s", 1e3, "sockperf"),
    Workload("rr8", "TCP req/resp, 8 conns", "trans", "k trans/s", 1e3, "sockperf"),
    Workload("rr1k", "TCP req/resp, 1 conn at 1k/s", "trans", "k trans/s", 1e3, "sockperf"),
    Workload("udp16", "UDP 64 B, 16 flows", "pkt", "k pkt/s", 1e3, "sockperf"),
)}
IPERF_PORT, RR_PORT, UDP_BASE_PORT, UDP_FLOWS = 5201, 11111, 12000, 16
SPARSE_RATE = 1000  # rr1k: transactions/s
DEFAULT_MAX_STEAL = 10.0  # %: a run whose steal passed this is measured again
STEAL_RETRIES = 2  # at most this many times; the last attempt is kept whatever its steal


@dataclass
class Sample:
    """One measurement: a workload through a configuration, once."""

    config: str
    workload: str
    repeat: int
    value: float  # count / seconds, in the workload's value_unit (bit/s, trans/s, pkt/s)
    count: int  # bits, transactions or packets received in `seconds`
    count_unit: str
    seconds: float
    forwarder_cpu: float  # % of one core
    forwarder_cpu_s: float  # CPU seconds of the forwarder's processes
    machine_cpu: float  # % of all cores
    forwarded: int = 0  # packets the forwarder wrote, both directions (kernel rx counters)
    loss: float | None = None  # udp16 only, 0..1
    sent: int | None = None  # udp16: datagrams A sent
    lost_before: int | None = None  # udp16: not read from A's device (its queue overflowed)
    lost_in: int | None = None  # udp16: read from A's device, not written to B's
    lost_after: int | None = None  # udp16: reached B's UDP, not delivered to B's sockets
    p50_us: float | None = None  # rr*: round trip, median over the clients
    p99_us: float | None = None
    steal: float = 0.0  # % of all cores' time the hypervisor ran others instead
    steal_retries: int = 0  # earlier attempts of this run dropped for their steal

    @property
    def cpu_us_per_packet(self) -> float | None:
        """Forwarder CPU per packet it wrote (None without a forwarder or packets)."""
        if not self.forwarder_cpu_s or not self.forwarded:
            return None
        return self.forwarder_cpu_s / self.forwarded * 1e6

    @property
    def per_core(self) -> float | None:
        """The value per forwarder CPU-second: bit/s, trans/s or pkt/s one busy core gives."""
        return self.value / (self.forwarder_cpu / 100) if self.forwarder_cpu > 0 else None


@dataclass
class BenchResult:
    configs: list[str]
    workloads: list[str]
    seconds: float
    repeat: int
    samples: list[Sample] = field(default_factory=list)
    started: float = field(default_factory=time.time)
    machine: dict[str, str] = field(default_factory=dict)
    skipped: list[str] = field(default_factory=list)  # one line per thing not run, and why

    def runs(self, config: str, workload: str) -> list[Sample]:
        return [s for s in self.samples if s.config == config and s.workload == workload]

    def median(self, config: str, workload: str, attr: str = "value") -> float | None:
        vals = [getattr(s, attr) for s in self.runs(config, workload)]
        vals = [v for v in vals if v is not None]
        return statistics.median(vals) if vals else None

    def spread(self, config: str, workload: str,
               attr: str = "value") -> tuple[float, float] | None:
        vals = [v for s in self.runs(config, workload) if (v := getattr(s, attr)) is not None]
        return (min(vals), max(vals)) if vals else None

    def ratio(self, config: str, base: str, workload: str, attr: str = "value") -> float | None:
        """Median over median of two configurations of this run (None if either is missing)."""
        a, b = self.median(config, workload, attr), self.median(base, workload, attr)
        return a / b if a is not None and b else None


def parse_names(spec: str | None, known: Sequence[str], what: str) -> list[str]:
    """A comma-separated subset of `known`, in the order given (all when `spec` is None)."""
    if not spec:
        return list(known)
    names = [n.strip() for n in spec.split(",") if n.strip()]
    bad = [n for n in names if n not in known]
    if bad or not names:
        raise InvalidArgumentError(f"unknown {what} {bad[0] if bad else spec!r}: choose from "
                                   f"{', '.join(known)}")
    return names


# ---- what can run here ------------------------------------------------------------------------
def _have_module(name: str) -> bool:
    try:
        __import__(name)
    except ImportError:
        return False
    return True


def compiler() -> str:
    """The C compiler the C baseline is built with: $CC, else cc."""
    return os.environ.get("CC") or "cc"


def plan(configs: Sequence[str], workloads: Sequence[str]) -> tuple[list[str], list[str],
                                                                    list[str]]:
    """(configs, workloads, notes): what can run here, and one line for each thing that cannot
    and why. Refuses (one line) when nothing is left, or without root or iproute2."""
    check_lab("bench")
    notes: list[str] = []
    if not shutil.which("ss"):
        raise MqtunError(2, "mqtun bench needs iproute2's `ss` (Debian: apt-get install "
                         "iproute2)", op="bench")
    run_wl = list(workloads)
    for tool in ("iperf3", "sockperf"):
        gone = [w for w in run_wl if WORKLOADS[w].tool == tool]
        if gone and not shutil.which(tool):
            run_wl = [w for w in run_wl if w not in gone]
            notes.append(f"skipped {', '.join(gone)}: `{tool}` is not on PATH (Debian: "
                         f"apt-get install {PACKAGES[tool]})")
    run_cf = list(configs)
    pytun = [c for c in run_cf if CONFIGS[c].kind == "pytun" and not CONFIGS[c].compat]
    if pytun and not _have_module("pytun"):
        run_cf = [c for c in run_cf if c not in pytun]
        notes.append(f"skipped {', '.join(pytun)}: python-pytun is not installed (pip install "
                     "python-pytun)")
    c_configs = [c for c in run_cf if CONFIGS[c].kind == "c"]
    if c_configs and not shutil.which(compiler()):
        run_cf = [c for c in run_cf if c not in c_configs]
        notes.append(f"skipped {', '.join(c_configs)}: no C compiler (`{compiler()}`) to build "
                     "the C baseline (Debian: apt-get install gcc)")
    if not _have_module("matplotlib"):
        notes.append("skipped chart.png: matplotlib is not installed (pip install matplotlib, "
                     "or mqtun[bench])")
    if not run_cf or not run_wl:
        raise MqtunError(2, "mqtun bench: nothing left to run: " + "; ".join(notes), op="bench")
    return run_cf, run_wl, notes


def build_c_forwarder(directory: Path) -> tuple[Path | None, str | None]:
    """Compile c_forward.c (package data) into `directory`: (binary, None) or (None, why not)."""
    source = importlib.resources.files("mqtun.apps").joinpath("c_forward.c")
    src = directory / "c_forward.c"
    src.write_text(source.read_text())
    binary = directory / "c_forward"
    try:
        proc = subprocess.run([compiler(), "-O2", "-pthread", "-o", str(binary), str(src)],
                              capture_output=True, text=True, timeout=120)
    except (OSError, subprocess.SubprocessError) as exc:
        return None, f"`{compiler()}` did not run: {exc}"
    if proc.returncode != 0:
        err = (proc.stderr.strip().splitlines() or ["?"])[0]
        return None, f"`{compiler()}` could not build c_forward.c: {err}"
    return binary, None


# ---- running ----------------------------------------------------------------------------------
def run_bench(configs: Sequence[str], workloads: Sequence[str], *, seconds: float = 3.0,
              repeat: int = DEFAULT_REPEAT, tool_cpus: str | None = None,
              max_steal: float = DEFAULT_MAX_STEAL,
              progress: Callable[[str], None] = lambda _line: None) -> BenchResult:
    """Every workload through every configuration that can run here, `repeat` times,
    interleaved. Notes on what was skipped go to `progress` first and into the result.

    A run during which the hypervisor took more than `max_steal` % of the cores (a VM on a
    busy host) is measured again at once, at most STEAL_RETRIES times: such a run measures
    the host, not the forwarder. `max_steal=100` keeps every run."""
    configs, workloads, notes = plan(configs, workloads)
    with lab_errors("bench"), tempfile.TemporaryDirectory(prefix="mqtun-bench-") as tmp:
        specs = {c: CONFIGS[c] for c in configs}
        if any(s.kind == "c" for s in specs.values()):
            binary, why = build_c_forwarder(Path(tmp))
            if binary is None:
                gone = [c for c, s in specs.items() if s.kind == "c"]
                notes.append(f"skipped {', '.join(gone)}: {why}")
                specs = {c: s for c, s in specs.items() if c not in gone}
            else:
                specs = {c: dataclasses.replace(s, program=str(binary)) if s.kind == "c" else s
                         for c, s in specs.items()}
        if not specs:
            raise MqtunError(2, "mqtun bench: nothing left to run: " + "; ".join(notes),
                             op="bench")
        for note in notes:
            progress(f"mqtun bench: {note}")
        result = BenchResult(list(specs), list(workloads), seconds, repeat, skipped=notes,
                             machine={"cpus": str(os.cpu_count()),
                                      "kernel": os.uname().release,
                                      "loadavg_start": _loadavg(),
                                      "tool_cpus": tool_cpus or "any",
                                      "max_steal_pct": f"{max_steal:g}"})
        feeds = feed_files(Path(tmp))
        clock = _Progress(repeat * len(specs) * len(workloads))
        for rep in range(repeat):
            for name, spec in specs.items():
                with Topology(spec) as topo:
                    for wl in workloads:
                        s = measure(topo, name, wl, rep, seconds, feeds, tool_cpus)
                        while s.steal > max_steal and s.steal_retries < STEAL_RETRIES:
                            progress(f"(again) [{rep + 1}/{repeat}] {name:14} {wl:5} "
                                     f"{_describe(s)} > {max_steal:g}%: measured again")
                            retries = s.steal_retries + 1
                            s = measure(topo, name, wl, rep, seconds, feeds, tool_cpus)
                            s.steal_retries = retries
                        result.samples.append(s)
                        progress(f"{clock.step()} [{rep + 1}/{repeat}] {name:14} {wl:5} "
                                 f"{_describe(s)}")
    result.machine["loadavg_end"] = _loadavg()
    return result


class _Progress:
    """`[ 12/250] ~14 min left`: steps done and the time the rest takes at the pace so far."""

    def __init__(self, total: int) -> None:
        self.total, self.done, self.t0 = total, 0, time.monotonic()

    def step(self) -> str:
        self.done += 1
        left = (time.monotonic() - self.t0) / self.done * (self.total - self.done)
        when = f"{left / 60:.0f} min" if left >= 90 else f"{left:.0f} s"
        width = len(str(self.total))
        return f"[{self.done:{width}}/{self.total}] ~{when} left"


def _describe(s: Sample) -> str:
    """One progress line's figures."""
    w = WORKLOADS[s.workload]
    text = f"{_fmt(s.value / w.scale)} {w.unit}"
    if s.loss is not None:
        text += f" (loss {s.loss:.1%})"
    if s.p50_us is not None and s.p99_us is not None:
        text += f" p50/p99 {s.p50_us:.0f}/{s.p99_us:.0f} us"
    text += f"  fwd cpu {s.forwarder_cpu:.0f}%"
    if s.cpu_us_per_packet is not None:
        text += f" {s.cpu_us_per_packet:.2f} us/pkt"
    return text + f"  machine {s.machine_cpu:.0f}%" + _steal(s.steal)


def _steal(pct: float | None) -> str:
    """", steal 6%" where a hypervisor took a visible share of the run (nothing where not)."""
    return f", steal {pct:.0f}%" if pct is not None and pct >= 0.5 else ""


def _loadavg() -> str:
    """The 1, 5 and 15-minute load averages: how busy the machine was apart from us."""
    with open("/proc/loadavg") as f:
        return " ".join(f.read().split()[:3])


def feed_files(d: Path) -> dict[str, str]:
    """sockperf's feed files (which server addresses and ports) in directory `d`."""
    tcp, udp = d / "tcp.feed", d / "udp.feed"
    tcp.write_text(f"T:{B_IP}:{RR_PORT}\n")
    udp.write_text("".join(f"U:{B_IP}:{UDP_BASE_PORT + i}\n" for i in range(UDP_FLOWS)))
    return {"tcp": str(tcp), "udp": str(udp)}


def _machine_busy() -> tuple[int, int, int]:
    """(busy, total, steal) jiffies of all CPUs from /proc/stat (busy includes the steal)."""
    with open("/proc/stat") as f:
        vals = [int(x) for x in f.readline().split()[1:]]
    idle = vals[3] + (vals[4] if len(vals) > 4 else 0)  # idle + iowait
    total = sum(vals[:8])  # guest time is already in user
    return total - idle, total, vals[7] if len(vals) > 7 else 0


@contextlib.contextmanager
def _server(ns: NetNamespace, argv: list[str], proto: str, ports: Sequence[int],
            timeout: float = 10.0) -> Iterator[None]:
    """A server in `ns`, ready (listening on every port) when the body starts; killed after."""
    proc = ns.popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                    stdin=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + timeout
        flag = "-ltnH" if proto == "tcp" else "-lunH"
        while True:
            out = ns.run(["ss", flag], check=False, timeout=5).stdout
            listening = {int(m) for m in re.findall(r":(\d+)\s", out)}
            if all(p in listening for p in ports):
                break
            if proc.poll() is not None or time.monotonic() > deadline:
                raise MqtunError(5, f"{argv[0]} server did not start in {ns.name}",
                                 op="bench")
            time.sleep(0.05)
        yield
    finally:
        if proc.poll() is None:
            proc.kill()
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=5)


class _Pinned(NetNamespace):
    """A namespace whose programs run under `taskset -c CPUS` (the load tools' pinning)."""

    def __init__(self, ns: NetNamespace, cpus: str | None) -> None:
        super().__init__(ns.name)
        self.cpus = cpus

    def command(self, argv: Sequence[str]) -> list[str]:
        pin = ["taskset", "-c", self.cpus] if self.cpus else []
        return super().command([*pin, *argv])


class _Meter:
    """CPU of the forwarder and of the machine, and the devices' counters, between start() and
    stop() (the client's run, not the servers' start-up)."""

    def __init__(self, topo: Topology) -> None:
        self.topo = topo
        self.pids = topo.forwarder_pids()
        self.forwarder = self.machine = self.cpu_s = self.steal = 0.0
        self.links: tuple[LinkCounters, LinkCounters] | None = None
        self._t0 = 0.0
        self._c0 = 0.0
        self._m0 = (0, 0, 0)
        self._l0: tuple[LinkCounters, LinkCounters] | None = None

    def start(self) -> None:
        self._l0 = self.topo.link_counters()
        self._c0, self._m0, self._t0 = cpu_seconds(self.pids), _machine_busy(), time.monotonic()

    def stop(self) -> None:
        c1, (busy1, total1, steal1), wall = (cpu_seconds(self.pids), _machine_busy(),
                                             time.monotonic() - self._t0)
        a1, b1 = self.topo.link_counters()
        busy0, total0, steal0 = self._m0
        self.cpu_s = c1 - self._c0
        self.forwarder = 100 * self.cpu_s / wall if wall > 0 else 0.0
        if total1 > total0:
            self.machine = 100 * (busy1 - busy0) / (total1 - total0)
            self.steal = 100 * (steal1 - steal0) / (total1 - total0)
        if self._l0 is not None:
            self.links = (a1 - self._l0[0], b1 - self._l0[1])

    @property
    def forwarded(self) -> int:
        """Packets written into A's and B's devices: what the forwarder moved (0 for veth)."""
        if self.links is None or not self.pids:
            return 0
        return self.links[0].rx_packets + self.links[1].rx_packets


@dataclass
class _Figures:
    """What a workload's client measured."""

    count: int
    seconds: float
    loss: float | None = None
    sent: int | None = None
    received: int | None = None
    p50_us: float | None = None
    p99_us: float | None = None
    links: tuple[LinkCounters, LinkCounters] | None = None  # over the same span as sent
    arrived: int | None = None  # udp16: datagrams B's UDP layer took in or dropped


Client = Callable[[_Meter], _Figures]


def measure(topo: Topology, config: str, workload: str, rep: int, seconds: float,
            feeds: dict[str, str], tool_cpus: str | None = None) -> Sample:
    """One run of `workload` through the built topology (feeds: `feed_files()`)."""
    assert topo.a is not None and topo.b is not None
    a, b = _Pinned(topo.a, tool_cpus), _Pinned(topo.b, tool_cpus)
    clients: dict[str, Callable[[], Client]] = {
        "tcp1": lambda: _iperf(a, b, 1, seconds),
        "tcp4": lambda: _iperf(a, b, 4, seconds),
        "rr1": lambda: _rr(a, b, 1, seconds, feeds),
        "rr8": lambda: _rr(a, b, 8, seconds, feeds),
        "rr1k": lambda: _rr(a, b, 1, seconds, feeds, rate=SPARSE_RATE),
        "udp16": lambda: _udp(a, b, seconds, feeds)}
    meter = _Meter(topo)
    fig = clients[workload]()(meter)
    w = WORKLOADS[workload]
    s = Sample(config, workload, rep, fig.count / fig.seconds if fig.seconds else 0.0,
               fig.count, w.count_unit, fig.seconds, meter.forwarder, meter.cpu_s,
               meter.machine, meter.forwarded, fig.loss, p50_us=fig.p50_us, p99_us=fig.p99_us,
               steal=meter.steal)
    if fig.sent is not None and fig.received is not None and fig.links is not None:
        da = fig.links[0]
        s.sent = fig.sent
        # a veth pair counts the same way: A's tx is what left A; what reached B is what B's
        # UDP took in or refused (a USO write, one rx packet of B's device, holds several)
        arrived = fig.received if fig.arrived is None else fig.arrived
        s.lost_before = max(0, fig.sent - da.tx_packets)
        s.lost_in = max(0, da.tx_packets - arrived)
        s.lost_after = max(0, arrived - fig.received)
    return s


def _iperf(a: NetNamespace, b: NetNamespace, flows: int, seconds: float) -> Client:
    def client(meter: _Meter) -> _Figures:
        argv = ["iperf3", "-s", "-1", "-B", B_IP, "-p", str(IPERF_PORT)]
        with _server(b, argv, "tcp", [IPERF_PORT]):
            meter.start()
            out = a.run(["iperf3", "-c", B_IP, "-p", str(IPERF_PORT), "-P", str(flows),
                         "-t", str(max(1, round(seconds))), "-J"],
                        check=False, timeout=seconds + 30)
            meter.stop()
        try:
            end = json.loads(out.stdout)["end"]["sum_received"]
            return _Figures(int(end["bytes"]) * 8, float(end["seconds"]))
        except (ValueError, KeyError, TypeError):
            raise MqtunError(5, f"iperf3 failed: {(out.stdout + out.stderr)[-300:]}",
                             op="bench") from None

    return client


def _sockperf_outputs(procs: list[subprocess.Popen[str]], meter: _Meter,
                      timeout: float) -> list[str]:
    """Wait for sockperf clients (killed after `timeout`), metering from the first one's
    "Starting test" to its "Test end" (it idles about 2 s before it starts)."""

    def kill_all() -> None:
        for p in procs:
            p.kill()

    watchdog = threading.Timer(timeout, kill_all)
    watchdog.start()
    try:
        first: list[str] = []
        assert procs[0].stdout is not None
        for line in procs[0].stdout:
            first.append(line)
            if "Starting test" in line:
                meter.start()
            elif "Test end" in line:
                meter.stop()
        outs = ["".join(first) + procs[0].communicate()[0]]
        outs += [p.communicate()[0] for p in procs[1:]]
    finally:
        watchdog.cancel()
        for p in procs:
            if p.poll() is None:
                p.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                p.wait(5)
    return outs


_PP = re.compile(r"\[Valid Duration\] RunTime=([\d.]+) sec; SentMessages=(\d+); "
                 r"ReceivedMessages=(\d+)")
_PERCENTILE = re.compile(r"percentile (\d+\.\d+) =\s+([\d.]+)")


def parse_ping_pong(text: str) -> tuple[float, int, dict[float, float]]:
    """sockperf ping-pong's report: (run seconds, replies received, {percentile: usec})."""
    m = _PP.search(text)
    if not m:
        raise MqtunError(5, f"sockperf ping-pong failed: {text[-300:]}", op="bench")
    pct = {float(p): float(v) for p, v in _PERCENTILE.findall(text)}
    return float(m.group(1)), int(m.group(3)), pct


def _rr(a: NetNamespace, b: NetNamespace, conns: int, seconds: float,
        feeds: dict[str, str], rate: int | None = None) -> Client:
    def client(meter: _Meter) -> _Figures:
        with _server(b, ["sockperf", "server", "-f", feeds["tcp"], "-F", "e"], "tcp",
                     [RR_PORT]):
            argv = ["sockperf", "ping-pong", "--tcp", "--dontwarmup", "--full-rtt", "-i", B_IP,
                    "-p", str(RR_PORT), "-t", str(max(1, round(seconds))), "-m", "64",
                    *(["--mps", str(rate)] if rate else [])]
            procs = [a.popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                             text=True) for _ in range(conns)]
            outs = _sockperf_outputs(procs, meter, seconds + 30)
        reports = [parse_ping_pong(text) for text in outs]
        took = statistics.mean(r[0] for r in reports)
        p50 = [r[2][50.0] for r in reports if 50.0 in r[2]]
        p99 = [r[2][99.0] for r in reports if 99.0 in r[2]]
        return _Figures(sum(r[1] for r in reports), took,
                        p50_us=statistics.median(p50) if p50 else None,
                        p99_us=statistics.median(p99) if p99 else None)

    return client


_TP = re.compile(r"Total of (\d+) messages sent in ([\d.]+) sec")


def _udp(a: NetNamespace, b: NetNamespace, seconds: float, feeds: dict[str, str]) -> Client:
    def client(meter: _Meter) -> _Figures:
        ports = [UDP_BASE_PORT + i for i in range(UDP_FLOWS)]
        with _server(b, ["sockperf", "server", "-f", feeds["udp"], "-F", "e"], "udp", ports):
            rx0, tx0, links0 = udp_counters(b), udp_counters(a), meter.topo.link_counters()
            proc = a.popen(["sockperf", "throughput", "--dontwarmup", "-f", feeds["udp"],
                            "-F", "e", "-t", str(max(1, round(seconds))), "-m", "64"],
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            out = _sockperf_outputs([proc], meter, seconds + 30)[0]
            time.sleep(0.2)  # what is still in flight arrives
            rx1, tx1, links1 = udp_counters(b), udp_counters(a), meter.topo.link_counters()
        m = _TP.search(out)
        if not m:
            raise MqtunError(5, f"sockperf throughput failed: {out[-300:]}", op="bench")
        received = rx1["InDatagrams"] - rx0["InDatagrams"]
        arrived = sum(rx1[k] - rx0[k] for k in ("InDatagrams", "InErrors", "NoPorts"))
        sent = tx1["OutDatagrams"] - tx0["OutDatagrams"]
        loss = max(0.0, 1 - received / sent) if sent else 0.0
        links = (links1[0] - links0[0], links1[1] - links0[1])
        return _Figures(received, float(m.group(2)), loss, sent, received, links=links,
                        arrived=arrived)

    return client


# ---- reporting --------------------------------------------------------------------------------
def _fmt(v: float | None) -> str:
    if v is None:
        return "-"
    return f"{v:,.0f}" if v >= 100 else f"{v:.2f}" if v < 10 else f"{v:.1f}"


def baseline(config: str, configs: Sequence[str]) -> str | None:
    """What a row is compared with, like for like: mqtun with offloads against the C forwarder
    with the same queues; mqtun without offloads against python-pytun with the same queues;
    mqtun with a handler, coalescing or another loop mode against plain mqtun forward; the
    python-pytun program on mqtun.compat against itself on python-pytun; everything else (and
    those whose partner did not run) against veth."""
    spec = CONFIGS[config]
    partner = None
    if spec.kind == "mqtun" and (spec.handler or spec.coalesce is not None or spec.mode):
        partner = f"mqtun-{spec.queues}q"  # what the handler path, coalescing or mode costs
    elif spec.kind == "mqtun":
        partner = f"c-{spec.queues}q" if spec.offload else f"pytun-{spec.queues}q"
    elif spec.compat:
        partner = f"pytun-{spec.queues}q"  # the face against the library it stands in for
    if partner in configs:
        return partner
    return "veth" if "veth" in configs and config != "veth" else None


@dataclass(frozen=True)
class Target:
    text: str
    measured: float | None
    goal: float

    @property
    def status(self) -> str:
        if self.measured is None:
            return "not run"
        return "met" if self.measured >= self.goal else "missed"

    @property
    def shortfall(self) -> float | None:
        """How far below the goal, 0..1 (None when met or not run)."""
        if self.status != "missed" or self.measured is None:
            return None
        return 1 - self.measured / self.goal


def targets(r: BenchResult) -> list[Target]:
    """The performance issue's goals, as ratios of this run's medians."""
    out = []
    for q in (1, 2):
        m, c = f"mqtun-{q}q", f"c-{q}q"
        for wl, goal, per_cpu in (("udp16", 1.2, True), ("rr8", 1.0, True),
                                  ("rr1", 1.2, False), ("tcp1", 1.0, False)):
            t = WORKLOADS[wl].title
            out.append(Target(f"{t}, {m} / {c} >= {goal}", r.ratio(m, c, wl), goal))
            if per_cpu:
                out.append(Target(f"{t} per forwarder CPU-s, {m} / {c} >= 1.0",
                                  r.ratio(m, c, wl, "per_core"), 1.0))
        out.append(Target(f"TCP stream, 1 flow, {m} / veth >= 0.8", r.ratio(m, "veth", "tcp1"),
                          0.8))
    for q in (1, 2):
        m, p = f"mqtun-{q}q-nooff", f"pytun-{q}q"
        for wl, goal in (("rr1", 2.0), ("rr8", 1.2), ("udp16", 1.2)):
            out.append(Target(f"{WORKLOADS[wl].title}, {m} / {p} >= {goal}",
                              r.ratio(m, p, wl), goal))
    for tail in ("", "-nooff"):
        one, two = f"mqtun-1q{tail}", f"mqtun-2q{tail}"
        for wl in ("tcp4", "rr8", "udp16"):
            out.append(Target(f"{WORKLOADS[wl].title}, {two} / {one} >= 1.0",
                              r.ratio(two, one, wl), 1.0))
    for q in (1, 2):
        compat, pytun = f"compat-{q}q", f"pytun-{q}q"
        for wl in WORKLOADS:
            out.append(Target(f"{WORKLOADS[wl].title}, {compat} / {pytun} >= 1.0",
                              r.ratio(compat, pytun, wl), 1.0))
    # The data-plane issue: a pass-through handler against plain forward, and batch >= per packet.
    for wl, goal in (("tcp1", 0.4), ("udp16", 0.8), ("rr1", 0.8)):
        t = WORKLOADS[wl].title
        out.append(Target(f"{t}, mqtun-1q-handler / mqtun-1q >= {goal}",
                          r.ratio("mqtun-1q-handler", "mqtun-1q", wl), goal))
        out.append(Target(f"{t}, mqtun-1q-batch / mqtun-1q-handler >= 1.0",
                          r.ratio("mqtun-1q-batch", "mqtun-1q-handler", wl), 1.0))
    return out


def _table(head: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    lines = ["| " + " | ".join(head) + " |", "|---" * len(head) + "|"]
    return lines + ["| " + " | ".join(row) + " |" for row in rows]


def _pct(share: float) -> str:
    """A shortfall as a percentage: "6%", and "0.2%" where whole percents would say 0%."""
    return f"{share:.0%}" if share >= 0.01 else f"{share:.1%}"


def _steal_note(r: BenchResult) -> str:
    """How many runs were measured again because a hypervisor took too much of the CPUs."""
    again = sum(s.steal_retries for s in r.samples)
    if not again:
        return ""
    bound = r.machine.get("max_steal_pct", f"{DEFAULT_MAX_STEAL:g}")
    still = sum(1 for s in r.samples if s.steal_retries and s.steal > float(bound))
    return (f" {again} run(s) were measured again because the hypervisor's steal passed "
            f"{bound}% of the cores"
            + (f"; {still} stayed above it and {'was' if still == 1 else 'were'} kept"
               if still else "") + ".")


def render_markdown(r: BenchResult) -> str:
    """The report: speeds with spread and like-for-like ratios; forwarder CPU per packet and
    per core; request/response latency; where UDP was lost; the targets; what was skipped."""
    wls = [WORKLOADS[w] for w in r.workloads]
    load = (f" Load average before/after: {r.machine['loadavg_start']} / "
            f"{r.machine.get('loadavg_end', '?')}." if "loadavg_start" in r.machine else "")
    lines = [f"Medians of {r.repeat} interleaved run(s) of {r.seconds:g} s each; (min-max); "
             "x: ratio to the like-for-like baseline of the same run (mqtun: the C forwarder "
             "with the same queues and offloads; mqtun without offloads: python-pytun with "
             f"the same queues; others: veth).{load}{_steal_note(r)}", ""]
    rows = []
    for c in r.configs:
        cells = [c]
        base = baseline(c, r.configs)
        for w in wls:
            med, sp = r.median(c, w.key), r.spread(c, w.key)
            if med is None or sp is None:
                cells.append("-")
                continue
            cell = f"{_fmt(med / w.scale)} ({_fmt(sp[0] / w.scale)}-{_fmt(sp[1] / w.scale)})"
            ratio = r.ratio(c, base, w.key) if base else None
            if ratio is not None:
                cell += f" {ratio:.2f}x {base}"
            if w.key == "udp16":
                loss = r.median(c, w.key, "loss")
                cell += f", loss {loss:.0%}" if loss is not None else ""
            cells.append(cell)
        rows.append(cells)
    lines += _table(["config", *(f"{w.title} ({w.unit})" for w in wls)], rows)

    lines += ["", "Forwarder CPU, medians: % of one core; CPU microseconds per packet it wrote "
              "(both directions; with offloads a TCP packet, and a coalesced run of UDP "
              "datagrams, is one super-packet); for streams "
              "also Gbit/s per forwarder core. Machine: % of all cores (steal: of their "
              "time, what a hypervisor gave to other guests).", ""]
    rows = []
    for c in r.configs:
        cells = [c]
        for w in wls:
            f, m = r.median(c, w.key, "forwarder_cpu"), r.median(c, w.key, "machine_cpu")
            if f is None or m is None:
                cells.append("-")
                continue
            cell = f"{f:.0f}%"
            us = r.median(c, w.key, "cpu_us_per_packet")
            if us is not None:
                cell += f", {us:.2f} us/pkt"
            per = r.median(c, w.key, "per_core")
            if per is not None and w.count_unit == "bit":
                cell += f", {per / 1e9:.1f} Gbit/s/core"
            cells.append(cell + f" (machine {m:.0f}%{_steal(r.median(c, w.key, 'steal'))})")
        rows.append(cells)
    lines += _table(["config", *(w.title for w in wls)], rows)

    rr = [w for w in wls if w.count_unit == "trans"]
    if rr:
        lines += ["", "Request/response round trip (sockperf --full-rtt), medians: p50 / p99 "
                  "in microseconds.", ""]
        rows = []
        for c in r.configs:
            cells = [c]
            for w in rr:
                p50, p99 = r.median(c, w.key, "p50_us"), r.median(c, w.key, "p99_us")
                cells.append("-" if p50 is None or p99 is None else f"{p50:.0f} / {p99:.0f}")
            rows.append(cells)
        lines += _table(["config", *(w.title for w in rr)], rows)

    if "udp16" in r.workloads:
        lines += ["", "UDP 64 B: where datagrams were lost, medians in % of those sent: before "
                  "the forwarder (A's device queue full), in it (read, never reaching B's UDP), "
                  "after it (reaching B's UDP, not delivered to B's sockets).", ""]
        rows = []
        for c in r.configs:
            runs = [s for s in r.runs(c, "udp16") if s.sent]
            if not runs:
                continue
            parts = []
            for attr in ("lost_before", "lost_in", "lost_after"):
                vals = [getattr(s, attr) / s.sent for s in runs if getattr(s, attr) is not None]
                parts.append(f"{statistics.median(vals):.1%}" if vals else "-")
            loss = r.median(c, "udp16", "loss")
            rows.append([c, "-" if loss is None else f"{loss:.1%}", *parts])
        lines += _table(["config", "lost", "before", "in the forwarder", "after"], rows)

    ts = [t for t in targets(r) if t.status != "not run"]
    if ts:
        lines += ["", "Targets (ratios of medians of this run):", ""]
        lines += _table(["target", "measured", ""], [
            [t.text, f"{t.measured:.2f}x" if t.measured is not None else "-",
             t.status + (f" by {_pct(t.shortfall)}" if t.shortfall is not None else "")]
            for t in ts])
    lines += ["", "Configurations:", ""]
    lines += [f"- {c}: {DESCRIPTIONS[c]}" for c in r.configs]
    if r.skipped:
        lines += ["", "Not run here:", ""]
        lines += [f"- {note}" for note in r.skipped]
    return "\n".join(lines) + "\n"


# a colour per kind, darker with 2 queues
_COLORS = {"veth": ("#8c8c8c", "#8c8c8c"), "mqtun": ("#1f77b4", "#0b4f8a"),
           "c": ("#2ca02c", "#176617"), "pytun": ("#d62728", "#8b1a1a")}


def _positions(configs: Sequence[str]) -> list[float]:
    """Bar positions: like-for-like pairs (mqtun and its baseline) side by side, a gap between
    groups."""
    xs: list[float] = []
    x = 0.0
    for i, c in enumerate(configs):
        if i and baseline(configs[i - 1], configs) != c:
            x += 0.6
        xs.append(x)
        x += 1.0
    return xs


def _style(config: str) -> dict[str, Any]:
    spec = CONFIGS[config]
    plain = spec.kind in ("veth", "pytun") or spec.offload
    return {"color": _COLORS[spec.kind][spec.queues > 1], "hatch": None if plain else "///",
            "edgecolor": "white" if plain else "black", "linewidth": 0.5}


def write_chart(r: BenchResult, path: Path) -> None:
    """What a network engineer reads: per workload the speed (values on the bars, min-max
    whiskers, the like-for-like ratio), under it the forwarder's cost (CPU us per packet, or
    Gbit/s per core for streams), then request/response p50/p99, where UDP was lost, and a
    legend that says what each configuration is."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    wls = [WORKLOADS[w] for w in r.workloads]
    rr = [w for w in wls if w.count_unit == "trans"]
    extra = len(rr) + ("udp16" in r.workloads)
    cols = max(len(wls), extra, 1)
    fig = plt.figure(figsize=(3.3 * cols + 0.5, 11.5))
    grid = fig.add_gridspec(4, cols, height_ratios=[1.2, 1, 1, 0.55])
    xs = _positions(r.configs)

    def bars(ax: Any, values: list[float | None], labels: list[str], title: str, unit: str,
             err: list[tuple[float, float]] | None = None) -> None:
        heights = [v or 0.0 for v in values]
        drawn = ax.bar(xs, heights, width=0.9)
        for patch, c in zip(drawn, r.configs, strict=True):
            st = _style(c)
            patch.set_facecolor(st["color"])
            patch.set_hatch(st["hatch"])
            patch.set_edgecolor(st["edgecolor"])
        tops = heights
        if err is not None:
            lo = [max(0.0, h - e[0]) for h, e in zip(heights, err, strict=True)]
            hi = [max(0.0, e[1] - h) for h, e in zip(heights, err, strict=True)]
            ax.errorbar(xs, heights, yerr=[lo, hi], fmt="none", ecolor="black", capsize=2,
                        linewidth=0.7)
            tops = [max(h, e[1]) for h, e in zip(heights, err, strict=True)]
        for x, top, text in zip(xs, tops, labels, strict=True):  # above the whisker
            ax.annotate(text, (x, top), xytext=(0, 3), textcoords="offset points",
                        rotation=90, ha="center", va="bottom", fontsize=6)
        ax.set_xticks(xs, r.configs, rotation=60, ha="right", fontsize=7)
        ax.set_title(title, fontsize=8.5)
        ax.set_ylabel(unit, fontsize=7.5)
        ax.tick_params(axis="y", labelsize=7)
        longest = max([len(t) for t in labels] + [1])
        ax.set_ylim(0, (max(tops) or 1.0) * (1.25 + longest / 25))  # room for the labels

    for i, w in enumerate(wls):
        meds = [r.median(c, w.key) for c in r.configs]
        vals = [m / w.scale if m is not None else None for m in meds]
        spreads = [r.spread(c, w.key) for c in r.configs]
        err = [(sp[0] / w.scale, sp[1] / w.scale) if sp else (0.0, 0.0) for sp in spreads]
        labels = []
        for c, v in zip(r.configs, vals, strict=True):
            base = baseline(c, r.configs)
            ratio = r.ratio(c, base, w.key) if base else None
            text = _fmt(v) if v is not None else "-"
            if ratio is not None:
                text += f"  {ratio:.2f}x {base}"
            if w.key == "udp16" and (loss := r.median(c, w.key, "loss")) is not None:
                text += f"  loss {loss:.0%}"
            labels.append(text)
        bars(fig.add_subplot(grid[0, i]), vals, labels, w.title, w.unit, err)
        ax = fig.add_subplot(grid[1, i])
        if w.count_unit == "bit":
            per = [r.median(c, w.key, "per_core") for c in r.configs]
            vals = [p / 1e9 if p is not None else None for p in per]
            bars(ax, vals, [_fmt(v) if v is not None else "" for v in vals],
                 f"{w.title}: Gbit/s per forwarder core", "Gbit/s per core")
        else:
            vals = [r.median(c, w.key, "cpu_us_per_packet") for c in r.configs]
            bars(ax, vals, [f"{v:.2f}" if v is not None else "" for v in vals],
                 f"{w.title}: forwarder CPU per packet", "CPU us per packet")
    col = 0
    for w in rr:
        ax = fig.add_subplot(grid[2, col])
        col += 1
        p50 = [r.median(c, w.key, "p50_us") or 0.0 for c in r.configs]
        p99 = [r.median(c, w.key, "p99_us") or 0.0 for c in r.configs]
        ax.bar(xs, p99, width=0.9, color="#dddddd", edgecolor="#999999", linewidth=0.5,
               label="p99")
        ax.bar(xs, p50, width=0.6, color=[_style(c)["color"] for c in r.configs], label="p50")
        for x, a, b in zip(xs, p50, p99, strict=True):
            if b:
                ax.annotate(f"{a:.0f} / {b:.0f}", (x, b), xytext=(0, 3), rotation=90,
                            textcoords="offset points", ha="center", va="bottom", fontsize=6)
        if any(p99):
            ax.set_yscale("log")
        ax.set_xticks(xs, r.configs, rotation=60, ha="right", fontsize=7)
        ax.set_title(f"{w.title}: round trip p50 / p99", fontsize=8.5)
        ax.set_ylabel("us (log)", fontsize=7.5)
        ax.tick_params(axis="y", labelsize=7)
        ax.legend(fontsize=6, loc="upper left")
        top = max([*p99, 1.0])
        ax.set_ylim(top=top * 8 if any(p99) else top * 1.5)
    if "udp16" in r.workloads:
        ax = fig.add_subplot(grid[2, col])
        bottom = [0.0] * len(r.configs)
        for attr, name, color in (("lost_before", "before the forwarder", "#ff9896"),
                                  ("lost_in", "in the forwarder", "#d62728"),
                                  ("lost_after", "after it (B's stack, socket)", "#9467bd")):
            part = []
            for c in r.configs:
                runs = [s for s in r.runs(c, "udp16") if s.sent and getattr(s, attr) is not None]
                part.append(100 * statistics.median(getattr(s, attr) / s.sent for s in runs)
                            if runs else 0.0)
            ax.bar(xs, part, bottom=bottom, width=0.9, color=color, label=name)
            bottom = [b + p for b, p in zip(bottom, part, strict=True)]
        for x, total in zip(xs, bottom, strict=True):
            ax.text(x, total, f"{total:.0f}%", ha="center", va="bottom", fontsize=6)
        ax.set_xticks(xs, r.configs, rotation=60, ha="right", fontsize=7)
        ax.set_title("UDP 64 B: where datagrams were lost", fontsize=8.5)
        ax.set_ylabel("% of datagrams sent", fontsize=7.5)
        ax.tick_params(axis="y", labelsize=7)
        ax.legend(fontsize=6, loc="upper left")
        ax.set_ylim(0, max([*bottom, 1.0]) * 1.6)
    legend_ax = fig.add_subplot(grid[3, :])
    legend_ax.axis("off")
    handles = [Patch(facecolor=_style(c)["color"], hatch=_style(c)["hatch"],
                     edgecolor=_style(c)["edgecolor"], label=f"{c}: {DESCRIPTIONS[c]}")
               for c in r.configs]
    legend_ax.legend(handles=handles, loc="center", ncol=2, fontsize=7.5, frameon=False,
                     title="configurations (hatched: no offloads; labels: median, ratio to "
                     "the like-for-like baseline of this run)", title_fontsize=7.5)
    fig.suptitle(f"mqtun bench: medians of {r.repeat} interleaved run(s) x {r.seconds:g} s, "
                 f"whiskers min-max; kernel {r.machine.get('kernel', '?')}, "
                 f"{r.machine.get('cpus', '?')} CPUs", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _summary(r: BenchResult) -> dict[str, dict[str, dict[str, object]]]:
    """Per config and workload: medians, each beside its unit."""
    out: dict[str, dict[str, dict[str, object]]] = {}
    for c in r.configs:
        out[c] = {}
        for w in r.workloads:
            wl = WORKLOADS[w]
            sp = r.spread(c, w)
            out[c][w] = {
                "median": r.median(c, w), "min": sp[0] if sp else None,
                "max": sp[1] if sp else None, "unit": wl.value_unit,
                "forwarder_cpu_pct": r.median(c, w, "forwarder_cpu"),
                "machine_cpu_pct": r.median(c, w, "machine_cpu"),
                "steal_pct": r.median(c, w, "steal"),
                "cpu_us_per_packet": r.median(c, w, "cpu_us_per_packet"),
                "per_forwarder_core": r.median(c, w, "per_core"),
                "per_forwarder_core_unit": wl.value_unit,
                "p50_us": r.median(c, w, "p50_us"), "p99_us": r.median(c, w, "p99_us"),
                "loss": r.median(c, w, "loss")}
    return out


def write_report(r: BenchResult, out: Path) -> dict[str, Path]:
    """results.json and table.md in `out`, then chart.png when matplotlib can draw it (else a
    note in `r.skipped` and in table.md: the table is never lost to the chart)."""
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / "results.json", "table": out / "table.md"}
    chart = out / "chart.png"
    if _have_module("matplotlib"):
        try:
            write_chart(r, chart)
            paths["chart"] = chart
        except Exception as exc:  # a chart is not worth the table: say why, keep going
            r.skipped.append(f"chart.png not written: {type(exc).__name__}: {exc}")
    paths["json"].write_text(json.dumps({
        "configs": r.configs, "workloads": r.workloads, "seconds": r.seconds,
        "repeat": r.repeat, "started": r.started, "machine": r.machine, "skipped": r.skipped,
        "descriptions": {c: DESCRIPTIONS[c] for c in r.configs},
        "units": {w: WORKLOADS[w].value_unit for w in r.workloads},
        "display": {w: {"unit": WORKLOADS[w].unit, "divide_by": WORKLOADS[w].scale}
                    for w in r.workloads},
        "summary": _summary(r),
        "targets": [asdict(t) | {"status": t.status} for t in targets(r)],
        "samples": [asdict(s) | {"cpu_us_per_packet": s.cpu_us_per_packet,
                                 "per_core": s.per_core} for s in r.samples]}, indent=2))
    paths["table"].write_text(render_markdown(r))
    return paths
