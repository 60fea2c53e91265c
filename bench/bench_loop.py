#!/usr/bin/env python3
"""Which I/O loop mode moves packets fastest? Packets/s and request/response latency per mode.

Topology (all in namespaces this script makes and removes; root needed):

    ns A: tun 198.18.1.1 <-> [ns F: one WorkerPool.forward worker] <-> ns B: tun 198.18.1.2

For each loop mode, with the worker pinned to one CPU and the traffic tools to the other:
  - pps: a sockperf UDP flood (64-byte datagrams) A -> B for --seconds; the rate is what the
    forwarder actually wrote to B (its shared-memory counters), not what the sender offered;
  - latency: sockperf UDP ping-pong A <-> B (sockperf prints half the round trip);
  - tcp: iperf3 A -> B (with offloads on, TSO super-packets pass through whole).
Each figure is also given as a ratio to the baseline mode (`naive`) of the same run.

    python3 bench/bench_loop.py [--modes naive,epoll,adaptive,adaptive:200,busy,uring]
                                [--seconds 2] [--repeat 1] [--no-offload] [--spin-us 50]
                                [--json FILE]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from mqtun import Device
from mqtun.apps.forward import negotiate_offloads
from mqtun.netns import NetNamespace
from mqtun.runtime.loop import MODES, LoopConfig, uring_available
from mqtun.runtime.workers import WorkerPool

A_IP, B_IP = "198.18.1.1", "198.18.1.2"
WORKER_CPU, TOOL_CPU = 1, 0


def _pin(cmd: list[str]) -> list[str]:
    return ["taskset", "-c", str(TOOL_CPU), *cmd] if os.cpu_count() and os.cpu_count() > 1 else cmd


def _sockperf_server(ns: NetNamespace) -> subprocess.Popen[str]:
    p = ns.popen(_pin(["sockperf", "server", "-i", B_IP, "-p", "11111"]),
                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, text=True)
    time.sleep(0.3)
    return p


def measure(mode: str, args: argparse.Namespace, spin_us: int) -> dict[str, float]:
    f, a, b = (NetNamespace.create(prefix="mqb-") for _ in range(3))
    pool = None
    devs: list[Device] = []
    procs: list[subprocess.Popen[str]] = []
    try:
        with f.enter():
            offload = not args.no_offload
            devs = [Device.create(n, 1, vnet_hdr=offload) for n in ("bencha", "benchb")]
            if offload:
                negotiate_offloads(devs)
            for d in devs:
                d.link.set_txqueuelen(1000)
            pool = WorkerPool.forward(devs[0], devs[1], name="bench",
                                      loop=LoopConfig(mode=mode, spin_us=spin_us),
                                      cpus=[WORKER_CPU] if (os.cpu_count() or 1) > 1 else None)
            pool.start()
            for d, ns, ip in ((devs[0], a, A_IP), (devs[1], b, B_IP)):
                d.link.move_to_netns(ns.name)
                ns.run(["ip", "addr", "add", f"{ip}/24", "dev", d.name])
                ns.run(["ip", "link", "set", d.name, "up"])
        out: dict[str, float] = {}
        procs.append(_sockperf_server(b))
        # --- throughput: what the forwarder wrote to B per second
        w = pool.workers[0]
        before = w.queues[1].stats.written_packets
        t0 = time.perf_counter()
        a.run(_pin(["sockperf", "throughput", "-i", B_IP, "-p", "11111", "-t", str(args.seconds),
                    "-m", "64"]), timeout=args.seconds + 20)
        dt = time.perf_counter() - t0
        out["pps"] = (w.queues[1].stats.written_packets - before) / dt
        # --- request/response latency
        pp = a.run(_pin(["sockperf", "ping-pong", "-i", B_IP, "-p", "11111", "-t",
                         str(args.seconds), "-m", "64"]), timeout=args.seconds + 20)
        text = re.sub(r"\x1b\[[0-9;]*m", "", pp.stdout + pp.stderr)
        m = re.search(r"avg-latency=([\d.]+)", text)
        out["lat_avg_us"] = float(m.group(1)) if m else float("nan")
        for pct, key in (("50.000", "lat_p50_us"), ("99.000", "lat_p99_us")):
            m = re.search(rf"percentile {re.escape(pct)} =\s+([\d.]+)", text)
            out[key] = float(m.group(1)) if m else float("nan")
        # --- TCP bulk
        srv = b.popen(_pin(["iperf3", "-s", "-1", "-B", B_IP]), stdout=subprocess.DEVNULL,
                      stderr=subprocess.DEVNULL, text=True)
        procs.append(srv)
        time.sleep(0.3)
        ip = a.run(_pin(["iperf3", "-c", B_IP, "-t", str(args.seconds), "-J"]), check=False,
                   timeout=args.seconds + 20)
        try:
            out["tcp_gbps"] = json.loads(ip.stdout)["end"]["sum_received"]["bits_per_second"] / 1e9
        except (ValueError, KeyError):
            out["tcp_gbps"] = float("nan")
        st = pool.workers[0].stats
        out["drops"] = float(st[0].dropped_total + st[1].dropped_total)
        return out
    finally:
        for p in procs:
            with contextlib.suppress(Exception):
                p.kill()
                p.wait(5)
        if pool is not None:
            pool.stop()
        for d in devs:
            with contextlib.suppress(Exception):
                d.delete()
        for ns in (a, b, f):
            ns.delete()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--modes", default=",".join(m for m in MODES if m != "uring"
                                                 or uring_available()))
    ap.add_argument("--seconds", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=1)
    ap.add_argument("--spin-us", type=int, default=50)
    ap.add_argument("--no-offload", action="store_true")
    ap.add_argument("--json", help="also write the results here")
    args = ap.parse_args()
    if os.geteuid() != 0:
        print("bench_loop needs root (it makes namespaces and devices)", file=sys.stderr)
        return 1
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    if "naive" not in modes:
        modes.insert(0, "naive")
    results: dict[str, list[dict[str, float]]] = {m: [] for m in modes}
    for _ in range(args.repeat):  # interleaved, so a noisy moment hits every mode alike
        for mode in modes:
            name, _, spin = mode.partition(":")  # "adaptive:200" = 200 us of spinning
            results[mode].append(measure(name, args, int(spin) if spin else args.spin_us))
    med = {m: {k: statistics.median(r[k] for r in rs) for k in rs[0]} for m, rs in results.items()}
    base = med["naive"]
    print(f"{'mode':12} {'pps':>9} {'x':>5} {'lat avg':>8} {'x':>5} {'p50':>7} {'p99':>7} "
          f"{'tcp Gb/s':>8} {'x':>5} {'drops':>7}")
    for m, r in med.items():
        print(f"{m:12} {r['pps']:9.0f} {r['pps'] / base['pps']:5.2f} {r['lat_avg_us']:8.1f} "
              f"{r['lat_avg_us'] / base['lat_avg_us']:5.2f} {r['lat_p50_us']:7.1f} "
              f"{r['lat_p99_us']:7.1f} {r['tcp_gbps']:8.2f} "
              f"{r['tcp_gbps'] / base['tcp_gbps']:5.2f} {r['drops']:7.0f}")
    print("latency: sockperf UDP ping-pong, half round trip, microseconds; x: ratio to naive")
    if args.json:
        Path(args.json).write_text(json.dumps({"median": med, "runs": results,
                                               "args": vars(args)}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
