"""Per-queue counters in a small, self-describing shared-memory region.

A runtime parent creates one region per pool, a file under /dev/shm named
``mqtun.<pid>.<name>.<16 random hex digits>`` (created with O_EXCL: a name nobody can take
first, since /dev/shm is world-writable), maps it, and hands each worker the `Counters` of
its queue(s) backed by that mapping (fork keeps a MAP_SHARED mapping shared). The parent,
`mqtun show`, `mqtun top` or any other process reads the figures live with `open_region()`;
nobody but the worker writes a queue's slots, and every slot is an aligned 64-bit word, so a
reader never sees a torn value.

Layout (native byte order, all offsets fixed by the header itself):

    header (HEADER_SIZE bytes)
      magic "MQTUNSHM", version u32, header_size u32, entry_size u32, slot_count u32,
      capacity u32, used u32, pid u32, pid_start u64 (the creator's start time in clock
      ticks, to tell a reused pid), created f64 (unix time), ndevices u32, name[64],
      devices[MAX_DEVICES][16], fields[FIELDS_SIZE] (comma-separated slot names)
    entries[capacity], each entry_size bytes
      device u32 (index into devices), queue u32 (the pool's queue number), worker_pid u32,
      state u32 (EntryState), restarts u32, cpu i32 (-1: not pinned), reserved[8],
      slots[slot_count] u64 (mqtun.stats.Counters layout)

A region whose creator is dead is stale: `list_regions()` reports it with ``alive=False`` and
`remove_stale_regions()` deletes it (a pool does at start; `mqtun show --clean` on request).

Nothing under /dev/shm is trusted: a file is opened with O_NOFOLLOW|O_NONBLOCK (a planted FIFO
or symlink neither hangs nor redirects the reader) and accepted only if it is a regular file
owned by the user its creator's pid runs as (or by us), of exactly the size its header
describes, with a consistent header; anything else is refused in one line (MqtunError).
"""

from __future__ import annotations

import contextlib
import enum
import errno
import mmap
import os
import re
import secrets
import stat
import struct
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from mqtun.errors import InvalidArgumentError, MqtunError
from mqtun.stats import COUNTER_FIELDS, SLOT_COUNT, Counters, DropReason, QueueStats

__all__ = [
    "SHM_DIR",
    "EntryInfo",
    "EntryState",
    "Region",
    "RegionInfo",
    "list_regions",
    "open_region",
    "queue_stats_by_device",
    "remove_stale_regions",
]

SHM_DIR = os.environ.get("MQTUN_SHM_DIR", "/dev/shm")  # another directory: for tests
MAGIC = b"MQTUNSHM"
VERSION = 1
MAX_DEVICES = 8
NAME_SIZE = 64
FIELDS_SIZE = 512
_HEAD = struct.Struct(f"=8sIIIIIIIQdI{NAME_SIZE}s{MAX_DEVICES * 16}s{FIELDS_SIZE}s")
HEADER_SIZE = (_HEAD.size + 63) // 64 * 64
_USED_OFFSET = 8 + 4 * 5  # magic + version, header_size, entry_size, slot_count, capacity
_ENTRY_META = struct.Struct("=IIIIIi8x")
ENTRY_SIZE = _ENTRY_META.size + SLOT_COUNT * 8
_FILE_RE = re.compile(r"^mqtun\.(\d+)\.([A-Za-z0-9_.-]+?)(?:\.[0-9a-f]{16})?$")
_OPEN_FLAGS = os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC


class EntryState(enum.IntEnum):
    """What the worker of an entry is doing."""

    FREE = 0  # no queue in this entry (yet, or any more)
    STARTING = 1
    RUNNING = 2
    STOPPED = 3  # stopped on request
    CRASHED = 4  # died; the supervisor restarts it
    GONE = 5  # its device went away

    @property
    def label(self) -> str:
        return self.name.lower()


@dataclass(frozen=True)
class EntryInfo:
    """One queue's identity and counters at one moment."""

    entry: int
    device: str
    queue: int
    worker_pid: int
    state: EntryState
    restarts: int
    cpu: int | None
    stats: QueueStats


@dataclass(frozen=True)
class RegionInfo:
    """A region found under /dev/shm, before opening it."""

    path: str
    pid: int
    name: str
    alive: bool


def _field_names() -> list[str]:
    return [*COUNTER_FIELDS, *(f"drop_{r.label}" for r in DropReason)]


def _proc_start_time(pid: int) -> int:
    """The start time of `pid` in clock ticks since boot (0 if it does not exist)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return 0
    # the command may hold spaces and parentheses: fields start after the last ')'
    rest = stat[stat.rfind(b")") + 2:].split()
    return int(rest[19]) if len(rest) > 19 else 0


def _pid_alive(pid: int, start: int) -> bool:
    if pid <= 0:
        return False
    now = _proc_start_time(pid)
    return now != 0 and (start == 0 or now == start)


def _valid_name(name: str) -> str:
    if not re.fullmatch(r"[A-Za-z0-9_.-]{1,48}", name):
        raise InvalidArgumentError(
            f"region name {name!r}: use 1..48 letters, digits, '_', '.' or '-'"
        )
    return name


class Region:
    """A mapped counters region. `create()` makes one (the owner); `open()` reads one."""

    def __init__(self, path: str, mm: mmap.mmap, *, owner: bool) -> None:
        self.path = path
        self._mm = mm
        self.owner = owner
        (_magic, version, header_size, entry_size, slot_count, capacity, _used, pid,
         pid_start, created, ndevices, name, devices, fields) = _check_header(path, mm)
        self._view = memoryview(mm)
        self.version: int = version
        self.header_size: int = header_size
        self.entry_size: int = entry_size
        self.slot_count: int = slot_count
        self.capacity: int = capacity
        self.pid: int = pid
        self.pid_start: int = pid_start
        self.created: float = created
        self.name = name.rstrip(b"\0").decode(errors="replace")
        raw = [devices[i * 16:(i + 1) * 16].rstrip(b"\0").decode(errors="replace")
               for i in range(ndevices)]
        self.devices: list[str] = raw
        self.fields = fields.rstrip(b"\0").decode(errors="replace").split(",")
        self._counters: dict[int, Counters] = {}

    # ---- making and finding ---------------------------------------------------------------
    @classmethod
    def create(
        cls,
        name: str,
        devices: Sequence[str],
        capacity: int,
        *,
        directory: str = SHM_DIR,
    ) -> Region:
        """Create and map a new region for `capacity` queue entries.

        Entries start FREE; `claim()` assigns one to a (device, queue) pair.
        """
        _valid_name(name)
        if not 1 <= capacity <= 65536:
            raise InvalidArgumentError(f"region capacity must be 1..65536, not {capacity}")
        if not 1 <= len(devices) <= MAX_DEVICES:
            raise InvalidArgumentError(f"a region names 1..{MAX_DEVICES} devices")
        remove_stale_regions(directory)
        pid = os.getpid()
        size = HEADER_SIZE + capacity * ENTRY_SIZE
        fields = ",".join(_field_names()).encode()
        packed_devs = b"".join(d.encode()[:15].ljust(16, b"\0") for d in devices)
        head = _HEAD.pack(MAGIC, VERSION, HEADER_SIZE, ENTRY_SIZE, SLOT_COUNT, capacity, 0,
                          pid, _proc_start_time(pid), time.time(), len(devices),
                          name.encode(), packed_devs, fields)
        for _attempt in range(8):  # a random part: nobody can create our name first
            path = os.path.join(directory, f"mqtun.{pid}.{name}.{secrets.token_hex(8)}")
            try:
                fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | _OPEN_FLAGS, 0o644)
                break
            except FileExistsError:
                continue
            except OSError as exc:
                raise MqtunError(exc.errno or errno.EIO, f"cannot create {path}: "
                                 f"{exc.strerror}", op="create_region") from None
        else:
            raise MqtunError(errno.EEXIST, f"cannot create a counters region under {directory}",
                             op="create_region")
        try:
            os.ftruncate(fd, size)
            mm = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        except BaseException:
            os.close(fd)
            with contextlib.suppress(OSError):
                os.unlink(path)
            raise
        os.close(fd)
        mm[:len(head)] = head
        return cls(path, mm, owner=True)

    @classmethod
    def open(cls, path: str) -> Region:
        """Map an existing region read-only (after the checks in the module doc)."""
        fd = _open_checked(path)
        try:
            size = os.fstat(fd).st_size
            head = os.pread(fd, _HEAD.size, 0)
            _check_header(path, head, size)
            mm = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ)
        finally:
            os.close(fd)
        return cls(path, mm, owner=False)

    # ---- entries ------------------------------------------------------------------------------
    @property
    def used(self) -> int:
        """How many entries have ever been claimed (entries past it are FREE)."""
        return int(struct.unpack_from("=I", self._mm, _USED_OFFSET)[0])

    @property
    def alive(self) -> bool:
        """Whether the process that made the region still runs."""
        return _pid_alive(self.pid, self.pid_start)

    def _entry_offset(self, entry: int) -> int:
        if not 0 <= entry < self.capacity:
            raise IndexError(f"entry {entry} out of range (capacity {self.capacity})")
        return self.header_size + entry * self.entry_size

    def claim(self, device: int, queue: int) -> int:
        """Owner: take the first FREE entry for queue `queue` of devices[`device`]."""
        self._require_owner()
        if not 0 <= device < len(self.devices):
            raise InvalidArgumentError(f"device index {device} out of range")
        for entry in range(self.capacity):
            if self._meta(entry)[3] == EntryState.FREE:
                off = self._entry_offset(entry)
                self._view[off + _ENTRY_META.size: off + self.entry_size] = bytes(
                    self.entry_size - _ENTRY_META.size)
                _ENTRY_META.pack_into(self._mm, off, device, queue, 0, EntryState.STARTING, 0,
                                      -1)
                if entry >= self.used:
                    struct.pack_into("=I", self._mm, _USED_OFFSET, entry + 1)
                return entry
        raise MqtunError(errno.ENOSPC,
                         f"counters region {self.path} is full ({self.capacity} entries)",
                         op="claim")

    def release(self, entry: int) -> None:
        """Owner: mark an entry FREE (its counters stay readable until it is claimed again)."""
        self.set_state(entry, EntryState.FREE)

    def set_worker(self, entry: int, *, pid: int | None = None, state: EntryState | None = None,
                   restarts: int | None = None, cpu: int | bool | None = False) -> None:
        """Owner (or the entry's worker): update the entry's worker fields."""
        self._require_owner()
        off = self._entry_offset(entry)
        dev, queue, wpid, wstate, wrestarts, wcpu = _ENTRY_META.unpack_from(self._mm, off)
        _ENTRY_META.pack_into(
            self._mm, off, dev, queue,
            wpid if pid is None else pid,
            wstate if state is None else int(state),
            wrestarts if restarts is None else restarts,
            wcpu if cpu is False else (-1 if cpu is None else int(cpu)),
        )

    def set_state(self, entry: int, state: EntryState) -> None:
        self.set_worker(entry, state=state)

    def counters(self, entry: int) -> Counters:
        """The live Counters of an entry: writable for the owner and its forked workers,
        read-only (but live: `snapshot()` reads the current values) for a reader."""
        c = self._counters.get(entry)
        if c is None:
            off = self._entry_offset(entry) + _ENTRY_META.size
            c = self._counters[entry] = Counters(self._view[off: off + self.slot_count * 8])
        return c

    def _meta(self, entry: int) -> tuple[int, int, int, int, int, int]:
        return _ENTRY_META.unpack_from(self._mm, self._entry_offset(entry))

    def entry(self, entry: int) -> EntryInfo:
        """A consistent-enough snapshot of one entry (each slot is read atomically)."""
        dev, queue, pid, state, restarts, cpu = self._meta(entry)
        off = self._entry_offset(entry) + _ENTRY_META.size
        values = list(struct.unpack_from(f"={self.slot_count}Q", self._mm, off))
        stats = self._stats_from(values)
        name = self.devices[dev] if dev < len(self.devices) else f"#{dev}"
        known = state in {s.value for s in EntryState}
        return EntryInfo(entry, name, queue, pid, EntryState(state) if known else EntryState.FREE,
                         restarts, None if cpu < 0 else cpu, stats)

    def _stats_from(self, values: list[int]) -> QueueStats:
        by_name = dict(zip(self.fields, values, strict=False))
        drops = {k[5:]: v for k, v in by_name.items() if k.startswith("drop_") and v}
        g = by_name.get
        return QueueStats(g("read_packets", 0), g("read_bytes", 0), g("written_packets", 0),
                          g("written_bytes", 0), g("read_errors", 0), g("write_errors", 0),
                          dropped=drops)

    def entries(self, *, include_free: bool = False) -> list[EntryInfo]:
        """Every claimed entry (FREE ones too if asked)."""
        out = [self.entry(i) for i in range(min(self.used, self.capacity))]
        return out if include_free else [e for e in out if e.state != EntryState.FREE]

    # ---- lifecycle ----------------------------------------------------------------------------
    def _require_owner(self) -> None:
        if not self.owner:
            raise MqtunError(errno.EPERM, f"counters region {self.path} is opened read-only",
                             op="region")

    def close(self) -> None:
        """Unmap (the owner's Counters views must not be used afterwards)."""
        self._counters.clear()
        with contextlib.suppress(BufferError, ValueError):
            self._view.release()
            self._mm.close()

    def unlink(self) -> None:
        """Owner: remove the file (mappings stay valid until closed)."""
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)

    def __enter__(self) -> Region:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.owner and os.getpid() == self.pid:
            self.unlink()
        self.close()

    def __repr__(self) -> str:
        return f"<Region {self.path} devices={self.devices} used={self.used}>"


def _bad(path: str, why: str) -> MqtunError:
    return MqtunError(errno.EINVAL, f"{path} is not a usable mqtun counters region: {why}",
                      op="open_region")


def _expected_owners(path: str) -> set[int]:
    """Who may own a region file: us, and the user the creator's pid (in the name) runs as."""
    owners = {os.geteuid()}
    m = _FILE_RE.match(os.path.basename(path))
    if m:  # /proc/PID/status, not the owner of /proc/PID: that is root once a process has
        # dropped root (it is not dumpable)
        with contextlib.suppress(OSError, ValueError), open(f"/proc/{m.group(1)}/status") as f:
            for line in f:
                if line.startswith("Uid:"):
                    owners.update(int(u) for u in line.split()[1:3])  # real, effective
                    break
    return owners


def _open_checked(path: str) -> int:
    """Open a region file read-only without following a link or blocking on a FIFO; only a
    regular file of an expected owner is kept open."""
    try:
        fd = os.open(path, os.O_RDONLY | _OPEN_FLAGS)
    except OSError as exc:
        raise MqtunError(exc.errno or errno.EIO, f"cannot open counters region {path}: "
                         f"{exc.strerror}", op="open_region") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise _bad(path, "not a regular file")
        if st.st_uid not in _expected_owners(path):
            raise _bad(path, f"owned by uid {st.st_uid}, not by its creator")
    except BaseException:
        os.close(fd)
        raise
    return fd


def _check_header(path: str, buf: bytes | mmap.mmap,
                  size: int | None = None) -> tuple[Any, ...]:
    """The header's fields if they describe a region of exactly `size` bytes, else one-line
    MqtunError."""
    if size is None:
        size = len(buf)
    if size < HEADER_SIZE or len(buf) < _HEAD.size:
        raise _bad(path, f"{size} bytes, shorter than a header")
    head = _HEAD.unpack_from(buf, 0)
    magic, version, header_size, entry_size, slot_count, capacity, used = head[:7]
    ndevices = head[10]
    if magic != MAGIC:
        raise _bad(path, "no MQTUNSHM magic")
    if version != VERSION:
        raise _bad(path, f"version {version}, this mqtun reads version {VERSION}")
    if not (_HEAD.size <= header_size <= 1 << 20 and 1 <= slot_count <= 4096
            and entry_size >= _ENTRY_META.size + slot_count * 8 and 1 <= capacity <= 65536
            and used <= capacity and ndevices <= MAX_DEVICES):
        raise _bad(path, "inconsistent header")
    if header_size + capacity * entry_size != size:
        raise _bad(path, f"{size} bytes where its header describes "
                         f"{header_size + capacity * entry_size}")
    return head


def list_regions(directory: str = SHM_DIR) -> list[RegionInfo]:
    """Every mqtun region under `directory`, live or stale, oldest pid first."""
    out: list[RegionInfo] = []
    try:
        names = os.listdir(directory)
    except OSError:
        return out
    for fname in names:
        m = _FILE_RE.match(fname)
        if not m:
            continue
        pid = int(m.group(1))
        path = os.path.join(directory, fname)
        try:
            fd = _open_checked(path)
        except MqtunError:
            continue  # not ours to read (a FIFO, a link, another user's file)
        try:
            head = os.pread(fd, _HEAD.size, 0)
            start = _check_header(path, head, os.fstat(fd).st_size)[8]
        except (OSError, MqtunError):
            start = 0  # malformed: listed (so it can be cleaned) but never opened
        finally:
            os.close(fd)
        out.append(RegionInfo(path, pid, m.group(2), _pid_alive(pid, start)))
    return sorted(out, key=lambda r: (r.pid, r.name))


def open_region(which: str | int, directory: str = SHM_DIR) -> Region:
    """Open a region by path, by "<pid>.<name>", by name, or by the creator's pid."""
    if isinstance(which, str) and "/" in which:
        return Region.open(which)
    found = list_regions(directory)
    if isinstance(which, int) or (isinstance(which, str) and which.isdigit()):
        match = [r for r in found if r.pid == int(which)]
    else:
        match = [r for r in found if f"{r.pid}.{r.name}" == which or r.name == which]
    live = [r for r in match if r.alive] or match
    if not live:
        raise MqtunError(errno.ENOENT, f"no mqtun counters region {which!r} under {directory}",
                         op="open_region")
    return Region.open(live[-1].path)


def remove_stale_regions(directory: str = SHM_DIR) -> list[str]:
    """Delete the regions whose creator is dead; return their paths."""
    gone: list[str] = []
    for r in list_regions(directory):
        if not r.alive:
            # another user's stale region (sticky /dev/shm) is theirs to remove
            with contextlib.suppress(FileNotFoundError, PermissionError):
                os.unlink(r.path)
                gone.append(r.path)
    return gone


def queue_stats_by_device(directory: str = SHM_DIR) -> dict[str, list[EntryInfo]]:
    """Live per-queue counters of every running mqtun pool, by device name.

    What `mqtun show` and `mqtun top` need: the kernel keeps no per-queue counters for tun.
    """
    out: dict[str, list[EntryInfo]] = {}
    for info in list_regions(directory):
        if not info.alive:
            continue
        try:
            region = Region.open(info.path)
        except MqtunError:
            continue
        try:
            for e in region.entries():
                out.setdefault(e.device, []).append(e)
        finally:
            region.close()
    return out
