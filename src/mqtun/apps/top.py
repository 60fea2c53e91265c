"""`mqtun top`: a live per-queue view of a running mqtun process, from its counters region.

The kernel keeps no per-queue counters for tun/tap, so the figures come from the shared-memory
region a worker pool publishes (`mqtun.runtime.shm`). The core is pure: `take_snapshot()`
copies a region's entries with a timestamp, `compute_rates()` turns two snapshots into
per-queue rates (wrap-safe 64-bit deltas, entries reused or restarted), and `render_top()`
formats them as a fixed-width table. `run_top()` is the thin terminal shell around them; it
writes only to the streams it is given and returns why it ended, so the CLI decides what to
print and which exit code that means.
"""

from __future__ import annotations

import contextlib
import enum
import errno
import os
import select
import shutil
import textwrap
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any, TextIO

from mqtun.errors import InvalidArgumentError, MqtunError
from mqtun.runtime.shm import SHM_DIR, EntryInfo, Region, RegionInfo, list_regions

__all__ = [
    "QueueRates",
    "Snapshot",
    "TopEnd",
    "TopView",
    "compute_rates",
    "counter_delta",
    "find_region",
    "render_top",
    "run_top",
    "take_snapshot",
]

WRAP = 1 << 64
_CLEAR = "\x1b[H\x1b[2J"
_ENTER = "\x1b[?1049h\x1b[?25l"  # alternate screen, hidden cursor
_LEAVE = "\x1b[?25h\x1b[?1049l"
_TOP_REASONS = 2


# ---- the pure core ----------------------------------------------------------------------------
@dataclass(frozen=True)
class Snapshot:
    """A region's claimed entries at one moment (`time`: monotonic, `wall`: unix time)."""

    time: float
    wall: float
    pid: int
    name: str
    devices: tuple[str, ...]
    created: float
    entries: tuple[EntryInfo, ...]


def take_snapshot(region: Region, clock: Callable[[], float] = time.monotonic) -> Snapshot:
    """Copy every claimed entry of `region` now (each counter is read atomically)."""
    return Snapshot(clock(), time.time(), region.pid, region.name, tuple(region.devices),
                    region.created, tuple(region.entries()))


def counter_delta(old: int, new: int) -> int | None:
    """How much a u64 counter grew from `old` to `new`, across a wrap past 2**64.

    None when it went back instead (its entry was released and claimed again, which zeroes
    it): a plausible growth is under 2**63, a reset shows up as an "increase" above that.
    """
    d = (new - old) % WRAP
    return d if d < WRAP // 2 else None


@dataclass(frozen=True)
class QueueRates:
    """One queue's row: rates over the last interval (None before a second snapshot).

    rx counts packets the worker read from its queue, tx the packets it wrote to it.
    """

    device: str
    queue: int
    entry: int
    worker_pid: int
    state: str
    cpu: int | None
    restarts: int
    rx_pps: float | None
    tx_pps: float | None
    rx_bps: float | None
    tx_bps: float | None
    drops: int
    drops_ps: float | None
    drop_reasons: tuple[tuple[str, int], ...]  # cumulative, largest first
    share: float | None  # percent of all packets (rx + tx) of the interval
    restarted: bool = False  # its worker was restarted during the interval
    reset: bool = False  # its counters went back (entry reused): rates counted from zero


@dataclass(frozen=True)
class TopView:
    """Everything one frame shows."""

    pid: int
    name: str
    devices: tuple[str, ...]
    uptime: float
    interval: float | None
    rows: tuple[QueueRates, ...]
    total: QueueRates


def _ranked(drops: dict[str, int]) -> tuple[tuple[str, int], ...]:
    return tuple(sorted(((k, v) for k, v in drops.items() if v), key=lambda kv: (-kv[1], kv[0])))


def _row(cur: EntryInfo, old: EntryInfo | None, dt: float | None) -> tuple[QueueRates, int]:
    """The row of one entry and its packet count in the interval (for the shares)."""
    s = cur.stats
    row = QueueRates(
        device=cur.device, queue=cur.queue, entry=cur.entry, worker_pid=cur.worker_pid,
        state=cur.state.label, cpu=cur.cpu, restarts=cur.restarts, rx_pps=None, tx_pps=None,
        rx_bps=None, tx_bps=None, drops=s.dropped_total, drops_ps=None,
        drop_reasons=_ranked(dict(s.dropped)), share=None,
    )
    if dt is None or dt <= 0:
        return row, 0
    o = old.stats if old is not None else None
    pairs = [(s.read_packets, o.read_packets if o else 0),
             (s.written_packets, o.written_packets if o else 0),
             (s.read_bytes, o.read_bytes if o else 0),
             (s.written_bytes, o.written_bytes if o else 0),
             (s.dropped_total, o.dropped_total if o else 0)]
    deltas = [counter_delta(before, now) for now, before in pairs]
    reset = None in deltas
    if reset:  # counting started again from zero within the interval
        deltas = [now % WRAP for now, _ in pairs]
    rx, tx, rxb, txb, dr = (d or 0 for d in deltas)
    restarted = old is not None and (cur.restarts != old.restarts
                                     or cur.worker_pid != old.worker_pid)
    row = replace(row, rx_pps=rx / dt, tx_pps=tx / dt, rx_bps=rxb / dt, tx_bps=txb / dt,
                  drops_ps=dr / dt, restarted=restarted, reset=reset)
    return row, rx + tx


def compute_rates(prev: Snapshot | None, cur: Snapshot) -> TopView:
    """Per-queue rates between two snapshots of the same region (`prev` None: no rates yet).

    Entries are matched by (entry, device, queue); one that appeared since `prev` counts from
    zero. Rows are ordered by queue, then device, so a forwarder's queue pair sits together.
    """
    dt = None if prev is None else cur.time - prev.time
    before = {} if prev is None else {(e.entry, e.device, e.queue): e for e in prev.entries}
    made = [_row(e, before.get((e.entry, e.device, e.queue)), dt) for e in cur.entries]
    order = {d: i for i, d in enumerate(cur.devices)}
    made.sort(key=lambda rn: (rn[0].queue, order.get(rn[0].device, len(order)), rn[0].entry))
    packets = sum(n for _, n in made)
    rows = tuple(
        row if row.rx_pps is None else replace(row, share=100.0 * n / packets if packets else 0.0)
        for row, n in made
    )
    return TopView(cur.pid, cur.name, cur.devices, max(0.0, cur.wall - cur.created), dt, rows,
                   _total(rows, dt))


def _total(rows: Sequence[QueueRates], dt: float | None) -> QueueRates:
    drops: dict[str, int] = {}
    for r in rows:
        for k, v in r.drop_reasons:
            drops[k] = drops.get(k, 0) + v

    def add(attr: str) -> float | None:
        return None if dt is None else sum(getattr(r, attr) or 0.0 for r in rows)

    share = None if dt is None else (100.0 if any(r.share for r in rows) else 0.0)
    return QueueRates(
        device="total", queue=-1, entry=-1, worker_pid=0, state="", cpu=None,
        restarts=sum(r.restarts for r in rows), rx_pps=add("rx_pps"), tx_pps=add("tx_pps"),
        rx_bps=add("rx_bps"), tx_bps=add("tx_bps"), drops=sum(r.drops for r in rows),
        drops_ps=add("drops_ps"), drop_reasons=_ranked(drops), share=share,
    )


def si(value: float | None) -> str:
    """A rate or count in at most 6 characters: 999, 12.3k, 1.23M, 45.6G (None: '-')."""
    if value is None:
        return "-"
    v = float(value)
    if v < 999.5:
        return f"{v:.0f}"
    for unit in ("k", "M", "G", "T", "P", "E", "Z"):
        v /= 1000.0
        if v < 9.995:
            return f"{v:.2f}{unit}"
        if v < 999.5:
            return f"{v:.1f}{unit}" if v < 99.95 else f"{v:.0f}{unit}"
    return f"{v:.0f}Y"


def _uptime(seconds: float) -> str:
    s = int(seconds)
    d, s = divmod(s, 86400)
    h, s = divmod(s, 3600)
    m, s = divmod(s, 60)
    return f"{d}d {h:02d}:{m:02d}:{s:02d}" if d else f"{h:d}:{m:02d}:{s:02d}"


@dataclass(frozen=True)
class _Col:
    title: str
    width: int
    right: bool = True
    hide: int = 0  # 0: always shown; otherwise hidden, highest first, where the width is short


# Rates first among what a narrow terminal keeps: DEVICE Q RX/TX pkt/s RX/TX bit/s DROPS SHARE
# fit 60 columns; in 80 the drop rate and the worker's state come too. What is left out is
# named under the table, never dropped silently.
_COLS = (
    _Col("DEVICE", 6, right=False), _Col("Q", 3), _Col("WORKER", 7, hide=3),
    _Col("STATE", 8, right=False, hide=2), _Col("CPU", 3, hide=4), _Col("RST", 3, hide=5),
    _Col("RX pkt/s", 8), _Col("TX pkt/s", 8), _Col("RX bit/s", 8), _Col("TX bit/s", 8),
    _Col("DROPS", 5), _Col("DROP/s", 6, hide=1), _Col("SHARE", 6),
    _Col("TOP DROPS", 0, right=False, hide=6),
)
_TOP_DROPS_MIN = 16  # the last, free-width column is shown only with this much room


def _layout(view: TopView, width: int | None) -> tuple[list[_Col | None], list[str]]:
    """The columns to draw (None: left out for the width) and the titles left out."""
    device = max([len(r.device) for r in view.rows] + [len("total")], default=0)
    cols: list[_Col | None] = [replace(c, width=min(15, max(c.width, device)))
                               if c.title == "DEVICE" else c for c in _COLS]

    def need() -> int:
        shown = [c for c in cols if c is not None]
        return (sum(c.width or _TOP_DROPS_MIN for c in shown) + len(shown) - 1)

    hidden: list[str] = []
    if width is not None:
        for c in sorted((c for c in _COLS if c.hide), key=lambda c: -c.hide):
            if need() <= width:
                break
            cols = [None if k is not None and k.title == c.title else k for k in cols]
            hidden.append(c.title)
    return cols, hidden


def _line(cols: Sequence[_Col | None], cells: Sequence[str]) -> str:
    parts = []
    for col, cell in zip(cols, cells, strict=True):
        if col is not None:
            parts.append(cell.rjust(col.width) if col.right else cell.ljust(col.width))
    return " ".join(parts).rstrip()


def _bits(bytes_per_s: float | None) -> str:
    return si(None if bytes_per_s is None else bytes_per_s * 8)


def _cells(r: QueueRates, device_width: int, total: bool = False) -> list[str]:
    drops = ",".join(f"{k}={si(v)}" for k, v in r.drop_reasons[:_TOP_REASONS]) or "-"
    share = "-" if r.share is None else f"{r.share:.1f}%"
    state = r.state + ("*" if r.restarted or r.reset else "")
    if total:
        return ["total", "", "", "", "", str(r.restarts), si(r.rx_pps), si(r.tx_pps),
                _bits(r.rx_bps), _bits(r.tx_bps), si(r.drops), si(r.drops_ps), share, drops]
    return [r.device[:device_width], str(r.queue), str(r.worker_pid or "-"), state[:8],
            "-" if r.cpu is None else str(r.cpu), str(r.restarts), si(r.rx_pps),
            si(r.tx_pps), _bits(r.rx_bps), _bits(r.tx_bps), si(r.drops), si(r.drops_ps), share,
            drops]


def render_top(view: TopView, *, width: int | None = None, footer: str = "") -> str:
    """The frame as text: a header, the column titles, a row per queue, the totals, notes.

    Rates are packets and bits per second. With `width` (a terminal's), the columns that
    matter least are left out until the table fits, and the notes name them; lines are then
    cut at `width` (a terminal would wrap them). `footer` goes last (e.g. "q: quit").
    """
    interval = "-" if view.interval is None else f"{view.interval:.1f}s"
    who = f"mqtun top - pid {view.pid} ({view.name})  devices {','.join(view.devices)}"
    when = (f"queues {len({r.queue for r in view.rows})}  uptime {_uptime(view.uptime)}  "
            f"interval {interval}")
    head = [f"{who}  {when}"] if width is None or len(who) + 2 + len(when) <= width \
        else [who, f"  {when}"]
    cols, hidden = _layout(view, width)
    device_width = next(c.width for c in cols if c is not None and c.title == "DEVICE")
    lines = [*head, _line(cols, [c.title for c in _COLS])]
    lines += [_line(cols, _cells(r, device_width)) for r in view.rows]
    if not view.rows:
        lines.append("(no queues in this region)")
    lines.append(_line(cols, _cells(view.total, device_width, total=True)))
    notes = ["rx: read from the queue by its worker, tx: written to it; bit/s: bits per second"]
    if any(r.restarted or r.reset for r in view.rows):
        notes.append("*: worker restarted or counters reset in this interval")
    if hidden:
        notes.append(f"not shown at this width: {', '.join(hidden)}")
    if footer:
        notes.append(footer)
    if width is None:
        lines.append("; ".join(notes))
    else:
        lines += textwrap.wrap("; ".join(notes), width)
        lines = [ln[:width] for ln in lines]
    return "\n".join(lines) + "\n"


# ---- finding the process ----------------------------------------------------------------------
def _label(r: RegionInfo) -> str:
    return f"{r.pid}.{r.name}"


def find_region(which: str | None, directory: str = SHM_DIR) -> Region:
    """Open the live region of `which` (a pid, a region name, "PID.NAME" or a path), or the
    only live one when `which` is None. Several candidates: an InvalidArgumentError that
    names them; none: an MqtunError (ESRCH)."""
    if which is not None and "/" in which:
        return Region.open(which)
    live = [r for r in list_regions(directory) if r.alive]
    running = ", ".join(_label(r) for r in live) or "none"
    if which is None:
        match = live
    elif which.isdigit():
        match = [r for r in live if r.pid == int(which)]
    else:
        match = [r for r in live if which in (_label(r), r.name)]
    if not match:
        if which is None:
            raise MqtunError(errno.ESRCH, "no running mqtun process (no live counters region "
                             f"under {directory})", op="top")
        raise MqtunError(errno.ESRCH, f"no running mqtun process {which} (running: {running})",
                         op="top")
    if len(match) > 1:
        raise InvalidArgumentError(
            f"{len(match)} mqtun processes/pools are running ({', '.join(map(_label, match))}): "
            f"name one, e.g. mqtun top {_label(match[0])}")
    return Region.open(match[0].path)


# ---- the terminal shell -----------------------------------------------------------------------
class TopEnd(enum.Enum):
    """Why `run_top` returned."""

    DONE = "done"  # printed the frames asked for
    QUIT = "quit"  # q, Ctrl-C (KeyboardInterrupt) or end of input
    EXITED = "exited"  # the watched process exited (or stopped its pool)


class _Screen:
    """Raw-ish terminal while the interactive view runs: cbreak (keys without Enter, Ctrl-C
    still a signal), alternate screen, hidden cursor; all of it restored on the way out."""

    def __init__(self, out: TextIO, keys: TextIO | None) -> None:
        self.out = out
        self.fd = keys.fileno() if keys is not None else -1
        self._saved: list[Any] | None = None

    def __enter__(self) -> _Screen:
        import termios
        import tty

        self._saved = termios.tcgetattr(self.fd)
        tty.setcbreak(self.fd, termios.TCSANOW)
        self.out.write(_ENTER)
        self.out.flush()
        return self

    def __exit__(self, *exc: object) -> None:
        import termios

        with contextlib.suppress(OSError, ValueError):
            self.out.write(_LEAVE)
            self.out.flush()
        if self._saved is not None:
            with contextlib.suppress(OSError, termios.error):
                termios.tcsetattr(self.fd, termios.TCSADRAIN, self._saved)

    def draw(self, text: str) -> None:
        self.out.write(_CLEAR + text)
        self.out.flush()

    def wait_quit(self, timeout: float) -> bool:
        """Wait up to `timeout` s for a key; True if it says quit (q, Q, end of input)."""
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            try:
                ready, _, _ = select.select([self.fd], [], [], left)
            except InterruptedError:
                continue
            if ready:
                data = os.read(self.fd, 64)
                if not data or b"q" in data or b"Q" in data:
                    return True


def _still_running(region: Region) -> bool:
    return region.alive and os.path.exists(region.path)


def run_top(
    region: Region,
    *,
    interval: float = 1.0,
    iterations: int | None = None,
    out: TextIO,
    keys: TextIO | None = None,
) -> TopEnd:
    """Show `region` every `interval` s until q/Ctrl-C, `iterations` frames, or its process
    exits.

    Interactive (a redrawn screen read for keys) when no `iterations` are asked for and both
    `out` and `keys` are terminals; otherwise frames are printed one after another (what
    scripts, pipes and tests read), each measured over one interval.
    """
    interactive = (iterations is None and keys is not None and out.isatty()
                   and keys.isatty())
    prev = take_snapshot(region)
    frames = 0
    next_at = prev.time + interval
    screen = _Screen(out, keys) if interactive else None
    with screen if screen is not None else contextlib.nullcontext():
        try:
            if screen is not None:  # draw at once: the table fills in after one interval
                screen.draw(_frame(compute_rates(None, prev)))
            while iterations is None or frames < iterations:
                wait = max(0.0, next_at - time.monotonic())
                if screen is not None:
                    if screen.wait_quit(wait):
                        return TopEnd.QUIT
                else:
                    time.sleep(wait)
                next_at += interval
                if not _still_running(region):
                    return TopEnd.EXITED
                cur = take_snapshot(region)
                view = compute_rates(prev, cur)
                prev = cur
                frames += 1
                if screen is not None:
                    screen.draw(_frame(view))
                else:
                    out.write(("\n" if frames > 1 else "") + render_top(view))
                    out.flush()
        except KeyboardInterrupt:
            return TopEnd.QUIT
    return TopEnd.DONE


def _frame(view: TopView) -> str:
    size = shutil.get_terminal_size()
    text = render_top(view, width=size.columns - 1, footer="q: quit")
    return "\n".join(text.split("\n")[: max(1, size.lines - 1)])
