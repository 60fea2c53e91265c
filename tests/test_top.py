"""`mqtun top` (and the live counters in `mqtun show`): against a real `mqtun forward`
carrying traffic between two namespaces, interactively in tmux, and its rate/render core on
synthetic snapshots (64-bit wrap, a restarted worker, a reused entry)."""

from __future__ import annotations

import io
import json
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

import mqtun
from mqtun.apps.top import (
    Snapshot,
    TopEnd,
    compute_rates,
    counter_delta,
    find_region,
    render_top,
    run_top,
    si,
    take_snapshot,
)
from mqtun.errors import InvalidArgumentError, MqtunError
from mqtun.netns import NetNamespace
from mqtun.runtime import shm
from mqtun.stats import READ_BYTES, READ_PACKETS, WRITTEN_PACKETS, DropReason, QueueStats

A_V4, B_V4 = "198.18.7.1", "198.18.7.2"
WRAP = 1 << 64


def _env() -> dict[str, str]:
    """A child `python3 -m mqtun` imports this very mqtun."""
    src = str(Path(mqtun.__file__).resolve().parents[1])
    path = os.environ.get("PYTHONPATH", "")
    return {**os.environ, "PYTHONPATH": f"{src}:{path}" if path else src}


def mqtun_cli(*args: str, ns: NetNamespace | None = None,
              timeout: float = 20) -> subprocess.CompletedProcess[str]:
    argv = [sys.executable, "-m", "mqtun", *args]
    return subprocess.run(ns.command(argv) if ns else argv, capture_output=True, text=True,
                          timeout=timeout, env=_env())


class Forwarder:
    """`mqtun forward --queues 2` in the test's namespace; killed whatever happens."""

    def __init__(self) -> None:
        tag = os.urandom(3).hex()
        self.dev_a, self.dev_b = f"ta{tag}", f"tb{tag}"
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "mqtun", "forward", "--queues", "2", "--no-offload",
             self.dev_a, self.dev_b],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env())
        ready: list[str] = []
        reader = threading.Thread(target=lambda: ready.append(self.proc.stdout.readline()),
                                  daemon=True)
        reader.start()
        reader.join(15)
        if not ready or not ready[0].startswith("READY queues=2"):
            self.kill()
            raise AssertionError(f"forward not READY: {ready} {self.proc.stderr.read()}")

    @property
    def pid(self) -> int:
        return self.proc.pid

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=5)


@pytest.fixture
def forward() -> Iterator[Callable[[], Forwarder]]:
    made: list[Forwarder] = []

    def start() -> Forwarder:
        made.append(Forwarder())
        return made[-1]

    yield start
    for f in made:
        f.kill()


def _place(dev: str, ns: NetNamespace, addr: str) -> None:
    subprocess.run(["ip", "link", "set", dev, "netns", ns.name], check=True, timeout=10)
    ns.run(["ip", "addr", "add", f"{addr}/24", "dev", dev])
    ns.run(["ip", "link", "set", dev, "up"])


class Traffic:
    """UDP from 32 source ports in `ns` to `dst` (so both queues carry flows), paced, until
    stopped."""

    def __init__(self, ns: NetNamespace, dst: str) -> None:
        self.sent = 0
        self.error: BaseException | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(ns, dst), daemon=True)
        self._thread.start()

    def _run(self, ns: NetNamespace, dst: str) -> None:
        try:
            with ns.enter():
                socks = [socket.socket(socket.AF_INET, socket.SOCK_DGRAM) for _ in range(32)]
                try:
                    deadline = time.monotonic() + 30  # bounded even if never stopped
                    while not self._stop.is_set() and time.monotonic() < deadline:
                        for s in socks:
                            s.sendto(b"mqtun-top" * 10, (dst, 9))
                        self.sent += len(socks)
                        time.sleep(0.01)
                finally:
                    for s in socks:
                        s.close()
        except BaseException as exc:
            self.error = exc

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)
        if self.error is not None:
            raise self.error


def _num(text: str) -> float:
    """Undo `si()`: '12.3k' -> 12300."""
    scale = {"k": 1e3, "M": 1e6, "G": 1e9, "T": 1e12, "P": 1e15, "E": 1e18}
    return float(text[:-1]) * scale[text[-1]] if text[-1] in scale else float(text)


def _rows(frame: str, devices: tuple[str, ...]) -> list[list[str]]:
    return [ln.split() for ln in frame.splitlines() if ln.split()[:1] and ln.split()[0] in devices]


# ---- against a running forwarder --------------------------------------------------------------
def test_top_and_show_on_a_forwarder_with_traffic(forward, make_netns) -> None:
    fwd = forward()
    devs = (fwd.dev_a, fwd.dev_b)
    ns_a, ns_b = make_netns(), make_netns()
    _place(fwd.dev_a, ns_a, A_V4)
    _place(fwd.dev_b, ns_b, B_V4)
    traffic = Traffic(ns_a, B_V4)
    try:
        time.sleep(0.3)  # traffic flowing before the first snapshot
        out = mqtun_cli("top", str(fwd.pid), "--iterations", "2", "--interval", "0.5")
    finally:
        traffic.stop()
    assert out.returncode == 0, out.stderr
    assert out.stderr == "" and traffic.sent > 0
    frames = out.stdout.split("\nmqtun top - ")
    assert len(frames) == 2, out.stdout
    last = frames[-1]
    assert f"pid {fwd.pid} (forward)" in last and f"devices {fwd.dev_a},{fwd.dev_b}" in last
    rows = _rows(last, devs)
    assert sorted((r[0], r[1]) for r in rows) == sorted(
        (d, q) for d in devs for q in ("0", "1")), last
    for r in rows:  # DEVICE Q WORKER STATE CPU RST RX TX RXB TXB DROPS DROP/s SHARE TOP
        assert len(r) == 14 and r[3] == "running", r
        rx, tx = _num(r[6]), _num(r[7])
        assert (rx if r[0] == fwd.dev_a else tx) > 0, f"no packets/s on {r[0]} q{r[1]}: {last}"
    shares = [float(r[12].rstrip("%")) for r in rows]
    assert abs(sum(shares) - 100.0) < 0.5, shares
    total = next(ln.split() for ln in last.splitlines() if ln.startswith("total"))
    assert abs(_num(total[2]) - sum(_num(r[6]) for r in rows)) <= 0.02 * _num(total[2]) + 10

    # `mqtun show` in A's namespace: the forwarder's live per-queue counters for A, whose reads
    # add up to what the kernel handed to userspace (its tx_packets) once traffic settles
    deadline = time.monotonic() + 5
    while True:
        shown = mqtun_cli("show", "--json", fwd.dev_a, ns=ns_a)
        assert shown.returncode == 0, shown.stderr
        (dev,) = json.loads(shown.stdout)
        live = dev["live_queues"]
        assert sorted(q["queue"] for q in live) == [0, 1]
        assert {q["pid"] for q in live} == {fwd.pid} and all(q["region"] == "forward"
                                                              for q in live)
        reads = sum(q["read_packets"] for q in live)
        if reads == dev["stats"]["tx_packets"] or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert reads == dev["stats"]["tx_packets"] > 0
    assert all(q["read_packets"] > 0 for q in live), live
    text = mqtun_cli("show", fwd.dev_a, ns=ns_a)
    assert f"live counters from mqtun pid {fwd.pid} (forward)" in text.stdout
    assert re.search(r"queue 1: worker \d+ running cpu - restarts 0; read [1-9]", text.stdout)


def test_show_skips_counters_of_a_same_named_device_elsewhere(forward, make_netns) -> None:
    """/dev/shm is shared by every namespace, device names are not: a device here named like
    the forwarder's (now in another namespace) gets none of the forwarder's counters."""
    fwd = forward()
    ns_a = make_netns()
    _place(fwd.dev_a, ns_a, A_V4)
    subprocess.run(["ip", "tuntap", "add", fwd.dev_a, "mode", "tun"], check=True, timeout=10)
    here = json.loads(mqtun_cli("show", "--json", fwd.dev_a).stdout)
    there = json.loads(mqtun_cli("show", "--json", fwd.dev_a, ns=ns_a).stdout)
    assert here[0]["live_queues"] == [] and here[0]["holders"] == []
    assert [q["queue"] for q in there[0]["live_queues"]] == [0, 1]


def test_top_ends_when_the_process_exits(forward) -> None:
    fwd = forward()
    top = subprocess.Popen([sys.executable, "-m", "mqtun", "top", str(fwd.pid), "--interval",
                            "0.2"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                           env=_env())
    try:
        first: list[str] = []
        reader = threading.Thread(target=lambda: first.append(top.stdout.readline()),
                                  daemon=True)
        reader.start()
        reader.join(10)
        assert first and first[0].startswith(f"mqtun top - pid {fwd.pid}"), first
        fwd.proc.send_signal(signal.SIGTERM)
        _, err = top.communicate(timeout=10)
    finally:
        if top.poll() is None:
            top.kill()
            top.wait(5)
    assert top.returncode == 0
    assert err == f"mqtun top: pid {fwd.pid} (forward) has exited\n"


# ---- interactively, in a terminal -------------------------------------------------------------
def test_interactive_view_in_tmux(forward) -> None:
    fwd = forward()
    sock = f"mqtun-top-{os.urandom(4).hex()}"
    top = shlex.join([sys.executable, "-m", "mqtun", "top", str(fwd.pid), "--interval", "0.3"])
    # the same view twice: quit with q, then with Ctrl-C; after each, is the terminal as before?
    script = (
        "trap true INT; before=$(stty -g); "
        f"{top}; rc=$?; [ \"$(stty -g)\" = \"$before\" ] && echo \"rc1=$rc restored\"; "
        f"{top}; rc=$?; [ \"$(stty -g)\" = \"$before\" ] && echo \"rc2=$rc restored\"; "
        "sleep 30"
    )

    def tmux(*args: str) -> str:
        return subprocess.run(["tmux", "-L", sock, *args], check=True, capture_output=True,
                              text=True, timeout=10, env=_env()).stdout

    def screen_shows(pred: Callable[[str], bool], what: str) -> str:
        deadline = time.monotonic() + 10
        while True:
            shown = tmux("capture-pane", "-p", "-t", "top")
            if pred(shown):
                return shown
            if time.monotonic() > deadline:
                raise AssertionError(f"tmux never showed {what}:\n{shown}")
            time.sleep(0.1)

    def drawn(shown: str) -> bool:  # a full frame, rates measured (not the first '-' one)
        rows = _rows(shown, (fwd.dev_a, fwd.dev_b))
        return len(rows) == 4 and all(r[6] != "-" for r in rows) and "q: quit" in shown

    tmux("new-session", "-d", "-s", "top", "-x", "120", "-y", "40", "-e",
         f"PYTHONPATH={_env()['PYTHONPATH']}", "bash", "-c", script)
    try:
        shown = screen_shows(drawn, "the table")
        assert f"mqtun top - pid {fwd.pid} (forward)" in shown
        assert all(len(ln) <= 120 for ln in shown.splitlines())
        tmux("send-keys", "-t", "top", "q")
        screen_shows(lambda s: "rc1=0 restored" in s, "a clean exit on q")
        screen_shows(lambda s: drawn(s) and "rc1=0" not in s, "the second view")
        tmux("send-keys", "-t", "top", "C-c")
        shown = screen_shows(lambda s: "rc2=0 restored" in s, "a clean exit on Ctrl-C")
        assert "Traceback" not in shown
    finally:
        subprocess.run(["tmux", "-L", sock, "kill-server"], capture_output=True, timeout=10)


# ---- nothing to watch ---------------------------------------------------------------------------
def test_no_live_process_is_one_line_and_exit_1() -> None:
    # a private /dev/shm (a mount namespace of its own), where no mqtun process runs
    inner = shlex.join([sys.executable, "-m", "mqtun", "top"])
    out = subprocess.run(["unshare", "--mount", "--propagation", "private", "sh", "-c",
                          f"mount -t tmpfs mqtun-top /dev/shm && exec {inner}"],
                         capture_output=True, text=True, timeout=20, env=_env())
    assert out.returncode == 1, out.stderr
    assert out.stderr == "mqtun: no running mqtun process (no live counters region under " \
                         "/dev/shm)\n"
    assert out.stdout == ""
    for which in (str(os.getpid()), "4000000", "nosuchpool"):  # here: not an mqtun process
        out = mqtun_cli("top", which, "--once")
        assert out.returncode == 1 and out.stderr.count("\n") == 1, out.stderr
        assert out.stderr.startswith(f"mqtun: no running mqtun process {which} (running: ")
        assert "Traceback" not in out.stderr and out.stdout == ""


# ---- the core, on regions and snapshots made here ---------------------------------------------
def test_find_region_and_run_top_on_a_private_directory(tmp_path: Path) -> None:
    d = str(tmp_path)
    with pytest.raises(MqtunError, match="no running mqtun process"):
        find_region(None, d)
    one = shm.Region.create("one", ["qa0"], 2, directory=d)
    two = shm.Region.create("two", ["qb0"], 2, directory=d)
    try:
        e = one.claim(0, 0)
        one.set_worker(e, pid=os.getpid(), state=shm.EntryState.RUNNING, cpu=0)
        with pytest.raises(InvalidArgumentError, match=r"one.*two"):
            find_region(None, d)  # several: say which
        with pytest.raises(InvalidArgumentError):
            find_region(str(os.getpid()), d)
        seen = find_region("one", d)
        assert seen.name == "one" and find_region(f"{os.getpid()}.two", d).name == "two"

        counting = threading.Event()

        def count() -> None:  # a worker publishing counts while top watches
            c = one.counters(e)
            while not counting.is_set():
                c.slots[READ_PACKETS] += 10
                c.slots[READ_BYTES] += 1000
                time.sleep(0.01)

        t = threading.Thread(target=count, daemon=True)
        t.start()
        out = io.StringIO()
        try:
            assert run_top(seen, interval=0.1, iterations=3, out=out) is TopEnd.DONE
        finally:
            counting.set()
            t.join(2)
        frames = out.getvalue().split("\n\n")
        assert len(frames) == 3 and "\x1b" not in out.getvalue()  # not a tty: no escapes
        for frame in frames:
            (row,) = _rows(frame, ("qa0",))
            assert _num(row[6]) > 0 and row[12] == "100.0%"

        seen.close()
        reader = shm.Region.open(two.path)
        two.unlink()  # as a stopping pool does: top ends instead of showing stale figures
        assert run_top(reader, interval=0.05, iterations=5, out=io.StringIO()) is TopEnd.EXITED
        reader.close()
    finally:
        for r in (one, two):
            r.unlink()
            r.close()


def _snap(t: float, *entries: shm.EntryInfo) -> Snapshot:
    return Snapshot(time=t, wall=1000.0 + t, pid=4242, name="forward",
                    devices=("fa0", "fb0"), created=1000.0 - 3725, entries=entries)


def _entry(device: str, queue: int, *, pid: int = 100, restarts: int = 0,
           state: shm.EntryState = shm.EntryState.RUNNING, **stats: object) -> shm.EntryInfo:
    index = {("fa0", 0): 0, ("fb0", 0): 1, ("fa0", 1): 2, ("fb0", 1): 3}[(device, queue)]
    return shm.EntryInfo(index, device, queue, pid, state, restarts, queue,
                         QueueStats(**stats))  # type: ignore[arg-type]


def test_counter_delta_wraps_and_resets() -> None:
    assert counter_delta(5, 10) == 5
    assert counter_delta(WRAP - 10, 5) == 15  # past 2**64
    assert counter_delta(WRAP - 1, WRAP - 1) == 0
    assert counter_delta(1000, 10) is None  # went back: a reset, not 2**64 - 990 packets


def test_rates_across_a_64_bit_wrap() -> None:
    big = WRAP - 100
    prev = _snap(10.0, _entry("fa0", 0, read_packets=big, read_bytes=WRAP - 1000,
                              dropped={"refused": WRAP - 2}),
                 _entry("fb0", 0, written_packets=big))
    cur = _snap(10.5, _entry("fa0", 0, read_packets=400, read_bytes=499_000,
                             dropped={"refused": 3}),
                _entry("fb0", 0, written_packets=400))
    view = compute_rates(prev, cur)
    a, b = view.rows
    assert (a.device, b.device) == ("fa0", "fb0")
    assert a.rx_pps == pytest.approx(1000.0) and a.rx_bps == pytest.approx(1_000_000.0)
    assert b.tx_pps == pytest.approx(1000.0) and a.drops_ps == pytest.approx(10.0)
    assert not a.reset and not a.restarted
    assert a.share == pytest.approx(50.0) and b.share == pytest.approx(50.0)
    assert view.total.rx_pps == pytest.approx(1000.0) and view.total.share == 100.0
    text = render_top(view)
    assert "1.00k" in text and "8.00M" in text and "refused=3" in text  # 1 MB/s: 8 Mbit/s
    assert "uptime 1:02:15" in text  # 3725 s before the first snapshot, 10.5 s later


def test_a_restarted_worker_keeps_its_counts_and_is_marked() -> None:
    prev = _snap(0.0, _entry("fa0", 0, pid=100, read_packets=5000),
                 _entry("fa0", 1, pid=101, read_packets=7000))
    cur = _snap(1.0, _entry("fa0", 0, pid=100, read_packets=5300),
                _entry("fa0", 1, pid=250, restarts=1, read_packets=7100,
                       dropped={"handler-error": 1, "filtered": 4}))
    view = compute_rates(prev, cur)
    q0, q1 = view.rows
    assert not q0.restarted and q1.restarted and q1.worker_pid == 250 and q1.restarts == 1
    assert q1.rx_pps == pytest.approx(100.0)  # the slots survive a restart: no spike, no gap
    assert q0.share == pytest.approx(75.0) and q1.share == pytest.approx(25.0)
    lines = render_top(view).splitlines()
    row = next(ln for ln in lines if ln.startswith("fa0") and " 250 " in ln)
    assert "running*" in row and "filtered=4,handler-error=1" in row
    assert "*: worker restarted" in lines[-1]


def test_a_reused_entry_counts_from_zero_not_from_minus_one() -> None:
    prev = _snap(0.0, _entry("fa0", 0, read_packets=10_000, read_bytes=10**6))
    cur = _snap(2.0, _entry("fa0", 0, read_packets=40, read_bytes=4000))
    (row,) = compute_rates(prev, cur).rows
    assert row.reset and row.rx_pps == pytest.approx(20.0) and row.rx_bps == pytest.approx(2000)


def test_first_frame_idle_queues_and_a_crashed_worker() -> None:
    cur = _snap(1.0, _entry("fa0", 0, read_packets=5),
                _entry("fb0", 0, state=shm.EntryState.CRASHED, pid=0))
    first = compute_rates(None, cur)
    assert first.interval is None and all(r.rx_pps is None and r.share is None
                                          for r in first.rows)
    text = render_top(first)
    assert "interval -" in text and "crashed" in text
    idle = compute_rates(cur, _snap(2.0, *cur.entries))
    assert [r.share for r in idle.rows] == [0.0, 0.0] and idle.total.share == 0.0


def test_render_is_fixed_width() -> None:
    prev = _snap(0.0, *(_entry(d, q) for q in (0, 1) for d in ("fa0", "fb0")))
    cur = _snap(1.0, _entry("fa0", 0, read_packets=7, read_bytes=700),
                _entry("fb0", 0, written_packets=123_456_789, written_bytes=WRAP - 1),
                _entry("fa0", 1, read_packets=WRAP // 3, dropped={"malformed": WRAP - 1}),
                _entry("fb0", 1))
    lines = render_top(compute_rates(prev, cur)).splitlines()
    title = lines[1]
    share_end = title.index("SHARE") + len("SHARE")
    body = [ln for ln in lines[2:-1]]
    assert len(body) == 5 and body[-1].startswith("total")
    for ln in body:  # every number right-aligned under its title, whatever its size
        assert ln[share_end - 1] == "%" and ln[share_end] == " ", (ln, title)
        for col in ("RX pkt/s", "TX bit/s", "DROPS"):
            end = title.index(col) + len(col)
            assert ln[end - 1] != " " and ln[end] == " ", (col, ln)
    assert "18.4E" in "\n".join(lines)  # a counter near 2**64 still fits its column
    assert max(len(ln) for ln in render_top(compute_rates(prev, cur), width=60).splitlines()) \
        <= 60


def test_si() -> None:
    assert [si(v) for v in (None, 0, 999, 999.6, 1000, 12_345, 999_499, 2.5e9, WRAP)] == [
        "-", "0", "999", "1.00k", "1.00k", "12.3k", "999k", "2.50G", "18.4E"]


def test_snapshot_of_a_live_region(tmp_path: Path) -> None:
    r = shm.Region.create("snap", ["qa0", "qb0"], 2, directory=str(tmp_path))
    try:
        e = r.claim(1, 0)
        r.counters(e).slots[WRITTEN_PACKETS] += 9
        r.counters(e).drop(DropReason.LINK_DOWN)
        s = take_snapshot(r, clock=lambda: 42.0)
        assert s.time == 42.0 and s.pid == os.getpid() and s.devices == ("qa0", "qb0")
        (entry,) = s.entries
        assert entry.device == "qb0" and entry.stats.written_packets == 9
        assert entry.stats.dropped == {"link-down": 1}
    finally:
        r.unlink()
        r.close()
