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

import pytest
from nettools import cli_in_process, run_as

import mqtun
from mqtun.apps.bench import (
    CONFIGS,
    SHORT_CONFIGS,
    SPARSE_RATE,
    WORKLOADS,
    BenchResult,
    Sample,
    render_markdown,
    targets,
    write_chart,
)

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


@pytest.fixture(scope="module")
def short_run(tmp_path_factory: pytest.TempPathFactory,
              ) -> tuple[subprocess.CompletedProcess[str], Path, set[str]]:
    """One `mqtun bench --short` run (the slowest step of the suite) for the tests that read
    its output: (the process, its --out directory, the namespaces there were before it)."""
    before = _topology_namespaces()
    out_dir = tmp_path_factory.mktemp("bench") / "results"
    proc = subprocess.run(
        [sys.executable, "-m", "mqtun", "bench", "--short", "--workloads",
         ",".join(SHORT_WORKLOADS), "--out", str(out_dir)],
        capture_output=True, text=True, timeout=240, env=_env())
    return proc, out_dir, before


def test_bench_short_writes_every_row_column_and_the_chart(
        short_run: tuple[subprocess.CompletedProcess[str], Path, set[str]]) -> None:
    proc, out_dir, before = short_run
    assert proc.returncode == 0, proc.stderr[-2000:]
    # progress: a line per step with the time left
    steps = [ln for ln in proc.stderr.splitlines() if re.match(r"\[\s*\d+/\d+\] ~", ln)]
    assert len(steps) == len(SHORT_CONFIGS) * len(SHORT_WORKLOADS), proc.stderr
    assert all(" left " in ln for ln in steps)

    data = json.loads((out_dir / "results.json").read_text())
    assert data["configs"] == list(SHORT_CONFIGS) and data["workloads"] == list(SHORT_WORKLOADS)
    assert data["repeat"] == 1 and data["seconds"] == 1.0 and data["skipped"] == []
    got = {(s["config"], s["workload"]) for s in data["samples"]}
    assert got == {(c, w) for c in SHORT_CONFIGS for w in SHORT_WORKLOADS}
    for s in data["samples"]:
        assert s["value"] > 0, s  # every tool's output was parsed into a figure
        assert 0 <= s["machine_cpu"] <= 100.5
        if s["config"] == "veth":
            assert s["forwarder_cpu"] == 0 and s["cpu_us_per_packet"] is None
        else:
            assert s["forwarder_cpu"] > 0 and s["forwarded"] > 0, s
            assert s["cpu_us_per_packet"] > 0, s
        if s["workload"] == "udp16":
            assert 0 <= s["loss"] < 1
            lost = s["lost_before"] + s["lost_in"] + s["lost_after"]
            # the parts add up to the loss (other packets, an ARP on veth, may blur it a little)
            assert abs(lost - (s["sent"] - s["count"])) <= 10 + s["sent"] // 100, s
        if s["workload"].startswith("rr"):
            assert 0 < s["p50_us"] <= s["p99_us"], s

    md = (out_dir / "table.md").read_text()
    assert md == proc.stdout.split("\nwritten: ")[0]  # what was printed is what was written
    titles = [f"{WORKLOADS[w].title} ({WORKLOADS[w].unit})" for w in SHORT_WORKLOADS]
    speed = _table(md, "config")
    assert speed[0] == ["config", *titles]
    assert [r[0] for r in speed[1:]] == list(SHORT_CONFIGS)
    baselines = {"mqtun-1q": "c-1q", "c-1q": "veth", "pytun-1q": "veth"}  # like for like
    for row in speed[1:]:
        assert len(row) == 1 + len(SHORT_WORKLOADS)
        assert all(re.match(r"[\d,.]+ \([\d,.]+-[\d,.]+\)", c) for c in row[1:]), row
        if row[0] != "veth":
            assert all(f"x {baselines[row[0]]}" in c for c in row[1:]), row
    blocks = md.split("\n\n")
    cpu = blocks[next(i for i, b in enumerate(blocks) if b.startswith("Forwarder CPU")) + 1]
    assert [r[0] for r in _table(cpu, "config")[1:]] == list(SHORT_CONFIGS)
    assert "us/pkt" in cpu and "Gbit/s/core" in cpu
    assert "| target | measured |" in md and "mqtun-1q / c-1q" in md

    png = (out_dir / "chart.png").read_bytes()
    assert png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) > 10_000
    assert _topology_namespaces() <= before, "namespaces left behind"


def test_results_json_values_are_in_the_units_it_names(
        short_run: tuple[subprocess.CompletedProcess[str], Path, set[str]]) -> None:
    """Each value is its count per second, in the unit results.json names beside it (bit/s
    beside bits, not "Gbit/s"); what the table divides by is said apart."""
    proc, out_dir, _ = short_run
    assert proc.returncode == 0, proc.stderr[-2000:]
    data = json.loads((out_dir / "results.json").read_text())
    assert data["units"] == {"tcp4": "bit/s", "rr8": "trans/s", "udp16": "pkt/s"}
    assert data["display"]["tcp4"] == {"unit": "Gbit/s", "divide_by": 1e9}
    for s in data["samples"]:
        assert data["units"][s["workload"]] == f"{s['count_unit']}/s"
        assert s["value"] == pytest.approx(s["count"] / s["seconds"], rel=1e-9), s
        summary = data["summary"][s["config"]][s["workload"]]
        assert summary["unit"] == data["units"][s["workload"]]
        assert summary["median"] == s["value"]  # one run: the median is that run
    # iperf3's own bits per second agree with a count in bits (not bytes, not Gbit)
    tcp = next(s for s in data["samples"] if s["workload"] == "tcp4")
    assert tcp["count"] % 8 == 0 and tcp["value"] > 1e6
    assert all(0 <= s["steal"] <= 100 for s in data["samples"])  # the hypervisor's share


def test_the_sparse_request_response_is_paced(tmp_path: Path) -> None:
    """rr1k: sockperf never goes past the rate it was given (what waiting costs is measured
    at that rate), in the unit of the other request/response workloads."""
    proc = subprocess.run(
        [sys.executable, "-m", "mqtun", "bench", "--short", "--configs", "veth",
         "--workloads", "rr1k", "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=120, env=_env())
    assert proc.returncode == 0, proc.stderr[-2000:]
    data = json.loads((tmp_path / "results.json").read_text())
    assert data["units"] == {"rr1k": "trans/s"}
    (sparse,) = data["samples"]
    assert 0 < sparse["value"] <= 1.1 * SPARSE_RATE and sparse["p50_us"] > 0


# A meta-path finder that makes the named top-level packages unimportable, for every Python
# process that starts with this directory on PYTHONPATH (the bench and its forwarders).
_HIDER = """
import os, sys
_HIDE = set(filter(None, os.environ.get("MQTUN_TEST_HIDE", "").split(",")))
class _Hider:
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in _HIDE:
            raise ModuleNotFoundError(f"No module named {name!r} (hidden)", name=name)
        return None
sys.meta_path.insert(0, _Hider())
"""


def test_bench_without_pytun_matplotlib_or_compiler_runs_the_rest(tmp_path: Path) -> None:
    """The README's own install has neither python-pytun nor matplotlib: the bench runs what
    it can, says in one line each what it skipped and why, and prints its table."""
    hider = tmp_path / "hider"
    hider.mkdir()
    (hider / "sitecustomize.py").write_text(_HIDER)
    env = _env()
    env |= {"PYTHONPATH": f"{hider}:{env['PYTHONPATH']}", "MQTUN_TEST_HIDE": "pytun,matplotlib",
            "CC": str(tmp_path / "no-such-cc")}
    out_dir = tmp_path / "results"
    proc = subprocess.run(
        [sys.executable, "-m", "mqtun", "bench", "--short", "--configs", "veth,c-1q,pytun-1q",
         "--workloads", "rr1", "--out", str(out_dir)],
        capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    notes = [ln for ln in proc.stderr.splitlines() if ln.startswith("mqtun bench: skipped")]
    assert len(notes) == 3, proc.stderr
    assert any("pytun-1q" in n and "python-pytun" in n for n in notes), notes
    assert any("c-1q" in n and "compiler" in n for n in notes), notes
    assert any("chart.png" in n and "matplotlib" in n for n in notes), notes
    assert "Traceback" not in proc.stderr
    md = proc.stdout.split("\nwritten: ")[0]
    assert [r[0] for r in _table(md, "config")[1:]] == ["veth"]
    assert all(n.removeprefix("mqtun bench: ") in md for n in notes)  # the table says it too
    assert not (out_dir / "chart.png").exists()
    data = json.loads((out_dir / "results.json").read_text())
    assert data["configs"] == ["veth"] and len(data["skipped"]) == 3


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


def test_chart_and_table_from_a_full_synthetic_run(tmp_path: Path) -> None:
    """Every configuration and workload, a missing figure among them: the table has the
    like-for-like ratios and every target, the chart draws (no network: a made-up run)."""
    r = BenchResult(list(CONFIGS), list(WORKLOADS), 1.0, 2,
                    machine={"kernel": "test", "cpus": "2"})
    for rep in range(2):
        for i, c in enumerate(CONFIGS):
            for w in WORKLOADS.values():
                fwd = 0.0 if c == "veth" else 50.0 + i
                udp = w.key == "udp16"
                r.samples.append(Sample(
                    c, w.key, rep, 1000.0 * (i + 1), 1000 * (i + 1), w.count_unit, 1.0, fwd,
                    fwd / 100, 60.0, 0 if c == "veth" else 900, loss=0.1 if udp else None,
                    sent=1100 if udp else None, lost_before=50 if udp else None,
                    lost_in=10 if udp else None, lost_after=40 if udp else None,
                    p50_us=None if c == "pytun-2q" else 50.0 + i,
                    p99_us=None if c == "pytun-2q" else 90.0 + i))
    md = render_markdown(r)
    speed = _table(md, "config")
    row = {cells[0]: cells for cells in speed[1:]}
    assert "x c-1q" in row["mqtun-1q"][1] and "x c-2q" in row["mqtun-2q"][1]
    assert "x pytun-1q" in row["mqtun-1q-nooff"][1] and "x veth" in row["c-1q-nooff"][1]
    assert "x mqtun-1q" in row["mqtun-1q-handler"][1] and "x pytun-2q" in row["compat-2q"][1]
    assert "x mqtun-1q" in row["mqtun-1q-coalesce"][1]
    assert all(t.status in ("met", "missed") for t in targets(r))  # every target measured
    assert md.count("| met |") + md.count("| missed") == len(targets(r))
    write_chart(r, tmp_path / "chart.png")
    assert (tmp_path / "chart.png").read_bytes().startswith(b"\x89PNG")


def test_a_run_with_too_much_steal_is_measured_again_and_said(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A run during which the hypervisor took more than `max_steal` of the cores is measured
    again, at most STEAL_RETRIES times (the last attempt is kept whatever its steal), and the
    table says how many were. The namespaces and tools are replaced here: what is tested is
    the bench's bookkeeping, not a measurement."""
    from mqtun.apps import bench

    steals = iter([50.0, 3.0, 60.0, 70.0, 80.0, 0.0])  # run 1: one retry; run 2: kept at 80

    def fake_measure(topo: object, config: str, workload: str, rep: int, *_: object
                     ) -> Sample:
        return Sample(config, workload, rep, 1.0, 1, "trans", 1.0, 0.0, 0.0, 50.0,
                      steal=next(steals))

    class FakeTopology:
        def __init__(self, spec: object) -> None:
            pass

        def __enter__(self) -> FakeTopology:
            return self

        def __exit__(self, *exc: object) -> None:
            pass

    monkeypatch.setattr(bench, "measure", fake_measure)
    monkeypatch.setattr(bench, "Topology", FakeTopology)
    lines: list[str] = []
    r = bench.run_bench(["veth"], ["rr1"], repeat=3, max_steal=10.0, progress=lines.append)
    assert [(s.steal, s.steal_retries) for s in r.samples] == [(3.0, 1), (80.0, 2), (0.0, 0)]
    assert sum("measured again" in ln for ln in lines) == 3
    md = render_markdown(r)
    assert "3 run(s) were measured again" in md and "1 stayed above it and was kept" in md
    steals = iter([90.0])
    r = bench.run_bench(["veth"], ["rr1"], repeat=1, max_steal=100.0)  # keeps every run
    assert [(s.steal, s.steal_retries) for s in r.samples] == [(90.0, 0)]
    assert "measured again" not in render_markdown(r)


def test_a_target_missed_by_less_than_a_percent_says_by_how_much() -> None:
    """"missed by 0%" said nothing: under a whole percent the shortfall gets a decimal."""
    r = BenchResult(["mqtun-1q", "c-1q"], ["udp16"], 1.0, 1)
    for config, value in (("mqtun-1q", 1196.0), ("c-1q", 1000.0)):  # 1.196x against 1.2
        r.samples.append(Sample(config, "udp16", 0, value, int(value), "pkt", 1.0, 50.0, 0.5,
                                60.0, 900))
    md = render_markdown(r)
    assert "| 1.20x | missed by 0.3% |" in md
