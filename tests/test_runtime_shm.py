"""The shared-memory counters region: layout, live reading from another process, stale ones."""

from __future__ import annotations

import os
import re
import struct
import subprocess
import sys
from pathlib import Path

import pytest

import mqtun
from mqtun.errors import InvalidArgumentError, MqtunError
from mqtun.runtime import shm
from mqtun.stats import READ_PACKETS, WRITTEN_BYTES, DropReason


@pytest.fixture
def shm_dir(tmp_path: Path) -> str:
    return str(tmp_path)


def test_region_layout_and_live_reader(shm_dir: str) -> None:
    r = shm.Region.create("t1", ["mqa0", "mqb0"], 4, directory=shm_dir)
    try:
        assert re.fullmatch(rf"mqtun\.{os.getpid()}\.t1\.[0-9a-f]{{16}}",
                            os.path.basename(r.path))
        e0, e1 = r.claim(0, 0), r.claim(1, 0)
        c = r.counters(e0)
        c.slots[READ_PACKETS] += 5
        c.drop(DropReason.REFUSED, 2)
        r.counters(e1).slots[WRITTEN_BYTES] += 1000
        r.set_worker(e0, pid=1234, state=shm.EntryState.RUNNING, cpu=1)

        reader = shm.open_region("t1", shm_dir)
        try:
            assert reader.devices == ["mqa0", "mqb0"] and not reader.owner and reader.alive
            got = reader.entries()
            assert [(e.device, e.queue) for e in got] == [("mqa0", 0), ("mqb0", 0)]
            assert got[0].stats.read_packets == 5 and got[0].stats.dropped == {"refused": 2}
            assert got[0].worker_pid == 1234 and got[0].cpu == 1
            assert got[0].state == shm.EntryState.RUNNING
            assert got[1].stats.written_bytes == 1000 and got[1].cpu is None
            c.slots[READ_PACKETS] += 1  # live: the reader sees later writes
            assert reader.entry(e0).stats.read_packets == 6
            assert reader.counters(e0).snapshot().read_packets == 6
            with pytest.raises(MqtunError):
                reader.claim(0, 1)
        finally:
            reader.close()
        r.release(e1)
        assert [e.entry for e in r.entries()] == [e0]
        assert r.claim(1, 3) == e1  # a freed entry is reused, zeroed
        assert r.entry(e1).stats.written_bytes == 0
    finally:
        r.unlink()
        r.close()
    assert not os.path.exists(r.path)


def test_self_describing_header(shm_dir: str) -> None:
    with shm.Region.create("t2", ["x0"], 2, directory=shm_dir) as r:
        raw = Path(r.path).read_bytes()
        assert raw[:8] == shm.MAGIC
        version, header_size, entry_size, slots, capacity = struct.unpack_from("=5I", raw, 8)
        assert (version, header_size, capacity) == (1, shm.HEADER_SIZE, 2)
        assert len(raw) == header_size + capacity * entry_size
        assert r.fields[0] == "read_packets" and f"drop_{DropReason.TOO_BIG.label}" in r.fields
        assert len(r.fields) == slots
    assert not os.path.exists(r.path)  # the owner's context manager removes it


def test_stale_regions_are_listed_and_removed(shm_dir: str) -> None:
    r = shm.Region.create("live", ["x0"], 1, directory=shm_dir)
    try:
        # a region left by a dead process: same layout, a pid that does not run
        dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                              capture_output=True, text=True, check=True)
        pid = int(dead.stdout)
        stale = os.path.join(shm_dir, f"mqtun.{pid}.old")
        data = bytearray(Path(r.path).read_bytes())
        struct.pack_into("=I", data, 8 + 4 * 6, pid)
        Path(stale).write_bytes(bytes(data))
        Path(shm_dir, "mqtun.notapid.x").write_bytes(b"junk")  # not ours: ignored
        found = {i.name: i for i in shm.list_regions(shm_dir)}
        assert set(found) == {"live", "old"}
        assert found["live"].alive and not found["old"].alive
        assert shm.remove_stale_regions(shm_dir) == [stale]
        assert [i.name for i in shm.list_regions(shm_dir)] == ["live"]
    finally:
        r.unlink()
        r.close()


def test_bad_regions_are_refused(shm_dir: str) -> None:
    bad = Path(shm_dir, f"mqtun.{os.getpid()}.bad")
    bad.write_bytes(b"NOTMQTUN" + bytes(4096))
    with pytest.raises(MqtunError, match="not a usable mqtun counters region: no MQTUNSHM"):
        shm.Region.open(str(bad))
    bad.write_bytes(b"short")
    with pytest.raises(MqtunError, match="shorter than a header"):
        shm.Region.open(str(bad))
    with pytest.raises(MqtunError, match="no mqtun counters region"):
        shm.open_region("nothing-here", shm_dir)
    with pytest.raises(InvalidArgumentError):
        shm.Region.create("bad/name", ["x"], 1, directory=shm_dir)
    with shm.Region.create("dup", ["x"], 1, directory=shm_dir) as a, \
            shm.Region.create("dup", ["x"], 1, directory=shm_dir) as b:
        assert a.path != b.path  # the random part: a name is never taken twice
    with shm.Region.create("full", ["x"], 1, directory=shm_dir) as r:
        r.claim(0, 0)
        with pytest.raises(MqtunError, match="full"):
            r.claim(0, 1)


def test_another_process_reads_a_queue_live(shm_dir: str) -> None:
    dev = mqtun.Device.create("shm%d", 1)
    try:
        with shm.Region.create("q", [dev.name], 1, directory=shm_dir) as r:
            e = r.claim(0, 0)
            q = dev.queues[0]
            q.counters = r.counters(e)  # the queue now counts into shared memory
            dev.link.up()
            q.write(bytes.fromhex("4500001c0000000040110000c6120101c6120102") + bytes(8))
            src = str(Path(mqtun.__file__).resolve().parents[1])
            code = (f"from mqtun.runtime.shm import open_region as o; "
                    f"e=o({r.path!r}).entries()[0]; print(e.device, e.stats.written_packets)")
            out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                                 timeout=20, env={**os.environ, "PYTHONPATH": src})
            assert out.stdout.split() == [dev.name, "1"], out.stderr
            by_dev = shm.queue_stats_by_device(shm_dir)
            assert by_dev[dev.name][0].stats.written_packets == 1
            q.counters = mqtun.stats.Counters()  # let the mapping go before the region closes
    finally:
        dev.close()


def _run_bounded(fn, timeout: float = 5.0):  # type: ignore[no-untyped-def]
    """Run `fn` in a thread; fail (not hang) if it does not return within `timeout`."""
    import threading

    out: list[object] = []
    err: list[BaseException] = []

    def run() -> None:
        try:
            out.append(fn())
        except BaseException as exc:
            err.append(exc)

    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(timeout)
    assert not t.is_alive(), f"{fn} hangs"
    if err:
        raise err[0]
    return out[0]


def test_planted_files_neither_hang_nor_crash_the_readers(shm_dir: str) -> None:
    from mqtun.apps.top import find_region

    me = os.getpid()
    live = shm.Region.create("real", ["x0"], 2, directory=shm_dir)
    try:
        # a FIFO under a live pid's region name: opening it for reading would block forever
        os.mkfifo(os.path.join(shm_dir, f"mqtun.{me}.fifo.{'0' * 16}"))
        # a symlink to somebody's file, and a header that lies about the sizes
        os.symlink(live.path, os.path.join(shm_dir, f"mqtun.{me}.link.{'1' * 16}"))
        lying = bytearray(Path(live.path).read_bytes())
        struct.pack_into("=I", lying, 8 + 4 * 4, 60000)  # capacity: far past the file's end
        Path(shm_dir, f"mqtun.{me}.lying.{'2' * 16}").write_bytes(bytes(lying))
        # another user's file under our pid
        other = Path(shm_dir, f"mqtun.{me}.theirs.{'3' * 16}")
        other.write_bytes(Path(live.path).read_bytes())
        os.chown(other, 65534, 65534)
        names = {r.name for r in _run_bounded(lambda: shm.list_regions(shm_dir))}
        assert names == {"real", "lying"}  # the FIFO, the link, the foreign file: not read
        by_dev = _run_bounded(lambda: shm.queue_stats_by_device(shm_dir))
        assert by_dev == {}  # "real" has no claimed entry; "lying" is refused, not raised
        for which, why in (("fifo", "not a regular file"), ("theirs", "owned by uid 65534"),
                           ("lying", "describes")):
            path = next(str(p) for p in Path(shm_dir).iterdir() if f".{which}." in p.name)
            with pytest.raises(MqtunError, match=why) as err:
                _run_bounded(lambda path=path: shm.Region.open(path))
            assert "\n" not in str(err.value)
        with pytest.raises(MqtunError, match=r"Too many levels|symbolic"):
            shm.Region.open(os.path.join(shm_dir, f"mqtun.{me}.link.{'1' * 16}"))
        with pytest.raises(MqtunError, match="not a usable"):
            _run_bounded(lambda: find_region("lying", shm_dir))
        assert _run_bounded(lambda: find_region("real", shm_dir)).path == live.path
        # creating a region is not blocked by whatever sits under the old, predictable name
        Path(shm_dir, f"mqtun.{me}.pred").write_bytes(b"")
        with _run_bounded(lambda: shm.Region.create("pred", ["x"], 1, directory=shm_dir)) as r:
            assert r.path.startswith(os.path.join(shm_dir, f"mqtun.{me}.pred."))
    finally:
        live.unlink()
        live.close()


def test_show_clean_removes_regions_left_by_a_killed_process(shm_dir: str, tmp_path: Path) -> None:
    """`kill -9` leaves a region behind; `mqtun show --clean` (and any pool start) removes it."""
    code = ("import os, sys; from mqtun.runtime import shm; "
            "r = shm.Region.create('killed', ['x'], 1, directory=sys.argv[1]); "
            "print(r.path, flush=True); os.kill(os.getpid(), 9)")

    def killed() -> str:
        done = subprocess.run([sys.executable, "-c", code, shm_dir], capture_output=True,
                              text=True, timeout=30)
        assert done.returncode == -9 and os.path.exists(done.stdout.strip())
        return done.stdout.strip()

    path = killed()
    with shm.Region.create("next", ["x"], 1, directory=shm_dir):  # what a pool start does
        assert not os.path.exists(path)
    path = killed()
    assert [r.alive for r in shm.list_regions(shm_dir)] == [False]
    env = {**os.environ, "MQTUN_SHM_DIR": shm_dir}
    shown = subprocess.run([sys.executable, "-m", "mqtun", "show", "--clean"], env=env,
                           capture_output=True, text=True, timeout=30)
    assert shown.returncode == 0, shown.stderr
    assert not os.path.exists(path) and f"removed {path}" in shown.stderr
