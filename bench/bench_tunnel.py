"""TCP through `mqtun tunnel vxlan` against the kernel's VXLAN on both ends (the ceiling).

    sudo python3 bench/bench_tunnel.py [--repeat 5] [--seconds 5] [--short] [--out FILE]
                                       [--compare OLD_TREE]

Each configuration is a pair of namespaces joined by a veth underlay, with VXLAN 42 between
them; iperf3 runs from the left namespace to the right one (and back with -R, "rev"):

- ``kernel``: the kernel's vxlan device on both ends;
- ``mqtun-1q`` / ``mqtun-2q``: `mqtun tunnel vxlan` with 1 or 2 queues on the left, the kernel's
  vxlan device on the right;
- ``c-1q`` / ``c-2q`` (with `--c`): bench/c_vxlan.c in mqtun's place, the same design (a TAP
  queue and a UDP socket per thread, TSO split into one UDP GSO train, UDP GRO reads) in C with
  nothing else: what that design reaches on this machine when the user-space work costs little.

All configurations are set up once and the runs are interleaved (every configuration and
workload once, then again, `--repeat` times), so a busy machine slows them alike; the table has
medians and the ratios the project set targets for: 4 flows over 2 queues >= 0.5x kernel, 1
flow >= 0.3x kernel, 2 queues >= 1.3x 1 queue on 4 flows (and with `--c`, mqtun against the C
reference). The CPU column is the tunnel process's (all workers) CPU time per second of the
run. Not a test: the suite never runs it;
`--short` (1 repetition of 1 s, forward direction only) checks that the bench works.
`--compare OLD_TREE` adds ``old-1q`` / ``old-2q``: the same tunnel from another source tree (a
directory holding src/mqtun, e.g. `git archive main | tar -x -C /tmp/old`), interleaved with
the rest, and the new/old ratios: a before/after that holds on a shared machine.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"
sys.path.insert(0, str(SRC))

from mqtun.netns import NetNamespace  # noqa: E402

VNI = "42"
WORKLOADS = {"tcp1": (1, False), "tcp4": (4, False), "tcp1-rev": (1, True),
             "tcp4-rev": (4, True)}
CONFIGS = ("kernel", "mqtun-1q", "mqtun-2q")
C_CONFIGS = ("c-1q", "c-2q")
C_SOURCE = Path(__file__).resolve().parent / "c_vxlan.c"
TARGETS = (  # (name, numerator, denominator, floor)
    ("4 flows, 2 queues vs kernel", ("mqtun-2q", "tcp4"), ("kernel", "tcp4"), 0.5),
    ("1 flow vs kernel", ("mqtun-2q", "tcp1"), ("kernel", "tcp1"), 0.3),
    ("2 queues vs 1 queue, 4 flows", ("mqtun-2q", "tcp4"), ("mqtun-1q", "tcp4"), 1.3),
)
C_RATIOS = (  # (name, numerator, denominator): no target, the design's reach in C
    ("C reference, 4 flows, 2 queues vs kernel", ("c-2q", "tcp4"), ("kernel", "tcp4")),
    ("C reference, 1 flow vs kernel", ("c-2q", "tcp1"), ("kernel", "tcp1")),
    ("mqtun vs C, 4 flows, 2 queues", ("mqtun-2q", "tcp4"), ("c-2q", "tcp4")),
    ("mqtun vs C, 1 flow, 2 queues", ("mqtun-2q", "tcp1"), ("c-2q", "tcp1")),
    ("mqtun vs C, 1 flow, 1 queue", ("mqtun-1q", "tcp1"), ("c-1q", "tcp1")),
)


@dataclass
class Setup:
    name: str
    left: NetNamespace
    right: NetNamespace
    server: str
    tunnel: subprocess.Popen[str] | None = None
    iperf: subprocess.Popen[bytes] | None = None
    results: dict[str, list[float]] = field(default_factory=dict)
    cpu: dict[str, list[float]] = field(default_factory=dict)

    def close(self) -> None:
        for p in (self.iperf, self.tunnel):
            if p is not None and p.poll() is None:
                p.send_signal(signal.SIGTERM)
                try:
                    p.wait(timeout=3)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait(timeout=3)
        for ns in (self.left, self.right):
            ns.delete()


def _env(src: Path = SRC) -> dict[str, str]:
    path = os.environ.get("PYTHONPATH", "")
    return {**os.environ, "PYTHONPATH": f"{src}:{path}" if path else str(src)}


def _vxlan(ns: NetNamespace, local: str, remote: str, underlay: str, inner: str) -> None:
    ns.run(["ip", "link", "add", "vk0", "type", "vxlan", "id", VNI, "remote", remote, "local",
            local, "dstport", "4789", "dev", underlay])
    ns.run(["ip", "addr", "add", f"{inner}/24", "dev", "vk0"])
    ns.run(["ip", "link", "set", "vk0", "up"])


def build_c(directory: Path) -> Path:
    """c_vxlan.c compiled into `directory` (cc -O2 -pthread)."""
    binary = directory / "c_vxlan"
    subprocess.run([os.environ.get("CC", "cc"), "-O2", "-pthread", "-o", str(binary),
                    str(C_SOURCE)], check=True, timeout=120)
    return binary


def setup(name: str, index: int, src: Path = SRC, c_binary: Path | None = None) -> Setup:
    left, right = NetNamespace.create(prefix="bt-l-"), NetNamespace.create(prefix="bt-r-")
    net = 30 + index
    a, b = f"198.18.{net}.1", f"198.18.{net}.2"
    ia, ib = f"198.19.{net}.1", f"198.19.{net}.2"
    s = Setup(name, left, right, ib)
    try:
        subprocess.run(["ip", "link", "add", "ul", "netns", left.name, "type", "veth", "peer",
                        "name", "ur", "netns", right.name], check=True, timeout=10)
        for ns, addr, dev in ((left, a, "ul"), (right, b, "ur")):
            ns.run(["ip", "addr", "add", f"{addr}/24", "dev", dev])
            ns.run(["ip", "link", "set", dev, "up"])
        _vxlan(right, b, a, "ur", ib)
        if name == "kernel":
            _vxlan(left, a, b, "ul", ia)
        elif name.startswith("c-"):
            assert c_binary is not None
            queues = name.split("-", 1)[1].removesuffix("q")
            s.tunnel = left.popen([str(c_binary), "vx0", a, b, VNI, queues],
                                  stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
            assert s.tunnel.stdout is not None
            line = s.tunnel.stdout.readline().strip()
            if not line.startswith("READY"):
                raise RuntimeError(f"{name}: the C tunnel did not start ({line!r})")
            # the MTU mqtun picks: the underlay's less the VXLAN overhead
            left.run(["ip", "link", "set", "vx0", "mtu", "1450", "up"])
            left.run(["ip", "addr", "add", f"{ia}/24", "dev", "vx0"])
        else:
            queues = name.split("-", 1)[1].removesuffix("q")
            s.tunnel = left.popen(
                [sys.executable, "-m", "mqtun", "tunnel", "vxlan", "--local", a, "--remote", b,
                 "--vni", VNI, "--queues", queues, "--name", "vx0"],
                stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=_env(src))
            assert s.tunnel.stdout is not None
            line = s.tunnel.stdout.readline().strip()
            if not line.startswith("READY"):
                raise RuntimeError(f"{name}: the tunnel did not start ({line!r})")
            left.run(["ip", "addr", "add", f"{ia}/24", "dev", "vx0"])
        s.iperf = right.popen(["iperf3", "-s", "-B", ib], stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
        time.sleep(0.3)
        # warm-up: ARP and the first connection
        left.run(["iperf3", "-c", ib, "-t", "1", "-J"], check=False, timeout=30)
    except BaseException:
        s.close()
        raise
    return s


def _cpu_seconds(pid: int) -> float:
    """User + system CPU of `pid` and its children (the workers), from /proc."""
    tick = os.sysconf("SC_CLK_TCK")
    total = 0.0
    pids = [pid]
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            pids += [int(x) for x in f.read().split()]
    except OSError:
        pass
    for p in pids:
        try:
            with open(f"/proc/{p}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / tick
        except (OSError, IndexError, ValueError):
            pass
    return total


def emit(table: str, out: str | None) -> None:
    """The report: printed, and written to `out` too when given."""
    print(table, end="")
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(table)


def run_one(s: Setup, workload: str, seconds: float) -> tuple[float, float]:
    """(Gbit/s, tunnel CPU seconds per second) of one iperf3 run."""
    flows, reverse = WORKLOADS[workload]
    argv = ["iperf3", "-c", s.server, "-t", str(seconds), "-P", str(flows), "-J"]
    if reverse:
        argv.append("-R")
    pid = s.tunnel.pid if s.tunnel is not None else 0
    cpu0 = _cpu_seconds(pid) if pid else 0.0
    out = s.left.run(argv, check=False, timeout=seconds + 30)
    cpu1 = _cpu_seconds(pid) if pid else 0.0
    try:
        bps = json.loads(out.stdout)["end"]["sum_received"]["bits_per_second"]
    except (ValueError, KeyError):
        bps = 0.0
    return bps / 1e9, (cpu1 - cpu0) / seconds


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--seconds", type=float, default=5.0)
    ap.add_argument("--workloads", default=",".join(WORKLOADS))
    ap.add_argument("--short", action="store_true", help="1 repetition of 1 s, tcp1 and tcp4")
    ap.add_argument("--out", help="also write the table (markdown) here")
    ap.add_argument("--compare", metavar="OLD_TREE", help="also old-1q/old-2q from this tree")
    ap.add_argument("--c", action="store_true", help="also c-1q/c-2q: the C reference tunnel")
    ap.add_argument("--configs", help="only these configurations (comma list)")
    args = ap.parse_args()
    workloads = ["tcp1", "tcp4"] if args.short else args.workloads.split(",")
    for w in workloads:
        if w not in WORKLOADS:
            ap.error(f"unknown workload {w!r} (choose from {', '.join(WORKLOADS)})")
    repeat, seconds = (1, 1.0) if args.short else (args.repeat, args.seconds)
    with open("/proc/loadavg") as f:
        load_before = f.read().split()[0]
    setups: list[Setup] = []
    tmp = tempfile.TemporaryDirectory(prefix="bench-tunnel-")
    try:
        configs = [(name, SRC) for name in CONFIGS]
        c_binary = None
        if args.c:
            c_binary = build_c(Path(tmp.name))
            configs += [(name, SRC) for name in C_CONFIGS]
        if args.compare:
            old = Path(args.compare).resolve() / "src"
            configs += [("old-1q", old), ("old-2q", old)]
        if args.configs:
            keep = args.configs.split(",")
            configs = [c for c in configs if c[0] in keep]
        for i, (name, src) in enumerate(configs):
            setups.append(setup(name, i, src, c_binary))
        for r in range(repeat):
            for s in setups:
                for w in workloads:
                    gbps, cpu = run_one(s, w, seconds)
                    s.results.setdefault(w, []).append(gbps)
                    s.cpu.setdefault(w, []).append(cpu)
                    print(f"run {r + 1}/{repeat} {s.name:9} {w:9} {gbps:6.2f} Gbit/s"
                          f" cpu {cpu:4.2f}", file=sys.stderr, flush=True)
    finally:
        for s in setups:
            s.close()
        tmp.cleanup()
    with open("/proc/loadavg") as f:
        load_after = f.read().split()[0]
    med = {(s.name, w): statistics.median(v) for s in setups for w, v in s.results.items()}
    cpu_med = {(s.name, w): statistics.median(v) for s in setups for w, v in s.cpu.items()}
    lines = [f"iperf3 TCP through VXLAN, medians of {repeat} interleaved runs of {seconds:g} s "
             f"(load average {load_before} before, {load_after} after)", "",
             "| config | " + " | ".join(workloads) + " |",
             "|---|" + "---|" * len(workloads)]
    for s in setups:
        cells = []
        for w in workloads:
            c = f", cpu {cpu_med[(s.name, w)]:.2f}" if s.tunnel is not None else ""
            cells.append(f"{med[(s.name, w)]:.2f} Gbit/s{c}")
        lines.append(f"| {s.name} | " + " | ".join(cells) + " |")
    lines += ["", "| target | ratio | floor | met |", "|---|---|---|---|"]
    for label, num, den, floor in TARGETS:
        if num in med and den in med and med[den] > 0:
            ratio = med[num] / med[den]
            met = "yes" if ratio >= floor else "no"
            lines.append(f"| {label} | {ratio:.3f} | {floor} | {met} |")
    for label, num, den in C_RATIOS:
        if num in med and den in med and med[den] > 0:
            lines.append(f"| {label} | {med[num] / med[den]:.3f} | - | - |")
    if args.compare:
        lines += ["", "| new / old | " + " | ".join(workloads) + " |",
                  "|---|" + "---|" * len(workloads)]
        for q in ("1q", "2q"):
            new, old = ([med.get((f"{kind}-{q}", w), 0.0) for w in workloads]
                        for kind in ("mqtun", "old"))
            if any(new) and any(old):  # both measured (--configs may leave a pair out)
                cells = [f"{n / o:.3f}" if n > 0 and o > 0 else "-"
                         for n, o in zip(new, old, strict=True)]
                lines.append(f"| {q} | " + " | ".join(cells) + " |")
    emit("\n".join(lines) + "\n", args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
