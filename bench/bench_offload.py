"""Throughput of GSO split and GRO coalesce on one core, next to a plain copy of the same bytes.

    python3 bench/bench_offload.py [--seconds 2] [--json]
    python3 bench/bench_offload.py --compare OLD_TREE [--repeat 5]   # before/after ratios

`--compare` measures the packet code of another source tree (a directory holding src/mqtun,
e.g. `git archive main src | tar -x -C /tmp/old`) against this one on the same workload, in
alternating subprocesses, and reports the medians of the repetitions and their ratio: the
figure that holds on a shared, noisy machine.

The workload is the one a TSO queue produces: 64 KB TCP super-packets cut in 1448-byte
segments (IPv4 on TUN by default; --v6, --tap and --udp change the shape). Rates are payload
Gbit/s on a single core; "copy" is `memoryview.tobytes()` of the same 64 KB measured in the same
run, and the ratio says how many copies of the data each operation costs. The floor the
project set is 3 Gbit/s per core for split and for coalesce (with checksum verification).
Not a test: the suite never runs it.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

# MQTUN_BENCH_TREE: measure the packet code of another tree with this same workload (--compare)
sys.path.insert(
    0, os.path.join(os.environ.get("MQTUN_BENCH_TREE") or Path(__file__).parents[1], "src")
)

from mqtun._uapi import (
    VIRTIO_NET_HDR_F_NEEDS_CSUM,
    VIRTIO_NET_HDR_GSO_TCPV4,
    VIRTIO_NET_HDR_GSO_TCPV6,
    VIRTIO_NET_HDR_GSO_UDP_L4,
)
from mqtun.packet import VnetHeader, accel, coalesce, parse, pseudo_header_sum, split

checksum_module: Any = importlib.import_module("mqtun.packet.checksum")  # not the function
_OWN_TREE = str(Path(__file__).resolve().parents[1])

FLOOR_GBPS = 3.0
MSS = 1448


def super_packet(*, v6: bool, tap: bool, udp: bool) -> tuple[VnetHeader, bytes, int]:
    """A 64 KB super-packet as the kernel hands it out, its header, and its payload size."""
    l2 = bytes.fromhex("02000000000b02000000000a") + (b"\x86\xdd" if v6 else b"\x08\x00")
    l4_len = 8 if udp else 32  # TCP with the timestamp option, as Linux sends it
    ip_len = 40 if v6 else 20
    payload = os.urandom(65535 - ip_len - l4_len)
    proto = 17 if udp else 6
    if v6:
        src = bytes.fromhex("fd006d71" + "0" * 23 + "1")
        dst = bytes.fromhex("fd006d71" + "0" * 23 + "2")
        ip = (0x60000000).to_bytes(4, "big") + (l4_len + len(payload)).to_bytes(2, "big")
        ip += bytes([proto, 64]) + src + dst
    else:
        src, dst = bytes([198, 18, 0, 1]), bytes([198, 18, 0, 2])
        tot = ip_len + l4_len + len(payload)
        ip = bytes([0x45, 0]) + tot.to_bytes(2, "big") + bytes([0, 1, 0x40, 0, 64, proto, 0, 0])
        ip += src + dst
    if udp:
        l4 = (40000).to_bytes(2, "big") + (5001).to_bytes(2, "big")
        l4 += (8 + len(payload)).to_bytes(2, "big") + b"\0\0"
        kind, csum_off = VIRTIO_NET_HDR_GSO_UDP_L4, 6
    else:
        l4 = (40000).to_bytes(2, "big") + (5001).to_bytes(2, "big") + (1).to_bytes(4, "big")
        l4 += (1).to_bytes(4, "big") + bytes([0x80, 0x10]) + (500).to_bytes(2, "big") + bytes(4)
        l4 += bytes([1, 1, 8, 10]) + (11).to_bytes(4, "big") + (22).to_bytes(4, "big")
        kind = VIRTIO_NET_HDR_GSO_TCPV6 if v6 else VIRTIO_NET_HDR_GSO_TCPV4
        csum_off = 16
    raw = bytearray((l2 if tap else b"") + ip + l4 + payload)
    p = parse(raw, tap=tap)
    seed = pseudo_header_sum(p.src, p.dst, proto, p.end - p.l4_off)
    raw[p.l4_off + csum_off : p.l4_off + csum_off + 2] = seed.to_bytes(2, "big")
    hdr = VnetHeader(VIRTIO_NET_HDR_F_NEEDS_CSUM, kind, p.payload_off, MSS, p.l4_off, csum_off)
    return hdr, bytes(raw), len(payload)


def rate(fn: Callable[[], object], payload_bytes: int, seconds: float) -> dict[str, float]:
    """Best and median payload Gbit/s of `fn` over about `seconds` of repeated runs."""
    fn()  # warm caches (fold plans, struct formats)
    times: list[float] = []
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline or len(times) < 5:
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    best, median = min(times), statistics.median(times)
    return {
        "best_gbps": payload_bytes * 8 / best / 1e9,
        "median_gbps": payload_bytes * 8 / median / 1e9,
        "us_per_64k": median * 1e6,
        "runs": len(times),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=float, default=2.0, help="time per measurement")
    ap.add_argument("--v6", action="store_true")
    ap.add_argument("--tap", action="store_true")
    ap.add_argument("--udp", action="store_true")
    ap.add_argument("--json", action="store_true", help="print one JSON object")
    ap.add_argument("--compare", metavar="OLD_TREE", help="before/after against another tree")
    ap.add_argument("--repeat", type=int, default=5, help="--compare: repetitions of each side")
    ap.add_argument("--quick", action="store_true", help="split and coalesce only")
    args = ap.parse_args(argv)
    if args.compare:
        return compare(args)

    hdr, sp, payload = super_packet(v6=args.v6, tap=args.tap, udp=args.udp)
    segments = split(hdr, sp, tap=args.tap)
    assert len(segments) == -(-payload // MSS)
    (back_hdr, back), = coalesce(segments, tap=args.tap)  # fmt: skip
    assert split(back_hdr, back, tap=args.tap) == segments, "round trip broken"
    view = memoryview(sp)

    results = {"copy": rate(view.tobytes, payload, args.seconds)}
    # the default (the C loop when built, numpy's vectorized sums when installed), then
    # numpy without the C loop, then pure Python
    ways = [(checksum_module.VECTORIZE, accel.ACCELERATE, "")]
    if accel.ACCELERATE and accel.available() and checksum_module.VECTORIZE:
        ways.append((True, False, " (numpy, no C)"))
    if checksum_module.VECTORIZE or accel.ACCELERATE:
        ways.append((False, False, " (pure Python)"))
    for vectorize, accelerate, suffix in ways:
        if suffix and args.quick:
            break
        saved = checksum_module.VECTORIZE, accel.ACCELERATE
        checksum_module.VECTORIZE, accel.ACCELERATE = vectorize, accelerate
        try:
            results["split" + suffix] = rate(lambda: split(hdr, sp, tap=args.tap), payload,
                                             args.seconds)
            results["coalesce" + suffix] = rate(lambda: coalesce(segments, tap=args.tap),
                                                payload, args.seconds)
        finally:
            checksum_module.VECTORIZE, accel.ACCELERATE = saved
    if not args.quick:
        results["coalesce_noverify"] = rate(
            lambda: coalesce(segments, tap=args.tap, verify=False), payload, args.seconds
        )
    copy = results["copy"]["median_gbps"]
    for r in results.values():
        r["copy_ratio"] = copy / r["median_gbps"]
    shape = f"{'IPv6' if args.v6 else 'IPv4'} {'UDP' if args.udp else 'TCP'} "
    shape += f"{'TAP' if args.tap else 'TUN'}, 64 KB super-packets, {MSS}-byte segments"
    ok = all(results[k]["median_gbps"] >= FLOOR_GBPS for k in ("split", "coalesce"))
    if args.json:
        print(json.dumps({"shape": shape, "floor_gbps": FLOOR_GBPS, "ok": ok, **results}))
        return 0 if ok else 1
    sums = "numpy-vectorized" if checksum_module.numpy() else "pure-Python"
    print(f"checksum sums: {sums} (numpy {'present' if checksum_module.numpy() else 'absent'}); "
          f"C loop {'on' if accel.ACCELERATE and accel.available() else 'off'}")
    print(f"{shape}; payload Gbit/s on one core (median, best), copies of the data per op")
    for name, r in results.items():
        print(f"  {name:28s} {r['median_gbps']:7.2f} {r['best_gbps']:7.2f} Gbit/s"
              f"  {r['us_per_64k']:8.1f} us/64KB  {r['copy_ratio']:6.1f}x copy")  # fmt: skip
    print(f"floor {FLOOR_GBPS} Gbit/s for split and coalesce: {'met' if ok else 'NOT met'}")
    return 0 if ok else 1


def compare(args: argparse.Namespace) -> int:
    """Run this bench on OLD_TREE's code and on this tree's, alternating, `--repeat` times."""
    shape = [f for f in ("--v6", "--tap", "--udp") if getattr(args, f[2:])]
    cmd = [sys.executable, __file__, "--json", "--quick", "--seconds", str(args.seconds), *shape]
    sides = {"old": str(Path(args.compare).resolve()), "new": _OWN_TREE}
    runs: dict[str, dict[str, list[float]]] = {s: {"split": [], "coalesce": []} for s in sides}
    for rep in range(args.repeat):
        order = ("old", "new") if rep % 2 == 0 else ("new", "old")  # interleaved
        for side in order:
            env = dict(os.environ, MQTUN_BENCH_TREE=sides[side])
            out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
            r = json.loads(out.stdout)
            for op in ("split", "coalesce"):
                runs[side][op].append(r[op]["median_gbps"])
    print(f"{' '.join(cmd[1:])}; {args.repeat} interleaved repetitions, median Gbit/s")
    print(f"  old: {sides['old']}\n  new: {sides['new']}")
    for op in ("split", "coalesce"):
        old, new = (statistics.median(runs[s][op]) for s in ("old", "new"))
        print(f"  {op:9s} old {old:6.2f}  new {new:6.2f}  ratio {new / old:5.2f}x"
              f"   (old {' '.join(f'{v:.2f}' for v in runs['old'][op])};"
              f" new {' '.join(f'{v:.2f}' for v in runs['new'][op])})")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
