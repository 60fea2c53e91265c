"""Where `mqtun tunnel vxlan`'s workers spend their time under iperf3 TCP (py-spy).

    sudo python3 bench/profile_tunnel.py [--queues 1] [--flows 1] [--reverse] [--seconds 6]
                                         [--idle] [--top 15]

Builds bench_tunnel's topology (mqtun on the left, the kernel's VXLAN on the right), runs
iperf3 from the left (TAP -> socket: split, encapsulate, UDP GSO send) or with --reverse to
the left (socket -> TAP: UDP GRO receive, check, coalesce, TAP write), and samples every
worker with `py-spy record --nonblocking` meanwhile. The tables are profile_forward's: the
innermost Python frame ("self", the C call a line makes charged to it) and inclusive, in %
of the worker's samples (on-CPU only unless --idle). Root only; not a test.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_tunnel
from profile_forward import _user_system, summarize


def _workers(pid: int) -> list[int]:
    with open(f"/proc/{pid}/task/{pid}/children") as f:
        return [int(x) for x in f.read().split()]


def _tap_frames(s: bench_tunnel.Setup) -> tuple[int, int]:
    """(frames the workers read from the TAP, frames they wrote to it) so far."""
    out = s.left.run(["ip", "-s", "-j", "link", "show", "vx0"], check=False).stdout
    st = json.loads(out)[0]["stats64"]
    return int(st["tx"]["packets"]), int(st["rx"]["packets"])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--queues", type=int, default=1)
    ap.add_argument("--flows", type=int, default=1)
    ap.add_argument("--reverse", action="store_true", help="iperf3 -R: socket -> TAP")
    ap.add_argument("--seconds", type=float, default=6.0, help="sampling time (6)")
    ap.add_argument("--idle", action="store_true", help="also samples that wait in the kernel")
    ap.add_argument("--top", type=int, default=15)
    args = ap.parse_args()
    if not shutil.which("py-spy"):
        print("profile_tunnel: needs py-spy (pip install py-spy)", file=sys.stderr)
        return 2
    s = bench_tunnel.setup(f"mqtun-{args.queues}q", 9)
    try:
        assert s.tunnel is not None
        workers = _workers(s.tunnel.pid)
        run_for = args.seconds + 3
        argv = ["iperf3", "-c", s.server, "-t", str(run_for), "-P", str(args.flows), "-J"]
        if args.reverse:
            argv.append("-R")
        result: dict[str, str] = {}

        def load() -> None:
            result["out"] = s.left.run(argv, check=False, timeout=run_for + 30).stdout

        thread = threading.Thread(target=load, daemon=True)
        thread.start()
        time.sleep(1.5)
        with tempfile.TemporaryDirectory(prefix="mqtun-prof-") as tmp:
            outs = [Path(tmp) / f"{pid}.txt" for pid in workers]
            t0, cpu0 = time.monotonic(), [_user_system(pid) for pid in workers]
            frames0 = _tap_frames(s)
            spies = [subprocess.Popen(["py-spy", "record", "--nonblocking", "-r", "250", "-f",
                                       "raw", "-d", str(max(1, round(args.seconds))), "-p",
                                       str(pid), "-o", str(out),
                                       *(["--idle"] if args.idle else [])],
                                      stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                      text=True)
                     for pid, out in zip(workers, outs, strict=True)]
            for spy in spies:
                _, err = spy.communicate(timeout=args.seconds + 30)
                if spy.returncode != 0:
                    print(f"profile_tunnel: py-spy failed: {err.strip()[-300:]}",
                          file=sys.stderr)
            wall = time.monotonic() - t0
            cpu1 = [_user_system(pid) for pid in workers]
            frames1 = _tap_frames(s)
            raw = "\n".join(o.read_text() for o in outs if o.exists())
        thread.join(run_for + 30)
    finally:
        s.close()
    user = sum(b[0] - a[0] for a, b in zip(cpu0, cpu1, strict=True))
    system = sum(b[1] - a[1] for a, b in zip(cpu0, cpu1, strict=True))
    gbps = 0.0
    with contextlib.suppress(ValueError, KeyError):
        gbps = json.loads(result.get("out", ""))["end"]["sum_received"]["bits_per_second"] / 1e9
    way = "socket -> TAP (iperf3 -R)" if args.reverse else "TAP -> socket"
    print(f"mqtun tunnel vxlan --queues {args.queues}, {args.flows} TCP flow(s), {way}: "
          f"{gbps:.2f} Gbit/s, workers {workers}")
    print(f"worker CPU while sampled: user {100 * user / wall:.0f}% + system "
          f"{100 * system / wall:.0f}% of one core (py-spy's own reads included)")
    read, written = (b - a for a, b in zip(frames0, frames1, strict=True))
    frames = written if args.reverse else read
    if frames:
        print(f"per TAP frame {'written' if args.reverse else 'read'} ({frames} frames, "
              f"{read} read, {written} written): user {1e6 * user / frames:.1f} us + "
              f"system {1e6 * system / frames:.1f} us of worker CPU")
    print(summarize(raw, args.top), end="")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
