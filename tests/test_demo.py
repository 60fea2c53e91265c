"""`mqtun demo` as a newcomer runs it: a short run end to end, and a clear refusal without root."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
from pathlib import Path

from nettools import cli_in_process, run_as

import mqtun
from mqtun.apps.demo import DemoResult, PhaseResult, render_demo
from mqtun.runtime.shm import list_regions

ROW = re.compile(r"^\s+(\d+)\s+([\d,]+)\s+([\d.]+)%\s+([\d,]+)$")


def _env() -> dict[str, str]:
    src = str(Path(mqtun.__file__).resolve().parents[1])
    return {**os.environ, "PYTHONPATH": src}


def _topology_namespaces() -> set[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, timeout=10)
    return {line.split()[0] for line in out.stdout.splitlines()
            if re.match(r"mqtun-[abf]-", line)}


def _forward_regions() -> set[str]:
    """Counters regions of live `mqtun forward` processes (other helpers' tunnels and tests on
    this machine make regions of other names)."""
    return {r.path for r in list_regions() if r.alive and r.name.startswith("forward")}


def test_demo_short_run_reports_every_queue_and_cleans_up() -> None:
    before_ns = _topology_namespaces()
    before_regions = _forward_regions()
    proc = subprocess.run([sys.executable, "-m", "mqtun", "demo", "--seconds", "2"],
                          capture_output=True, text=True, timeout=60, env=_env())
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    # the two phases, each with a header and one row per queue
    lines = out.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("TCP, "))
    assert all(line.startswith("mqtun demo: ") for line in lines[:start])  # progress
    blocks = [b for b in "\n".join(lines[start:]).split("\n\n") if b[:3] in ("TCP", "UDP")]
    assert [b[:3] for b in blocks] == ["TCP", "UDP"], out
    where = blocks[1].splitlines()[1:4]  # UDP: where the datagrams were lost
    found = [re.match(r"\s+(?:lost )?(before|in|after) mqtun\s+([\d.]+)%", ln) for ln in where]
    parts = [m for m in found if m]
    assert len(parts) == 3, where
    assert [m.group(1) for m in parts] == ["before", "in", "after"]
    lost = re.search(r"\(([\d.]+)% lost\)", blocks[1])
    assert lost, blocks[1]
    assert abs(sum(float(m.group(2)) for m in parts) - float(lost.group(1))) < 0.25, where
    blocks[1] = "\n".join(ln for ln in blocks[1].splitlines() if ln not in where)
    for block in blocks:
        lines = block.splitlines()
        assert re.search(r"[\d,]+ Mbit/s received", lines[0]), lines[0]
        assert lines[1].split() == ["queue", "packets", "share", "Mbit/s"]
        rows = [ROW.match(line) for line in lines[2:]]
        assert all(rows), lines[2:]
        assert [int(m.group(1)) for m in rows] == [0, 1]  # type: ignore[union-attr]
        packets = [int(m.group(2).replace(",", "")) for m in rows]  # type: ignore[union-attr]
        shares = [float(m.group(3)) for m in rows]  # type: ignore[union-attr]
        assert sum(packets) > 0, "the forwarder moved nothing"
        assert abs(sum(shares) - 100.0) < 0.2
    udp_header = blocks[1].splitlines()[0]
    m = re.search(r"([\d,]+) of ([\d,]+) datagrams", udp_header)
    assert m and 0 < int(m.group(1).replace(",", "")) <= int(m.group(2).replace(",", ""))
    # 16 UDP flows over 2 queues: all on one queue has probability 2 / 2**16
    udp_packets = [int(ROW.match(x).group(2).replace(",", ""))  # type: ignore[union-attr]
                   for x in blocks[1].splitlines()[2:]]
    assert all(udp_packets), "one queue carried no UDP flow"
    # nothing left behind: namespaces, counters regions
    assert _topology_namespaces() <= before_ns
    left = _forward_regions() - before_regions
    assert not left, left


def test_demo_refuses_without_root() -> None:
    code, out, err = run_as("nobody", lambda: cli_in_process(["demo", "--seconds", "1"]))
    assert code == 1
    assert err.count("\n") == 1 and "needs root" in err, err
    assert out == ""


def test_demo_interrupted_mid_traffic_removes_everything() -> None:
    before_ns = _topology_namespaces()
    before_regions = _forward_regions()
    proc = subprocess.Popen([sys.executable, "-m", "mqtun", "demo", "--seconds", "20"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=_env())
    watchdog = threading.Timer(30, proc.kill)
    watchdog.start()
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            if "TCP:" in line:  # the forwarder runs and traffic flows
                break
        assert _topology_namespaces() - before_ns, "the demo made no namespaces"
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=15)
    finally:
        watchdog.cancel()
        if proc.poll() is None:
            proc.kill()
            proc.wait(5)
    assert proc.returncode == 130, err[-500:]
    assert "Traceback" not in err
    assert _topology_namespaces() <= before_ns
    assert not (_forward_regions() - before_regions)


def test_demo_without_cap_net_admin_or_iproute2_says_so_in_one_line() -> None:
    """Root without CAP_NET_ADMIN (a container's usual root) and a PATH without iproute2: one
    line each naming what is missing, no traceback, nothing left behind."""
    before = _topology_namespaces()
    argv = [sys.executable, "-m", "mqtun", *["demo", "--seconds", "1"]]
    capless = subprocess.run(["setpriv", "--inh-caps=-net_admin", "--bounding-set=-net_admin",
                              *argv], capture_output=True, text=True, timeout=60, env=_env())
    assert capless.returncode == 1, capless.stderr[-2000:]
    assert capless.stderr.count("\n") == 1 and "CAP_NET_ADMIN" in capless.stderr, capless.stderr
    assert "--cap-add NET_ADMIN" in capless.stderr
    no_ip = subprocess.run(argv, capture_output=True, text=True, timeout=60,
                           env={**_env(), "PATH": "/nonexistent"})
    assert no_ip.returncode == 1, no_ip.stderr[-2000:]
    assert no_ip.stderr.count("\n") == 1 and "iproute2" in no_ip.stderr, no_ip.stderr
    assert _topology_namespaces() <= before


def test_demo_says_where_datagrams_were_lost() -> None:
    """The loss is split by the counters into before, in and after the forwarder, and each
    part names its evidence (sans-IO: a PhaseResult, no traffic)."""
    p = PhaseResult("UDP", 1.0, 0, sent_packets=1000, received_packets=800,
                    forwarder_read=950, forwarder_written=940, rcvbuf_errors=140, queue_full=50)
    assert p.lost_where() == (50, 10, 140)  # 50 + 10 + 140 == 1000 - 800
    text = render_demo(DemoResult(2, True, [p]))
    assert "before mqtun   5.0% (A's device queue overflowed 50 times" in text
    assert "in mqtun       1.0%" in text
    assert "after mqtun   14.0% (B's socket buffer overflowed 140 times)" in text
