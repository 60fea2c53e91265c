"""A tunnel worker's own work per TSO super-frame, TAP -> socket, without the syscalls.

    python3 bench/bench_encap.py [--repeat 7] [--seconds 1] [--mss 1398]

One 64 KB TCP super-frame as the TAP hands it out (IPv4, Ethernet, NEEDS_CSUM, the MSS the
bench topology's 1450-byte MTU gives with timestamps), made ready for UDP GSO sends behind the
VXLAN header, two ways, interleaved in one run (medians of `--repeat` rounds):

- ``lists``: `packet.split` into per-segment bytes, a (header, segment) pair each, and the
  gathered buffer list of each UDP_SEGMENT send (`gso_runs`): what the worker did up to
  session 2;
- ``train``: `packet.gso.split_train` (every datagram a row of one buffer, the header in
  front) and the slices of each UDP_SEGMENT send (`UdpEndpoint.send_train`'s cut): now, with
  the C segmentation loop where it is built (`mqtun.packet.accel`);
- ``train-numpy``: the same with the C loop off (numpy), where the tree has it.

Both include the outer source port (the inner flow's hash). MQTUN_BENCH_TREE=DIR measures the
code of another tree (a directory holding src/mqtun; ``lists`` only where it has no
split_train). Not a test: the suite never runs it.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(
    0, os.path.join(os.environ.get("MQTUN_BENCH_TREE") or Path(__file__).parents[1], "src")
)

from mqtun import _uapi
from mqtun.packet import VnetHeader, gso, parse, pseudo_header_sum, split, vxlan
from mqtun.runtime.sockets import gso_runs

_MAX_UDP = 65535 - 20 - 8


def super_frame(mss: int) -> tuple[VnetHeader, bytes]:
    eth = bytes.fromhex("02000000000b02000000000a0800")
    tcp_len, payload = 32, bytes(range(256)) * 254  # 65024 bytes
    tot = 20 + tcp_len + len(payload)
    ip = bytes([0x45, 0]) + tot.to_bytes(2, "big") + bytes([0, 7, 0x40, 0, 64, 6, 0, 0])
    ip += bytes([198, 19, 0, 1, 198, 19, 0, 2])
    tcp = (40000).to_bytes(2, "big") + (5201).to_bytes(2, "big") + (1).to_bytes(4, "big")
    tcp += (1).to_bytes(4, "big") + bytes([0x80, 0x18]) + (500).to_bytes(2, "big") + bytes(4)
    tcp += bytes([1, 1, 8, 10]) + (11).to_bytes(4, "big") + (22).to_bytes(4, "big")
    raw = bytearray(eth + ip + tcp + payload)
    p = parse(raw, tap=True)
    seed = pseudo_header_sum(p.src, p.dst, 6, p.end - p.l4_off)
    raw[p.l4_off + 16 : p.l4_off + 18] = seed.to_bytes(2, "big")
    hdr = VnetHeader(_uapi.VIRTIO_NET_HDR_F_NEEDS_CSUM, _uapi.VIRTIO_NET_HDR_GSO_TCPV4,
                     p.payload_off, mss, p.l4_off, 16)
    return hdr, bytes(raw)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeat", type=int, default=7)
    ap.add_argument("--seconds", type=float, default=1.0, help="per way and round")
    ap.add_argument("--mss", type=int, default=1398)
    args = ap.parse_args()
    hdr, frame = super_frame(args.mss)
    head = vxlan.header(42)

    def lists() -> int:
        mv = memoryview(frame)
        segments = split(hdr, mv, tap=True)
        vxlan.source_port(vxlan.flow_hash(segments[0]))
        datagrams = [(head, s) for s in segments]
        sizes = [8 + len(s) for s in segments]
        sends = 0
        for start, count, _size in gso_runs(sizes):
            parts = [b for d in datagrams[start : start + count] for b in d]
            sends += len(parts) > 0
        return sends

    def train() -> int:
        mv = memoryview(frame)
        t = gso.split_train(hdr, mv, tap=True, prefix=head)
        vxlan.source_port(vxlan.flow_hash(mv))
        body, size = memoryview(t.body), t.size
        per = min(_uapi.UDP_MAX_SEGMENTS, _MAX_UDP // size)
        sends = 0
        for i in range(0, t.count, per):
            sends += len([body[i * size : min(i + per, t.count) * size]])
        return sends

    ways: dict[str, Callable[[], int]] = {"lists": lists}
    if hasattr(gso, "split_train"):
        assert [head + s for s in split(hdr, frame, tap=True)] \
            == gso.split_train(hdr, frame, tap=True, prefix=head).packets()
        ways["train"] = train
    accel = getattr(gso, "accel", None)
    if accel is not None and accel.available():

        def train_numpy() -> int:
            accel.ACCELERATE = False
            try:
                return train()
            finally:
                accel.ACCELERATE = True

        ways["train-numpy"] = train_numpy
    per_frame: dict[str, list[float]] = {k: [] for k in ways}
    for _ in range(args.repeat):
        for name, fn in ways.items():
            fn()
            n, t0 = 0, time.perf_counter()
            while time.perf_counter() - t0 < args.seconds:
                fn()
                n += 1
            per_frame[name].append((time.perf_counter() - t0) / n * 1e6)
    med = {k: statistics.median(v) for k, v in per_frame.items()}
    nseg = len(split(hdr, frame, tap=True))
    print(f"64 KB TCP super-frame, {nseg} segments of {args.mss} bytes behind VXLAN; medians "
          f"of {args.repeat} interleaved rounds, us of one core per super-frame")
    for k, v in med.items():
        print(f"  {k:11s} {v:7.1f} us  ({' '.join(f'{x:.1f}' for x in per_frame[k])})")
    if "train" in med:
        print(f"  train / lists: {med['train'] / med['lists']:.2f}x the time")
    if "train-numpy" in med:
        print(f"  train / train-numpy: {med['train'] / med['train-numpy']:.2f}x the time")
    return 0


if __name__ == "__main__":
    sys.exit(main())
