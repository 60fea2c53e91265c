"""`mqtun top`'s table: what fits a terminal's width (80 columns keep the drops and the
shares; what is left out is named, never dropped silently) and its units (bits per second,
as network people read rates)."""

from __future__ import annotations

import pytest

from mqtun.apps.top import Snapshot, compute_rates, render_top
from mqtun.runtime import shm
from mqtun.stats import QueueStats


def _entry(index: int, device: str, queue: int, **stats: object) -> shm.EntryInfo:
    return shm.EntryInfo(index, device, queue, 4300 + index, shm.EntryState.RUNNING, 0, queue,
                         QueueStats(**stats))  # type: ignore[arg-type]


def _view(devices: tuple[str, str] = ("vpn0", "vpn1"), queues: int = 2):  # type: ignore[no-untyped-def]
    a, b = devices

    def snap(t: float, k: int) -> Snapshot:
        entries = []
        for q in range(queues):
            entries += [
                _entry(2 * q, a, q, read_packets=1000 * k, read_bytes=1_250_000 * k,
                       dropped={"refused": 7 * k, "link-down": 3 * k}),
                _entry(2 * q + 1, b, q, written_packets=990 * k, written_bytes=1_237_500 * k),
            ]
        return Snapshot(time=t, wall=2000.0 + t, pid=15548, name="forward", devices=devices,
                        created=1995.0, entries=tuple(entries))

    return compute_rates(snap(0.0, 0), snap(1.0, 1))


@pytest.mark.parametrize("width", [79, 80, 100])
def test_a_terminal_of_80_columns_keeps_the_drops_and_the_shares(width: int) -> None:
    text = render_top(_view(), width=width - 1, footer="q: quit")  # top leaves one column free
    lines = text.splitlines()
    assert max(map(len, lines)) <= width - 1
    title = next(ln for ln in lines if ln.startswith("DEVICE"))
    for col in ("RX pkt/s", "TX pkt/s", "RX bit/s", "TX bit/s", "DROPS", "SHARE"):
        assert col in title, (col, title)
    total = next(ln for ln in lines if ln.startswith("total"))
    assert total.split()[-7:] == ["2.00k", "1.98k", "20.0M", "19.8M", "20", "20", "100.0%"]
    row = next(ln for ln in lines if ln.startswith("vpn0")).split()
    assert row[-1] == "25.1%" and "10" in row[-3:]  # its share and its drops
    assert "10.0M" in row  # 1.25 MB/s is 10 Mbit/s
    assert lines[-1].endswith("q: quit")


def test_what_a_narrow_terminal_leaves_out_is_named() -> None:
    wide = render_top(_view())
    assert "not shown" not in wide
    for col in ("WORKER", "STATE", "CPU", "RST", "DROP/s", "TOP DROPS"):
        assert col in wide.splitlines()[1]
    narrow = render_top(_view(), width=79)
    title = next(ln for ln in narrow.splitlines() if ln.startswith("DEVICE"))
    left_out = [c for c in ("WORKER", "STATE", "CPU", "RST", "DROP/s", "TOP DROPS")
                if c not in title]
    assert left_out, title
    notes = " ".join(narrow.splitlines()[-2:]).split("not shown at this width: ")[1]
    assert sorted(left_out) == sorted(notes.split(";")[0].split(", "))
    tiny = render_top(_view(), width=60)
    title = next(ln for ln in tiny.splitlines() if ln.startswith("DEVICE"))
    assert title.endswith("DROPS  SHARE") and max(map(len, tiny.splitlines())) <= 60


def test_long_device_names_widen_their_column_and_still_fit() -> None:
    text = render_top(_view(devices=("a-long-name-15c", "b-long-name-15c")), width=79)
    assert max(map(len, text.splitlines())) <= 79
    rows = [ln.split() for ln in text.splitlines() if ln.startswith(("a-", "b-", "total"))]
    assert [r[0] for r in rows] == ["a-long-name-15c", "b-long-name-15c"] * 2 + ["total"]
    assert all(r[-1].endswith("%") for r in rows), rows  # SHARE is still there


def test_rates_are_bits_per_second() -> None:
    text = render_top(_view())
    title = text.splitlines()[1]
    assert "RX bit/s" in title and "TX bit/s" in title and "B/s" not in title
    vpn0 = next(ln.split() for ln in text.splitlines() if ln.startswith("vpn0"))
    # DEVICE Q WORKER STATE CPU RST RX TX RXb TXb DROPS DROP/s SHARE TOP
    assert vpn0[6] == "1.00k" and vpn0[8] == "10.0M" and vpn0[9] == "0"
    vpn1 = next(ln.split() for ln in text.splitlines() if ln.startswith("vpn1"))
    assert vpn1[7] == "990" and vpn1[9] == "9.90M"
    assert "bit/s: bits per second" in text
