"""`mqtun bench`: how fast is a forwarder between two namespaces, next to the kernel and to pytun?

Topology (`mqtun.apps.topology`): namespaces A and B joined by a forwarder in namespace F.
Configurations, all in one run so that the ratios compare like with like:

    veth                 a veth pair from A to B: the kernel-only ceiling (no F)
    mqtun-1q, mqtun-2q   `mqtun forward --queues N` (offloads on: the default)
    mqtun-1q-nooff, ...  the same with --no-offload
    pytun-1q, pytun-2q   python-pytun, one process per queue, select/read/write

Workloads, each measured with a standard tool in A (client) and B (server):

    tcp1, tcp4   TCP stream, 1 and 4 flows (iperf3 -P): Gbit/s received
    rr1, rr8     TCP request/response of 64 bytes, 1 and 8 connections (sockperf ping-pong
                 --tcp, one client per connection): transactions/s, summed
    udp16        UDP 64-byte datagrams from 16 flows (sockperf throughput to 16 ports):
                 packets/s delivered to B's sockets (B's Udp InDatagrams) and the loss
                 against what A sent (A's Udp OutDatagrams)

Per run also the forwarder's CPU (utime + stime of every process in F, in % of one core) and
the machine's (/proc/stat, % of all cores). Pinning on this 2-core machine: forwarder worker i
runs on CPU i (`--cpus auto`; python-pytun's the same way), the load tools are not pinned, so
the scheduler shares both cores between them and the forwarder as it would on a real host.

Repeats are interleaved (config after config, then again), so a noisy moment hits all alike;
the report gives medians with min-max, and ratios to the same run's baseline. Nothing here
prints: progress goes to a callback; the CLI writes the files and prints the table.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import statistics
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from mqtun.apps.topology import B_IP, ForwarderSpec, Topology, check_lab, cpu_seconds, lab_errors
from mqtun.errors import InvalidArgumentError, MqtunError
from mqtun.netns import NetNamespace

__all__ = ["CONFIGS", "WORKLOADS", "BenchResult", "Sample", "render_markdown", "run_bench",
           "write_chart", "write_report"]

CONFIGS: dict[str, ForwarderSpec] = {
    "veth": ForwarderSpec("veth"),
    "mqtun-1q": ForwarderSpec("mqtun", 1, offload=True),
    "mqtun-2q": ForwarderSpec("mqtun", 2, offload=True),
    "mqtun-1q-nooff": ForwarderSpec("mqtun", 1, offload=False),
    "mqtun-2q-nooff": ForwarderSpec("mqtun", 2, offload=False),
    "pytun-1q": ForwarderSpec("pytun", 1, offload=False),
    "pytun-2q": ForwarderSpec("pytun", 2, offload=False),
}
SHORT_CONFIGS = ("veth", "mqtun-2q", "pytun-1q")


@dataclass(frozen=True)
class Workload:
    key: str
    title: str
    unit: str
    scale: float  # value / scale is what the table shows


WORKLOADS: dict[str, Workload] = {w.key: w for w in (
    Workload("tcp1", "TCP stream, 1 flow", "Gbit/s", 1e9),
    Workload("tcp4", "TCP stream, 4 flows", "Gbit/s", 1e9),
    Workload("rr1", "TCP req/resp, 1 conn", "k trans/s", 1e3),
    Workload("rr8", "TCP req/resp, 8 conns", "k trans/s", 1e3),
    Workload("udp16", "UDP 64 B, 16 flows", "k pkt/s", 1e3),
)}
IPERF_PORT, RR_PORT, UDP_BASE_PORT, UDP_FLOWS = 5201, 11111, 12000, 16
REQUIRED_TOOLS = ("iperf3", "sockperf", "ss")


@dataclass
class Sample:
    """One measurement: a workload through a configuration, once."""

    config: str
    workload: str
    repeat: int
    value: float  # bits/s, transactions/s or packets/s
    seconds: float
    forwarder_cpu: float  # % of one core
    machine_cpu: float  # % of all cores
    loss: float | None = None  # udp16 only, 0..1


@dataclass
class BenchResult:
    configs: list[str]
    workloads: list[str]
    seconds: float
    repeat: int
    samples: list[Sample] = field(default_factory=list)
    started: float = field(default_factory=time.time)
    machine: dict[str, str] = field(default_factory=dict)

    def runs(self, config: str, workload: str) -> list[Sample]:
        return [s for s in self.samples if s.config == config and s.workload == workload]

    def median(self, config: str, workload: str, attr: str = "value") -> float | None:
        vals = [getattr(s, attr) for s in self.runs(config, workload)]
        vals = [v for v in vals if v is not None]
        return statistics.median(vals) if vals else None

    def spread(self, config: str, workload: str) -> tuple[float, float] | None:
        vals = [s.value for s in self.runs(config, workload)]
        return (min(vals), max(vals)) if vals else None

    def ratio(self, config: str, base: str, workload: str) -> float | None:
        """Median over median of two configurations of this run (None if either is missing)."""
        a, b = self.median(config, workload), self.median(base, workload)
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


def check_tools(configs: Sequence[str]) -> None:
    """Refuse early, in one line, when a tool or python-pytun is missing."""
    check_lab("bench")
    missing = [t for t in REQUIRED_TOOLS if not _which(t)]
    if missing:
        raise MqtunError(2, f"mqtun bench needs {', '.join(missing)} (Debian: apt-get install "
                         "iperf3 sockperf iproute2; or bash scripts/install-test-deps.sh)",
                         op="bench")
    if any(CONFIGS[c].kind == "pytun" for c in configs):
        try:
            import pytun  # noqa: F401
        except ImportError:
            raise MqtunError(2, "the pytun configurations need python-pytun: pip install "
                             "python-pytun (or leave them out with --configs)",
                             op="bench") from None


def _which(tool: str) -> bool:
    return any(os.access(os.path.join(d, tool), os.X_OK)
               for d in os.environ.get("PATH", "/usr/bin:/bin").split(":") if d)


# ---- running ----------------------------------------------------------------------------------
def run_bench(configs: Sequence[str], workloads: Sequence[str], *, seconds: float = 3.0,
              repeat: int = 3, tool_cpus: str | None = None,
              progress: Callable[[str], None] = lambda _line: None) -> BenchResult:
    """Every workload through every configuration, `repeat` times, interleaved."""
    check_tools(configs)
    result = BenchResult(list(configs), list(workloads), seconds, repeat,
                         machine={"cpus": str(os.cpu_count()), "kernel": os.uname().release,
                                  "loadavg_start": _loadavg(),
                                  "tool_cpus": tool_cpus or "any"})
    with lab_errors("bench"), tempfile.TemporaryDirectory(prefix="mqtun-bench-") as tmp:
        feeds = _feed_files(Path(tmp))
        for rep in range(repeat):
            for name in configs:
                spec = CONFIGS[name]
                with Topology(spec) as topo:
                    for wl in workloads:
                        s = _measure(topo, name, wl, rep, seconds, feeds, tool_cpus)
                        result.samples.append(s)
                        progress(f"[{rep + 1}/{repeat}] {name:15} {wl:6} "
                                 f"{_fmt(s.value / WORKLOADS[wl].scale)} "
                                 f"{WORKLOADS[wl].unit}"
                                 + (f" (loss {s.loss:.1%})" if s.loss is not None else "")
                                 + f"  fwd cpu {s.forwarder_cpu:.0f}%"
                                 f"  machine {s.machine_cpu:.0f}%")
    result.machine["loadavg_end"] = _loadavg()
    return result


def _loadavg() -> str:
    """The 1, 5 and 15-minute load averages: how busy the machine was apart from us."""
    with open("/proc/loadavg") as f:
        return " ".join(f.read().split()[:3])


def _feed_files(d: Path) -> dict[str, str]:
    tcp, udp = d / "tcp.feed", d / "udp.feed"
    tcp.write_text(f"T:{B_IP}:{RR_PORT}\n")
    udp.write_text("".join(f"U:{B_IP}:{UDP_BASE_PORT + i}\n" for i in range(UDP_FLOWS)))
    return {"tcp": str(tcp), "udp": str(udp)}


def _machine_busy() -> tuple[int, int]:
    """(busy, total) jiffies of all CPUs from /proc/stat."""
    with open("/proc/stat") as f:
        vals = [int(x) for x in f.readline().split()[1:]]
    idle = vals[3] + (vals[4] if len(vals) > 4 else 0)  # idle + iowait
    total = sum(vals[:8])  # guest time is already in user
    return total - idle, total


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


def _measure(topo: Topology, config: str, workload: str, rep: int, seconds: float,
             feeds: dict[str, str], tool_cpus: str | None = None) -> Sample:
    assert topo.a is not None and topo.b is not None
    a, b = _Pinned(topo.a, tool_cpus), _Pinned(topo.b, tool_cpus)
    runner = {"tcp1": lambda: _iperf(a, b, 1, seconds),
              "tcp4": lambda: _iperf(a, b, 4, seconds),
              "rr1": lambda: _rr(a, b, 1, seconds, feeds),
              "rr8": lambda: _rr(a, b, 8, seconds, feeds),
              "udp16": lambda: _udp(a, b, seconds, feeds)}[workload]
    return runner()(topo, config, workload, rep)


class _Meter:
    """CPU of the forwarder and of the machine between start() and stop() (the client's run,
    not the servers' start-up)."""

    def __init__(self, pids: list[int]) -> None:
        self.pids = pids
        self.forwarder = self.machine = 0.0
        self._t0 = 0.0
        self._c0 = 0.0
        self._m0 = (0, 0)

    def start(self) -> None:
        self._c0, self._m0, self._t0 = cpu_seconds(self.pids), _machine_busy(), time.monotonic()

    def stop(self) -> None:
        c1, (busy1, total1), wall = (cpu_seconds(self.pids), _machine_busy(),
                                     time.monotonic() - self._t0)
        busy0, total0 = self._m0
        self.forwarder = 100 * (c1 - self._c0) / wall if wall > 0 else 0.0
        self.machine = 100 * (busy1 - busy0) / (total1 - total0) if total1 > total0 else 0.0


# Each workload function returns a "measure" callable; its client runs between meter.start()
# and meter.stop().
Measure = Callable[[Topology, str, str, int], Sample]
Client = Callable[[_Meter], tuple[float, float, float | None]]


def _timed(client: Client) -> Measure:
    def measure(topo: Topology, config: str, workload: str, rep: int) -> Sample:
        meter = _Meter(topo.forwarder_pids())
        value, took, loss = client(meter)
        return Sample(config, workload, rep, value, took, meter.forwarder, meter.machine, loss)

    return measure


def _iperf(a: NetNamespace, b: NetNamespace, flows: int, seconds: float) -> Measure:
    def client(meter: _Meter) -> tuple[float, float, float | None]:
        argv = ["iperf3", "-s", "-1", "-B", B_IP, "-p", str(IPERF_PORT)]
        with _server(b, argv, "tcp", [IPERF_PORT]):
            meter.start()
            out = a.run(["iperf3", "-c", B_IP, "-p", str(IPERF_PORT), "-P", str(flows),
                         "-t", str(max(1, round(seconds))), "-J"],
                        check=False, timeout=seconds + 30)
            meter.stop()
        try:
            end = json.loads(out.stdout)["end"]["sum_received"]
            return float(end["bits_per_second"]), float(end["seconds"]), None
        except (ValueError, KeyError, TypeError):
            raise MqtunError(5, f"iperf3 failed: {(out.stdout + out.stderr)[-300:]}",
                             op="bench") from None

    return _timed(client)


def _sockperf_outputs(procs: list[subprocess.Popen[str]], meter: _Meter,
                      timeout: float) -> list[str]:
    """Wait for sockperf clients (killed after `timeout`), metering from the first one's
    "Starting test" to its "Test end" (it idles about 2 s before it starts)."""
    watchdog = threading.Timer(timeout, lambda: [p.kill() for p in procs])
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


def _rr(a: NetNamespace, b: NetNamespace, conns: int, seconds: float,
        feeds: dict[str, str]) -> Measure:
    def client(meter: _Meter) -> tuple[float, float, float | None]:
        with _server(b, ["sockperf", "server", "-f", feeds["tcp"], "-F", "e"], "tcp",
                     [RR_PORT]):
            argv = ["sockperf", "ping-pong", "--tcp", "--dontwarmup", "-i", B_IP,
                    "-p", str(RR_PORT), "-t", str(max(1, round(seconds))), "-m", "64"]
            procs = [a.popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                             text=True) for _ in range(conns)]
            outs = _sockperf_outputs(procs, meter, seconds + 30)
        rate, took = 0.0, 0.0
        for text in outs:
            m = _PP.search(text)
            if not m:
                raise MqtunError(5, f"sockperf ping-pong failed: {text[-300:]}", op="bench")
            run_s, received = float(m.group(1)), int(m.group(3))
            rate += received / run_s if run_s else 0.0
            took = max(took, run_s)
        return rate, took, None

    return _timed(client)


def _udp_counters(ns: NetNamespace) -> dict[str, int]:
    lines = [ln.split() for ln in ns.run(["cat", "/proc/net/snmp"]).stdout.splitlines()
             if ln.startswith("Udp:")]
    return dict(zip(lines[0][1:], map(int, lines[1][1:]), strict=False))


_TP = re.compile(r"Total of (\d+) messages sent in ([\d.]+) sec")


def _udp(a: NetNamespace, b: NetNamespace, seconds: float, feeds: dict[str, str]) -> Measure:
    def client(meter: _Meter) -> tuple[float, float, float | None]:
        ports = [UDP_BASE_PORT + i for i in range(UDP_FLOWS)]
        with _server(b, ["sockperf", "server", "-f", feeds["udp"], "-F", "e"], "udp", ports):
            rx0, tx0 = _udp_counters(b), _udp_counters(a)
            proc = a.popen(["sockperf", "throughput", "--dontwarmup", "-f", feeds["udp"],
                            "-F", "e", "-t", str(max(1, round(seconds))), "-m", "64"],
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            out = _sockperf_outputs([proc], meter, seconds + 30)[0]
            time.sleep(0.2)  # what is still in flight arrives
            rx1, tx1 = _udp_counters(b), _udp_counters(a)
        m = _TP.search(out)
        if not m:
            raise MqtunError(5, f"sockperf throughput failed: {out[-300:]}", op="bench")
        took = float(m.group(2))
        received = rx1["InDatagrams"] - rx0["InDatagrams"]
        sent = tx1["OutDatagrams"] - tx0["OutDatagrams"]
        loss = max(0.0, 1 - received / sent) if sent else 0.0
        return received / took if took else 0.0, took, loss

    return _timed(client)


# ---- reporting --------------------------------------------------------------------------------
def _fmt(v: float | None) -> str:
    if v is None:
        return "-"
    return f"{v:,.0f}" if v >= 100 else f"{v:.2f}" if v < 10 else f"{v:.1f}"


def _baseline(config: str) -> str:
    """What a row is compared with: python-pytun at the same queue count, or veth."""
    spec = CONFIGS[config]
    if spec.kind == "mqtun" and not spec.offload:
        return f"pytun-{spec.queues}q"
    return "veth"


@dataclass(frozen=True)
class Target:
    text: str
    measured: float | None
    goal: float
    strict: bool = False  # measured must exceed goal, not just reach it

    @property
    def status(self) -> str:
        if self.measured is None:
            return "not run"
        ok = self.measured > self.goal if self.strict else self.measured >= self.goal
        return "met" if ok else "missed"


def targets(r: BenchResult) -> list[Target]:
    """The project's goals, as ratios of this run's medians."""
    out = [Target("TCP stream 1 flow, mqtun-1q (offloads) / veth >= 0.8",
                  r.ratio("mqtun-1q", "veth", "tcp1"), 0.8)]
    for q in (1, 2):
        m, p = f"mqtun-{q}q-nooff", f"pytun-{q}q"
        out.append(Target(f"req/resp 8 conns, {m} / {p} >= 1.2", r.ratio(m, p, "rr8"), 1.2))
        out.append(Target(f"UDP pkt/s, {m} / {p} >= 1.2", r.ratio(m, p, "udp16"), 1.2))
        out.append(Target(f"req/resp 1 conn, {m} / {p} >= 2", r.ratio(m, p, "rr1"), 2.0))
    for tail in ("", "-nooff"):
        one, two = f"mqtun-1q{tail}", f"mqtun-2q{tail}"
        for wl in r.workloads:
            better = wl in ("tcp4", "rr8")
            out.append(Target(f"{WORKLOADS[wl].title}, {two} / {one} {'> 1' if better else '>= 1'}",
                              r.ratio(two, one, wl), 1.0, strict=better))
    return out


def render_markdown(r: BenchResult) -> str:
    """The report: speeds with spread and ratios, CPU, then the targets."""
    wls = [WORKLOADS[w] for w in r.workloads]
    load = (f" Load average before/after: {r.machine['loadavg_start']} / "
            f"{r.machine.get('loadavg_end', '?')}." if "loadavg_start" in r.machine else "")
    lines = [f"Medians of {r.repeat} run(s) of {r.seconds:g} s each; (min-max); "
             "x: ratio to the baseline of the same run (veth; for mqtun without offloads, "
             f"python-pytun with the same queues).{load}", ""]
    lines.append("| config | " + " | ".join(f"{w.title} ({w.unit})" for w in wls) + " |")
    lines.append("|---" * (len(wls) + 1) + "|")
    for c in r.configs:
        cells = []
        for w in wls:
            med, sp = r.median(c, w.key), r.spread(c, w.key)
            if med is None or sp is None:
                cells.append("-")
                continue
            base = _baseline(c)
            ratio = r.ratio(c, base, w.key) if base != c else None
            cell = (f"{_fmt(med / w.scale)} ({_fmt(sp[0] / w.scale)}-{_fmt(sp[1] / w.scale)})")
            if ratio is not None:
                cell += f" {ratio:.2f}x {'pytun' if base.startswith('pytun') else 'veth'}"
            if w.key == "udp16":
                loss = r.median(c, w.key, "loss")
                cell += f", loss {loss:.0%}" if loss is not None else ""
            cells.append(cell)
        lines.append(f"| {c} | " + " | ".join(cells) + " |")
    lines += ["", "CPU per run, medians: forwarder (% of one core) / machine (% of both cores).",
              ""]
    lines.append("| config | " + " | ".join(w.title for w in wls) + " |")
    lines.append("|---" * (len(wls) + 1) + "|")
    for c in r.configs:
        cells = []
        for w in wls:
            f, m = r.median(c, w.key, "forwarder_cpu"), r.median(c, w.key, "machine_cpu")
            cells.append("-" if f is None or m is None else f"{f:.0f}% / {m:.0f}%")
        lines.append(f"| {c} | " + " | ".join(cells) + " |")
    ts = [t for t in targets(r) if t.status != "not run"]
    if ts:
        lines += ["", "| target | measured | |", "|---|---|---|"]
        lines += [f"| {t.text} | {t.measured:.3f} | {t.status} |" for t in ts
                  if t.measured is not None]
    return "\n".join(lines) + "\n"


def write_chart(r: BenchResult, path: Path) -> None:
    """One bar chart per workload: medians with min-max error bars, configurations as bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    wls = [WORKLOADS[w] for w in r.workloads]
    fig, axes = plt.subplots(1, len(wls), figsize=(3.2 * len(wls) + 1, 4.2), squeeze=False)
    colors = {"veth": "#888888", "mqtun": "#1f77b4", "pytun": "#d62728"}
    for ax, w in zip(axes[0], wls, strict=True):
        meds, lo, hi, cols = [], [], [], []
        for c in r.configs:
            med, sp = r.median(c, w.key), r.spread(c, w.key)
            med = (med or 0.0) / w.scale
            sp = (sp[0] / w.scale, sp[1] / w.scale) if sp else (med, med)
            meds.append(med)
            lo.append(max(0.0, med - sp[0]))
            hi.append(max(0.0, sp[1] - med))
            spec = CONFIGS[c]
            cols.append(colors[spec.kind] if spec.offload or spec.kind != "mqtun"
                        else "#7fb3d9")
        x = list(range(len(r.configs)))
        ax.bar(x, meds, yerr=[lo, hi], color=cols, capsize=3)
        ax.set_xticks(x, r.configs, rotation=60, ha="right", fontsize=8)
        ax.set_title(w.title, fontsize=9)
        ax.set_ylabel(w.unit, fontsize=8)
        ax.tick_params(axis="y", labelsize=8)
    fig.suptitle(f"mqtun bench: medians of {r.repeat} x {r.seconds:g} s, bars min-max",
                 fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_report(r: BenchResult, out: Path) -> dict[str, Path]:
    """results.json, table.md and chart.png in `out`."""
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / "results.json", "table": out / "table.md", "chart": out / "chart.png"}
    summary = {c: {w: {"median": r.median(c, w), "spread": r.spread(c, w),
                       "forwarder_cpu": r.median(c, w, "forwarder_cpu"),
                       "machine_cpu": r.median(c, w, "machine_cpu"),
                       "loss": r.median(c, w, "loss")}
                   for w in r.workloads} for c in r.configs}
    paths["json"].write_text(json.dumps({
        "configs": r.configs, "workloads": r.workloads, "seconds": r.seconds,
        "repeat": r.repeat, "started": r.started, "machine": r.machine,
        "units": {w: WORKLOADS[w].unit for w in r.workloads},
        "summary": summary, "targets": [asdict(t) | {"status": t.status} for t in targets(r)],
        "samples": [asdict(s) for s in r.samples]}, indent=2))
    paths["table"].write_text(render_markdown(r))
    write_chart(r, paths["chart"])
    return paths
