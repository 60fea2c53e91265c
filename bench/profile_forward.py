"""Where `mqtun forward`'s workers spend their time under one bench workload (py-spy).

    python bench/profile_forward.py [--workload udp16] [--seconds 6] [--queues 1]
                                    [--no-offload] [--idle] [--top 15]
                                    [--handler MODULE:NAME [--handler-batch]] [--coalesce]
                                    [--perf [--c]] [--mode MODE]

Builds the bench's topology (namespaces A and B, `mqtun forward` in F), runs the workload
with the bench's own client, and samples every worker with `py-spy record --nonblocking`
(pip install py-spy) while it runs. Prints the functions with the most samples where they are
the innermost Python frame ("self": time spent in that function's own code, or in the C call
it is making, such as os.write) and inclusive of callees, in % of the worker's samples.
Without --idle, py-spy leaves out samples of a thread that waits in the kernel (epoll, a
blocking read), so the percentages are of the time the worker was on CPU. Root only.

With --perf, `perf record -e cpu-clock -g` (Debian's linux-perf; the software clock, which
works where a VM has no hardware counters) samples instead, kernel included: the share of
the kernel, of Python and of each C library, and the symbols with the most samples. --c
profiles the bench's C forwarder the same way (the like-for-like baseline).
"""

from __future__ import annotations

import argparse
import collections
import linecache
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import mqtun
from mqtun.apps.bench import WORKLOADS, build_c_forwarder, feed_files, measure
from mqtun.apps.topology import ForwarderSpec, Topology

_FRAME = re.compile(r"^(?P<func>.*?) \((?P<file>[^:()]+)(?::(?P<line>\d+))?\)$")
_SRC = Path(mqtun.__file__).resolve().parents[1]


def _name(frame: str) -> str:
    """`readinto (mqtun/queue.py:123)` -> `queue.py:readinto` (lines merged)."""
    m = _FRAME.match(frame.strip())
    if not m:
        return frame.strip()
    return f"{Path(m.group('file')).name}:{m.group('func')}"


def _line(frame: str) -> str:
    """`drain (mqtun/runtime/loop.py:247)` -> `loop.py:247 drain: k = readinto(view)`."""
    m = _FRAME.match(frame.strip())
    if not m or not m.group("line"):
        return frame.strip()
    path, no = Path(m.group("file")), int(m.group("line"))
    text = ""
    for candidate in (path, _SRC / path, _SRC.parent / path):
        if candidate.is_file():
            text = linecache.getline(str(candidate), no).strip()
            break
    return f"{path.name}:{no} {m.group('func')}: {text}"


def summarize(raw: str, top: int) -> str:
    """py-spy's raw (collapsed) stacks as two top-N tables: self and inclusive, in %."""
    self_count: collections.Counter[str] = collections.Counter()
    self_line: collections.Counter[str] = collections.Counter()
    incl: collections.Counter[str] = collections.Counter()
    total = 0
    for line in raw.splitlines():
        stack, _, n = line.rpartition(" ")
        if not stack or not n.isdigit():
            continue
        count = int(n)
        raw_frames = [f for f in stack.split(";")
                      if f.strip() and not f.strip().startswith(("process ", "thread "))]
        frames = [_name(f) for f in raw_frames]
        if not frames:
            continue
        total += count
        self_count[frames[-1]] += count
        self_line[_line(raw_frames[-1])] += count
        for f in set(frames):
            incl[f] += count
    if not total:
        return "no samples (was the worker idle the whole time? try --idle)\n"
    out = [f"{total} samples", "", "self %  function (innermost Python frame)"]
    out += [f"{100 * c / total:5.1f}  {f}" for f, c in self_count.most_common(top)]
    out += ["", "self %  line (the C call a line makes is charged to it)"]
    out += [f"{100 * c / total:5.1f}  {f}" for f, c in self_line.most_common(top)]
    out += ["", "incl %  function (with its callees)"]
    out += [f"{100 * c / total:5.1f}  {f}" for f, c in incl.most_common(top)]
    return "\n".join(out) + "\n"


def perf_summary(data: Path, top: int) -> str:
    """perf's samples as two top-N tables: per binary (the kernel, Python, each C
    library) and per symbol, in % of the workers' samples."""
    out = []
    for sort, title in (("dso", "binary"), ("dso,sym", "binary and symbol")):
        rep = subprocess.run(["perf", "report", "-i", str(data), "--no-children", "--sort",
                              sort, "--stdio", "-g", "none"], capture_output=True, text=True,
                             timeout=300, check=False).stdout
        rows = [ln.strip() for ln in rep.splitlines() if ln.strip().endswith(tuple(
            "abcdefghijklmnopqrstuvwxyz0123456789_]")) and "%" in ln and not ln.startswith("#")]
        out += [f"%       {title}", *rows[:top], ""]
    return "\n".join(out)


def _user_system(pid: int) -> tuple[float, float]:
    """utime and stime of a process, in seconds."""
    with open(f"/proc/{pid}/stat", "rb") as f:
        stat = f.read()
    fields = stat[stat.rfind(b")") + 2:].split()
    tick = os.sysconf("SC_CLK_TCK")
    return int(fields[11]) / tick, int(fields[12]) / tick


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--workload", default="udp16", choices=list(WORKLOADS))
    ap.add_argument("--seconds", type=float, default=6.0, help="sampling time (6)")
    ap.add_argument("--queues", type=int, default=1)
    ap.add_argument("--no-offload", action="store_true")
    ap.add_argument("--idle", action="store_true", help="also samples that wait in the kernel")
    ap.add_argument("--top", type=int, default=15)
    ap.add_argument("--handler", metavar="MODULE:NAME",
                    help="profile `forward --handler` (e.g. mqtun.apps.handlers:identity)")
    ap.add_argument("--handler-batch", action="store_true")
    co = ap.add_mutually_exclusive_group()
    co.add_argument("--coalesce", dest="coalesce", action="store_true", default=None)
    co.add_argument("--no-coalesce", dest="coalesce", action="store_false")
    ap.add_argument("--pytun", choices=("python-pytun", "compat"),
                    help="profile the python-pytun forwarder instead, on that library or on "
                         "mqtun.compat.pytun (no offloads)")
    ap.add_argument("--perf", action="store_true",
                    help="sample with perf (kernel included) instead of py-spy")
    ap.add_argument("--c", action="store_true",
                    help="with --perf: profile the bench's C forwarder instead")
    ap.add_argument("--mode", help="mqtun forward --mode (default: its default)")
    args = ap.parse_args()
    if args.c and not args.perf:
        ap.error("--c needs --perf (py-spy sees only Python)")
    if args.perf and not shutil.which("perf"):
        print("profile_forward: --perf needs perf (apt-get install linux-perf)", file=sys.stderr)
        return 2
    if not args.perf and not shutil.which("py-spy"):
        print("profile_forward: needs py-spy (pip install py-spy)", file=sys.stderr)
        return 2
    if args.c:
        binary, why = build_c_forwarder(Path(tempfile.mkdtemp(prefix="mqtun-prof-c-")))
        if binary is None:
            print(f"profile_forward: {why}", file=sys.stderr)
            return 2
        spec = ForwarderSpec("c", args.queues, offload=not args.no_offload, program=str(binary))
    elif args.pytun:
        spec = ForwarderSpec("pytun", args.queues, offload=False,
                             compat=args.pytun == "compat")
    else:
        spec = ForwarderSpec("mqtun", args.queues, offload=not args.no_offload,
                             handler=args.handler, handler_batch=args.handler_batch,
                             coalesce=args.coalesce, mode=args.mode)
    with tempfile.TemporaryDirectory(prefix="mqtun-prof-") as tmp, Topology(spec) as topo:
        assert topo.proc is not None
        workers = [p for p in topo.forwarder_pids() if p != topo.proc.pid] or [topo.proc.pid]
        feeds = feed_files(Path(tmp))
        run_for = args.seconds + 4  # sockperf idles ~2 s before it sends
        load = threading.Thread(target=measure, args=(topo, "profile", args.workload, 0,
                                                      run_for, feeds), daemon=True)
        load.start()
        time.sleep(2.5)
        outs = [Path(tmp) / f"{pid}.txt" for pid in workers]
        t0, cpu0 = time.monotonic(), [_user_system(pid) for pid in workers]
        report = ""
        if args.perf:
            data = Path(tmp) / "perf.data"
            subprocess.run(["perf", "record", "-q", "-e", "cpu-clock", "-F", "4999", "-g",
                            "-o", str(data), "-p", ",".join(map(str, workers)), "--",
                            "sleep", str(args.seconds)], check=False, timeout=args.seconds + 60)
        spies = [] if args.perf else [
            subprocess.Popen(["py-spy", "record", "--nonblocking", "-r", "250", "-f", "raw",
                              "-d", str(max(1, round(args.seconds))), "-p", str(pid),
                              "-o", str(out), *(["--idle"] if args.idle else [])],
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
            for pid, out in zip(workers, outs, strict=True)]
        for spy in spies:
            _, err = spy.communicate(timeout=args.seconds + 30)
            if spy.returncode != 0:
                print(f"profile_forward: py-spy failed: {err.strip()[-300:]}", file=sys.stderr)
        wall = time.monotonic() - t0
        cpu1 = [_user_system(pid) for pid in workers]
        user = sum(b[0] - a[0] for a, b in zip(cpu0, cpu1, strict=True))
        system = sum(b[1] - a[1] for a, b in zip(cpu0, cpu1, strict=True))
        load.join(run_for + 30)
        raw = "\n".join(o.read_text() for o in outs if o.exists())
        if args.perf:
            report = perf_summary(Path(tmp) / "perf.data", args.top)
    if args.c:
        print(f"C forwarder, {args.queues} queue(s), workload {args.workload}, "
              f"workers {workers}")
    else:
        print(f"mqtun forward --queues {args.queues}{' --no-offload' if args.no_offload else ''}, "
          f"workload {args.workload} ({WORKLOADS[args.workload].title}), workers {workers}")
    print(f"worker CPU while sampled: user {100 * user / wall:.0f}% + system "
          f"{100 * system / wall:.0f}% of one core "
          f"({'perf' if args.perf else 'py-spy'}'s own reads included)")
    print(report if args.perf else summarize(raw, args.top), end="")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
