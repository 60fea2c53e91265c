"""`mqtun bench --short`: the whole pipeline on a subset, seconds not minutes.

Every configuration kind (veth, mqtun, python-pytun) and one workload of each tool family
(iperf3 stream, sockperf request/response, sockperf UDP) run once for 1 s; the report must have
every row and column of what ran, and the chart must be a PNG. No figure is asserted beyond
"something moved": timings are not test material.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

from nettools import cli_in_process, run_as

import mqtun
from mqtun.apps.bench import SHORT_CONFIGS, WORKLOADS

SHORT_WORKLOADS = ("tcp4", "rr8", "udp16")


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(Path(mqtun.__file__).resolve().parents[1])}


def _topology_namespaces() -> set[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, timeout=10)
    return {line.split()[0] for line in out.stdout.splitlines()
            if re.match(r"mqtun-[abf]-", line)}


def _table(md: str, first_header: str) -> list[list[str]]:
    """The markdown table whose header row starts with `first_header`, as rows of cells."""
    lines = md.splitlines()
    start = next(i for i, ln in enumerate(lines) if ln.startswith(f"| {first_header} |"))
    rows = []
    for ln in lines[start:]:
        if not ln.startswith("|"):
            break
        rows.append([c.strip() for c in ln.strip("|").split("|")])
    return [rows[0], *rows[2:]]  # header, then the body without the |---| line


def test_bench_short_writes_every_row_column_and_the_chart(tmp_path: Path) -> None:
    before = _topology_namespaces()
    out_dir = tmp_path / "results"
    proc = subprocess.run(
        [sys.executable, "-m", "mqtun", "bench", "--short", "--workloads",
         ",".join(SHORT_WORKLOADS), "--out", str(out_dir)],
        capture_output=True, text=True, timeout=120, env=_env())
    assert proc.returncode == 0, proc.stderr[-2000:]

    data = json.loads((out_dir / "results.json").read_text())
    assert data["configs"] == list(SHORT_CONFIGS) and data["workloads"] == list(SHORT_WORKLOADS)
    assert data["repeat"] == 1 and data["seconds"] == 1.0
    got = {(s["config"], s["workload"]) for s in data["samples"]}
    assert got == {(c, w) for c in SHORT_CONFIGS for w in SHORT_WORKLOADS}
    for s in data["samples"]:
        assert s["value"] > 0, s  # every tool's output was parsed into a figure
        assert 0 <= s["machine_cpu"] <= 100.5
        if s["config"] == "veth":
            assert s["forwarder_cpu"] == 0  # no forwarder process at all
        else:
            assert s["forwarder_cpu"] > 0, s
        if s["workload"] == "udp16":
            assert 0 <= s["loss"] < 1

    md = (out_dir / "table.md").read_text()
    assert md == proc.stdout.split("\nwritten: ")[0]  # what was printed is what was written
    titles = [f"{WORKLOADS[w].title} ({WORKLOADS[w].unit})" for w in SHORT_WORKLOADS]
    speed = _table(md, "config")
    assert speed[0] == ["config", *titles]
    assert [r[0] for r in speed[1:]] == list(SHORT_CONFIGS)
    for row in speed[1:]:
        assert len(row) == 1 + len(SHORT_WORKLOADS)
        assert all(re.match(r"[\d,.]+ \([\d,.]+-[\d,.]+\)", c) for c in row[1:]), row
        if row[0] != "veth":
            assert all(" veth" in c for c in row[1:]), row  # a ratio to the baseline
    cpu = [t for t in md.split("\n\n") if t.startswith("| config | TCP")][-1]
    cpu_rows = _table(cpu, "config")
    assert [r[0] for r in cpu_rows[1:]] == list(SHORT_CONFIGS)
    assert all(re.fullmatch(r"\d+% / \d+%", c) for r in cpu_rows[1:] for c in r[1:])

    png = (out_dir / "chart.png").read_bytes()
    assert png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) > 10_000
    assert _topology_namespaces() <= before, "namespaces left behind"


def test_bench_refuses_unknown_names_and_non_root(tmp_path: Path) -> None:
    code, _, err = cli_in_process(["bench", "--configs", "veth,nosuch", "--out", str(tmp_path)])
    assert code == 2 and "nosuch" in err and err.count("\n") == 1
    code, _, err = cli_in_process(["bench", "--workloads", "tcp9", "--out", str(tmp_path)])
    assert code == 2 and "tcp9" in err
    code, _, err = run_as("nobody",
                          lambda: cli_in_process(["bench", "--short", "--out", "/nonexistent"]))
    assert code == 1 and "needs root" in err and err.count("\n") == 1
    assert not list(tmp_path.iterdir())  # refused before anything was written


def test_bench_without_cap_net_admin_or_iproute2_says_so_in_one_line(tmp_path: Path) -> None:
    """Root without CAP_NET_ADMIN (a container's usual root) and a PATH without iproute2: one
    line each naming what is missing, no traceback, nothing left behind."""
    before = _topology_namespaces()
    argv = [sys.executable, "-m", "mqtun", *["bench", "--short", "--out", str(tmp_path)]]
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
