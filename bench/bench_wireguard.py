"""TCP through WireGuard: `mqtun wg` against itself and against Debian's wireguard-go.

    sudo python3 bench/bench_wireguard.py [--repeat 3] [--seconds 3] [--workloads tcp1,tcp4]
                                          [--configs ...] [--short] [--out FILE]
                                          [--compare OLD_TREE]

Each configuration is a pair of namespaces joined by a veth underlay (198.18.N.1/.2) with a
WireGuard tunnel between them (198.19.N.1/.2, one peer each side, `wg set` configuring both
through the userspace socket); iperf3 runs from the left namespace to the right one:

- ``wggo-wggo``: wireguard-go on both ends (the baseline);
- ``mqtun1-mqtun1`` / ``mqtun2-mqtun2``: `mqtun wg` with 1 or 2 queues (worker processes) on
  both ends;
- ``mqtun1-wggo``: `mqtun wg` (1 queue) on the left, wireguard-go on the right;
- ``nooff1-nooff1`` (only if asked for): `mqtun wg --no-offload` on both ends.

All configurations are set up once and the runs are interleaved (every configuration and
workload once, then again, `--repeat` times), so a busy machine slows them alike. The table
has medians of throughput, TCP retransmits and the receiver's out-of-order segments
(TcpExtTCPOFOQueue: how much the tunnel reordered the flow), the CPU seconds per second of the
two WireGuard processes (their workers included) and the throughput per CPU-second (on a
shared machine, what each implementation makes of the CPU it got), the whole machine's busy
CPU during the run (from /proc/stat: every process, iperf3 and softirq included, in cores of
`os.cpu_count()`; its softirq part, and the part not charged to the two ends: iperf3, softirq
outside them, and anything else running -- a run where this is high was disturbed; when the
busy figure nears the core count, the machine, not the tunnel, is the limit), and the ratios
the issue sets targets for:
mqtun 2 queues >= 3x wireguard-go, 2 queues >= 1.5x 1 queue. Not a test: `--short` (one
repetition of 1 s, tcp1, wggo-wggo and mqtun1-mqtun1) only checks that the bench works.

`--compare OLD_TREE` adds ``old1-old1`` / ``old2-old2`` (and ``old1-wggo`` with
``mqtun1-wggo``): `mqtun wg` from another source tree (e.g. the commit before a change),
interleaved with the rest, and the new/old ratios.

`--profile CONFIG` instead sets up one configuration, runs the first workload for
`--seconds` + 3 s and samples every process of each end with py-spy meanwhile (the main
process and its workers; samples waiting in the kernel left out), printing where each end
spends its time (bench/profile_forward.py's tables).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "tests" / "wireguard"))
sys.path.insert(0, str(ROOT / "bench"))

from bench_tunnel import _cpu_seconds, _env, emit  # noqa: E402
from profile_forward import summarize  # noqa: E402
from wg_peer import WireguardGo, mqtun_wg_command  # noqa: E402

from mqtun.netns import NetNamespace  # noqa: E402
from mqtun.wireguard.crypto import public_key  # noqa: E402
from mqtun.wireguard.noise import new_private_key  # noqa: E402

PORT = 51900
WORKLOADS = {"tcp1": (1, False), "tcp4": (4, False), "tcp1-rev": (1, True),
             "tcp4-rev": (4, True)}
CONFIGS = {  # name: (left implementation, right implementation)
    "wggo-wggo": ("wggo", "wggo"),
    "mqtun1-mqtun1": ("mqtun1", "mqtun1"),
    "mqtun2-mqtun2": ("mqtun2", "mqtun2"),
    "mqtun1-wggo": ("mqtun1", "wggo"),
    "nooff1-nooff1": ("nooff1", "nooff1"),  # (not by default) `mqtun wg --no-offload`
    "old1-old1": ("old1", "old1"),  # (--compare OLD_TREE) `mqtun wg` from OLD_TREE
    "old2-old2": ("old2", "old2"),
    "old1-wggo": ("old1", "wggo"),
}
DEFAULT_CONFIGS = ("wggo-wggo", "mqtun1-mqtun1", "mqtun2-mqtun2", "mqtun1-wggo")
BASELINE = "wggo-wggo"
TARGETS = (  # (label, numerator config, denominator config, floor)
    ("mqtun 2q vs wireguard-go", "mqtun2-mqtun2", "wggo-wggo", 3.0),
    ("mqtun 2q vs mqtun 1q", "mqtun2-mqtun2", "mqtun1-mqtun1", 1.5),
    ("mqtun 1q vs wireguard-go", "mqtun1-mqtun1", "wggo-wggo", None),
    ("mqtun 1q -> wireguard-go vs wireguard-go", "mqtun1-wggo", "wggo-wggo", None),
    ("mqtun 1q vs mqtun 1q without offloads", "mqtun1-mqtun1", "nooff1-nooff1", None),
    ("mqtun 1q vs old tree 1q", "mqtun1-mqtun1", "old1-old1", None),
    ("mqtun 2q vs old tree 2q", "mqtun2-mqtun2", "old2-old2", None),
    ("old tree 2q vs wireguard-go", "old2-old2", "wggo-wggo", None),
    ("mqtun 1q -> wireguard-go vs old tree's", "mqtun1-wggo", "old1-wggo", None),
)
OLD_TREE: Path | None = None  # --compare


def _command(impl: str) -> list[str]:
    if impl == "wggo":
        return ["wireguard-go", "-f"]
    if impl.startswith("nooff"):
        return mqtun_wg_command("--no-offload", "--queues", impl.removeprefix("nooff"))
    if impl.startswith("old"):
        assert OLD_TREE is not None
        return ["env", f"PYTHONPATH={OLD_TREE / 'src'}",
                *mqtun_wg_command("--queues", impl.removeprefix("old"))]
    return mqtun_wg_command("--queues", impl.removeprefix("mqtun"))


@dataclass
class Run:
    gbps: float
    retransmits: int
    ofo: int
    cpu: float
    busy: float = 0.0  # the machine's busy cores (every process and softirq)
    softirq: float = 0.0


@dataclass
class Setup:
    name: str
    left: NetNamespace
    right: NetNamespace
    server: str
    ends: list[WireguardGo] = field(default_factory=list)
    iperf: subprocess.Popen[bytes] | None = None
    runs: dict[str, list[Run]] = field(default_factory=dict)

    def close(self) -> None:
        if self.iperf is not None and self.iperf.poll() is None:
            self.iperf.kill()
            self.iperf.wait(timeout=3)
        for end in self.ends:
            end.close()
        for ns in (self.left, self.right):
            ns.delete()


def setup(name: str, index: int) -> Setup:
    left, right = NetNamespace.create(prefix="bw-l-"), NetNamespace.create(prefix="bw-r-")
    net = 40 + index
    under = (f"198.18.{net}.1", f"198.18.{net}.2")
    inner = (f"198.19.{net}.1", f"198.19.{net}.2")
    s = Setup(name, left, right, inner[1])
    try:
        subprocess.run(["ip", "link", "add", "ul", "netns", left.name, "type", "veth", "peer",
                        "name", "ur", "netns", right.name], check=True, timeout=10)
        for ns, addr, dev in ((left, under[0], "ul"), (right, under[1], "ur")):
            ns.run(["ip", "addr", "add", f"{addr}/24", "dev", dev])
            ns.run(["ip", "link", "set", dev, "up"])
        keys = (new_private_key(), new_private_key())
        for side, (ns, impl) in enumerate(zip((left, right), CONFIGS[name], strict=True)):
            end = WireguardGo(ns, keys[side], PORT, command=_command(impl))
            s.ends.append(end.__enter__())
        for side, end in enumerate(s.ends):
            other = 1 - side
            end.add_peer(public_key(keys[other]), allowed_ips=f"{inner[other]}/32",
                         endpoint=f"{under[other]}:{PORT}")
            end.address(f"{inner[side]}/24")
        s.iperf = right.popen(["iperf3", "-s", "-B", inner[1]], stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
        time.sleep(0.3)
        left.run(["ping", "-c", "1", "-W", "5", inner[1]], check=False, timeout=10)
        left.run(["iperf3", "-c", inner[1], "-t", "1", "-J"], check=False, timeout=30)  # warm
    except BaseException:
        s.close()
        raise
    return s


def _netstat(ns: NetNamespace, name: str) -> int:
    """One TcpExt counter of the namespace (/proc/net/netstat as seen from inside)."""
    lines = ns.run(["cat", "/proc/net/netstat"]).stdout.splitlines()
    for keys, values in zip(lines[::2], lines[1::2], strict=False):
        if keys.startswith("TcpExt:"):
            table = dict(zip(keys.split()[1:], values.split()[1:], strict=False))
            return int(table.get(name, 0))
    return 0


def _machine_ticks() -> tuple[int, int, int]:
    """(busy, softirq, total) clock ticks of all CPUs since boot (/proc/stat's cpu line;
    idle and iowait are the not-busy ones; guest time is already in user)."""
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:9]]
    user, nice, system, _idle, _iowait, irq, softirq, steal = fields
    return user + nice + system + irq + softirq + steal, softirq, sum(fields)


def run_one(s: Setup, workload: str, seconds: float) -> Run:
    flows, reverse = WORKLOADS[workload]
    argv = ["iperf3", "-c", s.server, "-t", str(seconds), "-P", str(flows), "-J"]
    if reverse:
        argv.append("-R")
    receiver = s.left if reverse else s.right
    pids = [e.pid for e in s.ends]
    cpu0 = sum(_cpu_seconds(p) for p in pids)
    ofo0 = _netstat(receiver, "TCPOFOQueue")
    busy0, soft0, total0 = _machine_ticks()
    try:
        out = s.left.run(argv, check=False, timeout=seconds + 30)
    except subprocess.TimeoutExpired:  # a stalled run is a zero, not the end of the bench
        out = subprocess.CompletedProcess(argv, 1, "", "")
    busy1, soft1, total1 = _machine_ticks()
    ofo1 = _netstat(receiver, "TCPOFOQueue")
    cpu1 = sum(_cpu_seconds(p) for p in pids)
    try:
        end = json.loads(out.stdout)["end"]
        bps = end["sum_received"]["bits_per_second"]
        retransmits = int(end["sum_sent"].get("retransmits", 0))
    except (ValueError, KeyError):
        bps, retransmits = 0.0, 0
    cores = (os.cpu_count() or 1) / max(total1 - total0, 1)  # ticks -> cores busy
    return Run(bps / 1e9, retransmits, ofo1 - ofo0, (cpu1 - cpu0) / seconds,
               (busy1 - busy0) * cores, (soft1 - soft0) * cores)


def _per_cpu(run: Run) -> float:
    """Mbit/s per CPU-second of the two WireGuard processes."""
    return run.gbps * 1000 / max(run.cpu, 1e-3)


def _load() -> str:
    with open("/proc/loadavg") as f:
        return " ".join(f.read().split()[:3])


def table(setups: list[Setup], workloads: list[str], repeat: int, seconds: float,
          loads: tuple[str, str]) -> str:
    med: dict[tuple[str, str], float] = {}
    lines = [f"iperf3 TCP through WireGuard over a veth, medians of {repeat} interleaved runs "
             f"of {seconds:g} s (load average {loads[0]} before, {loads[1]} after)", "",
             "| config | workload | Mbit/s | retransmits | out-of-order | cpu (both ends) "
             f"| Mbit/s per cpu | machine busy (of {os.cpu_count()} cores) | of it softirq "
             "| of it not the ends |", "|---|---|---|---|---|---|---|---|---|---|"]
    for s in setups:
        for w in workloads:
            runs = s.runs.get(w, [])
            if not runs:
                continue
            med[(s.name, w)] = statistics.median(r.gbps for r in runs) * 1000
            lines.append(f"| {s.name} | {w} | {med[(s.name, w)]:.0f} | "
                         f"{statistics.median(r.retransmits for r in runs):.0f} | "
                         f"{statistics.median(r.ofo for r in runs):.0f} | "
                         f"{statistics.median(r.cpu for r in runs):.2f} | "
                         f"{statistics.median(_per_cpu(r) for r in runs):.0f} | "
                         f"{statistics.median(r.busy for r in runs):.2f} | "
                         f"{statistics.median(r.softirq for r in runs):.2f} | "
                         f"{statistics.median(r.busy - r.cpu for r in runs):.2f} |")
    lines += ["", "| ratio | workload | value | target | met |", "|---|---|---|---|---|"]
    for label, num, den, floor in TARGETS:
        for w in workloads:
            if (num, w) in med and (den, w) in med and med[(den, w)] > 0:
                ratio = med[(num, w)] / med[(den, w)]
                met = "" if floor is None else ("yes" if ratio >= floor else "no")
                lines.append(f"| {label} | {w} | {ratio:.2f} | "
                             f"{'' if floor is None else f'>= {floor}'} | {met} |")
    return "\n".join(lines) + "\n"


def _family(pid: int) -> list[int]:
    """`pid` and its children (a multi-queue `mqtun wg`'s workers)."""
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return [pid, *(int(x) for x in f.read().split())]
    except OSError:
        return [pid]


def profile(name: str, workload: str, seconds: float, top: int) -> int:
    if not shutil.which("py-spy"):
        print("bench_wireguard: --profile needs py-spy (pip install py-spy)", file=sys.stderr)
        return 2
    s = setup(name, 0)
    try:
        load = threading.Thread(target=run_one, args=(s, workload, seconds + 3), daemon=True)
        load.start()
        time.sleep(1.5)
        with tempfile.TemporaryDirectory(prefix="mqtun-wgprof-") as tmp:
            sides = [(label, _family(end.pid)) for label, end in zip(("left", "right"), s.ends,
                                                                      strict=True)]
            spies = []
            for label, pids in sides:
                for pid in pids:
                    out = Path(tmp) / f"{label}-{pid}.txt"
                    spies.append((out, subprocess.Popen(
                        ["py-spy", "record", "--nonblocking", "-r", "250", "-f", "raw", "-d",
                         str(max(1, round(seconds))), "-p", str(pid), "-o", str(out)],
                        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)))
            for _, spy in spies:
                _, err = spy.communicate(timeout=seconds + 30)
                if spy.returncode != 0:
                    print(f"py-spy failed: {err.strip()[-300:]}", file=sys.stderr)
            load.join(seconds + 40)
            for label, pids in sides:
                raw = "\n".join(p.read_text() for p in Path(tmp).glob(f"{label}-*.txt"))
                print(f"== {name} {workload}: {label} end ({CONFIGS[name][label == 'right']}), "
                      f"pids {pids}")
                print(summarize(raw, top))
    finally:
        s.close()
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--seconds", type=float, default=3.0)
    ap.add_argument("--workloads", default="tcp1,tcp4")
    ap.add_argument("--configs", default=",".join(DEFAULT_CONFIGS),
                    help=f"comma-separated, of {', '.join(CONFIGS)}")
    ap.add_argument("--short", action="store_true",
                    help="1 repetition of 1 s, tcp1, wggo-wggo and mqtun1-mqtun1")
    ap.add_argument("--out", help="also write the table (markdown) here")
    ap.add_argument("--profile", metavar="CONFIG", help="py-spy both ends of one configuration")
    ap.add_argument("--top", type=int, default=15, help="rows of each --profile table")
    ap.add_argument("--compare", metavar="OLD_TREE",
                    help="also old1-old1/old2-old2: `mqtun wg` from this source tree")
    args = ap.parse_args()
    global OLD_TREE
    workloads = ["tcp1"] if args.short else args.workloads.split(",")
    configs = [BASELINE, "mqtun1-mqtun1"] if args.short else args.configs.split(",")
    for w in workloads:
        if w not in WORKLOADS:
            ap.error(f"unknown workload {w!r} (choose from {', '.join(WORKLOADS)})")
    for c in configs:
        if c not in CONFIGS:
            ap.error(f"unknown configuration {c!r} (choose from {', '.join(CONFIGS)})")
    if args.compare:
        OLD_TREE = Path(args.compare).resolve()
        if not any(c.startswith("old") for c in configs):  # (else: just the ones named)
            configs += ["old1-old1", "old2-old2", *(["old1-wggo"] if "mqtun1-wggo" in configs
                                                   else [])]
    elif any(c.startswith("old") for c in configs):
        ap.error("the old1-old1/old2-old2 configurations need --compare OLD_TREE")
    repeat, seconds = (1, 1.0) if args.short else (args.repeat, args.seconds)
    os.environ.update(_env())  # `mqtun wg` runs this checkout's source
    if args.profile:
        if args.profile not in CONFIGS:
            ap.error(f"unknown configuration {args.profile!r}")
        return profile(args.profile, workloads[0], args.seconds, args.top)
    load_before = _load()
    setups: list[Setup] = []
    try:
        for i, name in enumerate(configs):
            setups.append(setup(name, i))
        for r in range(repeat):
            for s in setups:
                for w in workloads:
                    run = run_one(s, w, seconds)
                    s.runs.setdefault(w, []).append(run)
                    print(f"run {r + 1}/{repeat} {s.name:13} {w:8} {run.gbps * 1000:6.0f} Mbit/s"
                          f" retr {run.retransmits:5} ofo {run.ofo:5} cpu {run.cpu:4.2f}"
                          f" busy {run.busy:4.2f} softirq {run.softirq:4.2f}"
                          f" not-the-ends {run.busy - run.cpu:4.2f}",
                          file=sys.stderr, flush=True)
    finally:
        for s in setups:
            s.close()
    emit(table(setups, workloads, repeat, seconds, (load_before, _load())), args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
