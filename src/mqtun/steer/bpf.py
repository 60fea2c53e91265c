"""bpf(2) from Python through ctypes: load socket-filter programs, array maps, test runs.

Every kernel object is an fd owned by a Python object with `fileno()`, `close()` and a context
manager; the object closes its fd when garbage-collected too. A program the verifier refuses
raises `VerifierError`, whose message carries the verifier's own log.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno as _errno
import os
import re
import struct
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from mqtun import _uapi as u
from mqtun.errors import InvalidArgumentError, MqtunError, PermissionDeniedError

__all__ = [
    "ArrayMap",
    "BpfError",
    "BpfObject",
    "MapInfo",
    "Program",
    "ProgramInfo",
    "TestRun",
    "VerifierError",
    "link_create",
    "loaded_program_ids",
]

_libc = ctypes.CDLL(None, use_errno=True)
_syscall = _libc.syscall
_syscall.restype = ctypes.c_long
_syscall.argtypes = [ctypes.c_long, ctypes.c_long, ctypes.c_void_p, ctypes.c_ulong]

_CMD_NAMES = {
    u.BPF_MAP_CREATE: "BPF_MAP_CREATE",
    u.BPF_MAP_LOOKUP_ELEM: "BPF_MAP_LOOKUP_ELEM",
    u.BPF_MAP_UPDATE_ELEM: "BPF_MAP_UPDATE_ELEM",
    u.BPF_MAP_UPDATE_BATCH: "BPF_MAP_UPDATE_BATCH",
    u.BPF_PROG_LOAD: "BPF_PROG_LOAD",
    u.BPF_PROG_TEST_RUN: "BPF_PROG_TEST_RUN",
    u.BPF_OBJ_GET_INFO_BY_FD: "BPF_OBJ_GET_INFO_BY_FD",
    u.BPF_PROG_GET_NEXT_ID: "BPF_PROG_GET_NEXT_ID",
    u.BPF_LINK_CREATE: "BPF_LINK_CREATE",
}

_LOG_START = 1 << 20  # verifier log buffer for the second (logging) load
_LOG_MAX = 1 << 26
_MESSAGE_LOG_LINES = 200  # the error message keeps this many last lines of the log


class BpfError(MqtunError):
    """A bpf(2) command the kernel refused."""


class VerifierError(BpfError):
    """The verifier refused a program; `log` is its full log, the message ends with it."""

    def __init__(self, err: int, message: str, log: str, *, name: str = "") -> None:
        super().__init__(err, message, op="bpf_prog_load")
        self.log = log
        self.name = name

    def __reduce__(self):  # type: ignore[no-untyped-def]
        return (_rebuild_verifier, (self.errno, self.message, self.log, self.name))


def _rebuild_verifier(err: int, message: str, log: str, name: str) -> VerifierError:
    return VerifierError(err, message, log, name=name)


def _bpf(cmd: int, attr: ctypes.Array[ctypes.c_char], what: str = "") -> int:
    """Run one bpf(2) command; raise a BpfError that says which command and why."""
    ret = _syscall(u.syscall_number("bpf"), cmd, ctypes.addressof(attr), len(attr))
    if ret < 0:
        err = ctypes.get_errno()
        raise _bpf_error(err, cmd, what)
    return int(ret)


def _bpf_error(err: int, cmd: int, what: str) -> MqtunError:
    name = _CMD_NAMES.get(cmd, f"bpf command {cmd}")
    subject = f" ({what})" if what else ""
    text = f"{name}{subject} failed: {os.strerror(err)}"
    # EACCES from BPF_PROG_LOAD is mostly the verifier saying no: the caller reads the log
    if err == _errno.EPERM or (err == _errno.EACCES and cmd != u.BPF_PROG_LOAD):
        return PermissionDeniedError(
            err, f"{text}: loading BPF programs and maps needs CAP_BPF/CAP_SYS_ADMIN (root)",
            op=name.lower(),
        )
    if err == _errno.ENOSYS:
        text += ": this kernel has no bpf(2) (CONFIG_BPF_SYSCALL)"
    elif err == _errno.E2BIG and cmd == u.BPF_PROG_LOAD:
        text += ": the program is longer than the kernel accepts"
    return BpfError(err, text, op=name.lower())


def _buf(data: bytes) -> ctypes.Array[ctypes.c_char]:
    return ctypes.create_string_buffer(data, max(len(data), 1))


def _addr(buf: ctypes.Array[ctypes.c_char] | None) -> int:
    return 0 if buf is None else ctypes.addressof(buf)


def _obj_name(name: str) -> bytes:
    """A kernel object name: at most 15 of [A-Za-z0-9_.]."""
    clean = re.sub(r"[^A-Za-z0-9_.]", "_", name)[: u.BPF_OBJ_NAME_LEN - 1]
    return clean.encode()


class BpfObject:
    """An fd that refers to a BPF program or map."""

    kind = "bpf object"

    def __init__(self, fd: int, name: str = "") -> None:
        self._fd = fd
        self.name = name

    def fileno(self) -> int:
        if self._fd < 0:
            raise BpfError(_errno.EBADF, f"{self.kind} {self.name!r} is closed", op="fileno")
        return self._fd

    @property
    def closed(self) -> bool:
        return self._fd < 0

    def close(self) -> None:
        fd, self._fd = self._fd, -1
        if fd >= 0:
            os.close(fd)

    def __enter__(self):  # type: ignore[no-untyped-def]
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        with contextlib.suppress(Exception):  # interpreter teardown: nothing to do
            self.close()

    def __repr__(self) -> str:
        state = "closed" if self._fd < 0 else f"fd={self._fd}"
        return f"<{type(self).__name__} {self.name!r} {state}>"

    def _info(self, fmt: str, size: int) -> tuple[Any, ...]:
        info = ctypes.create_string_buffer(size)
        attr = ctypes.create_string_buffer(struct.pack(u.BPF_OBJ_GET_INFO_FORMAT,
                                                       self.fileno(), size, _addr(info)),
                                        u.BPF_OBJ_GET_INFO_ATTR_SIZE)
        _bpf(u.BPF_OBJ_GET_INFO_BY_FD, attr, self.name)
        return struct.unpack_from(fmt, info.raw)


@dataclass(frozen=True)
class ProgramInfo:
    """What BPF_OBJ_GET_INFO_BY_FD reports about a program (also what `bpftool prog` shows)."""

    id: int
    type: int
    tag: str
    name: str
    xlated_len: int
    jited_len: int
    map_ids: tuple[int, ...]
    load_time_ns: int
    created_by_uid: int


@dataclass(frozen=True)
class MapInfo:
    id: int
    type: int
    key_size: int
    value_size: int
    max_entries: int
    flags: int
    name: str


@dataclass(frozen=True)
class TestRun:
    """The result of BPF_PROG_TEST_RUN: the program's return value and the time it took."""

    retval: int
    duration_ns: int
    data_out: bytes


class Program(BpfObject):
    """A loaded BPF program (a socket filter unless told otherwise).

    Attach it with the device: `dev.set_steering_program(prog)` or `dev.set_filter_program(prog)`
    take any object with `fileno()`. The kernel keeps its own reference while it is attached, so
    closing the Python object afterwards does not detach it."""

    kind = "BPF program"

    def __init__(self, fd: int, name: str = "", maps: Iterable[BpfObject] = (),
                 insn_count: int = 0) -> None:
        super().__init__(fd, name)
        self.maps = tuple(maps)  # kept open for as long as the program object lives
        self.insn_count = insn_count

    @classmethod
    def load(
        cls,
        code: bytes,
        *,
        name: str = "mqtun",
        prog_type: int = u.BPF_PROG_TYPE_SOCKET_FILTER,
        license: str = "GPL",
        maps: Iterable[BpfObject] = (),
        log_level: int = 0,
    ) -> Program:
        """BPF_PROG_LOAD. On refusal, load again with the verifier log on and raise
        `VerifierError` carrying that log. `maps` are the maps the code refers to (by fd)."""
        if not code or len(code) % u.BPF_INSN_SIZE:
            raise InvalidArgumentError(
                f"program code must be a non-empty multiple of {u.BPF_INSN_SIZE} bytes",
                op="bpf_prog_load",
            )
        count = len(code) // u.BPF_INSN_SIZE
        insns = _buf(code)
        lic = _buf(license.encode() + b"\0")
        try:
            fd = _prog_load(prog_type, insns, count, lic, name, log_level, None)[0]
        except BpfError as exc:  # (permission errors are not BpfError: they pass through)
            raise _verifier_error(prog_type, insns, count, lic, name, exc) from None
        return cls(fd, name, maps, count)

    def info(self) -> ProgramInfo:
        (ptype, pid, tag, jited, xlated, _ji, _xi, load_time, uid, nr_maps, _mids,
         raw_name) = self._info(u.BPF_PROG_INFO_FORMAT, u.BPF_PROG_INFO_SIZE)
        map_ids: tuple[int, ...] = ()
        if nr_maps:
            ids = ctypes.create_string_buffer(4 * int(nr_maps))
            info = bytearray(u.BPF_PROG_INFO_SIZE)
            struct.pack_into("=I", info, u.BPF_PROG_INFO_NR_MAP_IDS_OFFSET, int(nr_maps))
            struct.pack_into("=Q", info, u.BPF_PROG_INFO_MAP_IDS_OFFSET, ctypes.addressof(ids))
            info_buf = ctypes.create_string_buffer(bytes(info), len(info))
            attr = ctypes.create_string_buffer(struct.pack(
                u.BPF_OBJ_GET_INFO_FORMAT, self.fileno(), len(info), _addr(info_buf)),
                u.BPF_OBJ_GET_INFO_ATTR_SIZE)
            _bpf(u.BPF_OBJ_GET_INFO_BY_FD, attr, self.name)
            map_ids = struct.unpack(f"={int(nr_maps)}I", ids.raw)
        return ProgramInfo(
            id=int(pid), type=int(ptype), tag=bytes(tag).hex(),
            name=bytes(raw_name).split(b"\0", 1)[0].decode(),
            xlated_len=int(xlated), jited_len=int(jited), map_ids=map_ids,
            load_time_ns=int(load_time), created_by_uid=int(uid),
        )

    def test_run(self, data: bytes, *, repeat: int = 1, out_size: int = 0) -> TestRun:
        """BPF_PROG_TEST_RUN on one synthetic packet, no device needed.

        For a socket filter the kernel builds an skb from `data`, treats its first 14 bytes as
        an Ethernet header and pulls it: the program sees `data[14:]` (the TUN view). To test
        the TAP view, put any 14 bytes in front of the frame (see `tap_view`)."""
        if len(data) < u.ETH_HLEN:
            raise InvalidArgumentError(
                f"test data needs at least {u.ETH_HLEN} bytes (an Ethernet header)", op="test_run"
            )
        din = _buf(data)
        dout = ctypes.create_string_buffer(out_size) if out_size else None
        attr = ctypes.create_string_buffer(struct.pack(
            u.BPF_PROG_TEST_RUN_FORMAT, self.fileno(), 0, len(data), out_size, _addr(din),
            _addr(dout), max(repeat, 1), 0, 0, 0, 0, 0, 0, 0, 0,
        ))
        _bpf(u.BPF_PROG_TEST_RUN, attr, self.name)
        retval, = struct.unpack_from("=I", attr, u.BPF_PROG_TEST_RUN_RETVAL_OFFSET)
        size_out, = struct.unpack_from("=I", attr, u.BPF_PROG_TEST_RUN_DATA_SIZE_OUT_OFFSET)
        duration, = struct.unpack_from("=I", attr, u.BPF_PROG_TEST_RUN_DURATION_OFFSET)
        out = dout.raw[: min(size_out, out_size)] if dout is not None else b""
        return TestRun(retval, duration, out)

    def run(self, packet: bytes, *, tap: bool = False) -> int:
        """The program's return value for `packet` as a TUN (IP first) or TAP (Ethernet
        first) device would hand it over. Shorthand for `test_run(...).retval`."""
        return self.test_run(tap_view(packet) if tap else tun_view(packet)).retval


def tun_view(packet: bytes) -> bytes:
    """Test-run input under which a socket filter sees `packet` at offset 0 (IP first).

    The 14 bytes in front become skb->protocol: the IP ethertype when the packet holds a whole
    IP header (the kernel refuses shorter ones under that ethertype), else a neutral one."""
    ethertype = u.ETH_P_802_EX1
    if packet[:1] and packet[0] >> 4 == 4 and len(packet) >= u.IPV4_HDR_MIN:
        ethertype = u.ETH_P_IP
    elif packet[:1] and packet[0] >> 4 == 6 and len(packet) >= u.IPV6_HDR_LEN:
        ethertype = u.ETH_P_IPV6
    return bytes(12) + ethertype.to_bytes(2, "big") + packet


def tap_view(frame: bytes) -> bytes:
    """Test-run input under which a socket filter sees the Ethernet `frame` at offset 0."""
    return bytes(12) + u.ETH_P_802_EX1.to_bytes(2, "big") + frame


def _prog_load(
    prog_type: int,
    insns: ctypes.Array[ctypes.c_char],
    count: int,
    lic: ctypes.Array[ctypes.c_char],
    name: str,
    log_level: int,
    log: ctypes.Array[ctypes.c_char] | None,
) -> tuple[int, int]:
    """(fd, log_true_size)."""
    head = struct.pack(
        u.BPF_PROG_LOAD_FORMAT, prog_type, count, _addr(insns), _addr(lic),
        log_level if log is not None else 0, len(log) if log is not None else 0, _addr(log),
        0, 0, _obj_name(name),
    )
    attr = ctypes.create_string_buffer(head, u.BPF_PROG_LOAD_ATTR_SIZE)
    try:
        fd = _bpf(u.BPF_PROG_LOAD, attr, name)
    except BpfError as exc:
        true_size, = struct.unpack_from("=I", attr, u.BPF_PROG_LOAD_LOG_TRUE_SIZE_OFFSET)
        exc.log_true_size = true_size  # type: ignore[attr-defined]
        raise
    true_size, = struct.unpack_from("=I", attr, u.BPF_PROG_LOAD_LOG_TRUE_SIZE_OFFSET)
    return fd, true_size


def _verifier_error(
    prog_type: int,
    insns: ctypes.Array[ctypes.c_char],
    count: int,
    lic: ctypes.Array[ctypes.c_char],
    name: str,
    first: BpfError,
) -> MqtunError:
    size = _LOG_START
    err = first.errno or _errno.EINVAL
    text = ""
    for _ in range(4):
        log = ctypes.create_string_buffer(size)
        try:
            fd, _ = _prog_load(prog_type, insns, count, lic, name, u.BPF_LOG_LEVEL1, log)
        except BpfError as exc:
            text = log.value.decode(errors="replace")
            err = exc.errno or err
            need = getattr(exc, "log_true_size", 0)
            if exc.errno == _errno.ENOSPC and need > size and size < _LOG_MAX:
                size = min(max(need + 1, size * 4), _LOG_MAX)
                continue
            break
        else:  # loads with the log on, though it did not without: report the first error
            os.close(fd)
            break
    if not text.strip():
        if first.errno == _errno.EACCES:
            return PermissionDeniedError(
                first.errno, f"{first.message}: loading BPF programs needs CAP_BPF (root)",
                op="bpf_prog_load")
        return first
    lines = text.rstrip("\n").splitlines()
    shown = lines[-_MESSAGE_LOG_LINES:]
    cut = "" if len(shown) == len(lines) else f"(last {len(shown)} of {len(lines)} lines)\n"
    message = (
        f"the kernel's verifier refused program {name!r} ({count} instructions, "
        f"{_errno.errorcode.get(err, err)}); its log says why:\n--- verifier log ---\n{cut}"
        + "\n".join(shown)
    )
    return VerifierError(err, message, text, name=name)


class ArrayMap(BpfObject):
    """A BPF_MAP_TYPE_ARRAY: `max_entries` slots of `value_size` bytes, keys 0..n-1 (u32).

    Reads and writes from userspace go through bpf(2) and take effect for the next packet the
    program sees: no reload. A write of one slot is not atomic against a concurrent reader
    for values larger than 8 bytes."""

    kind = "BPF array map"

    def __init__(self, fd: int, value_size: int, max_entries: int, name: str = "") -> None:
        super().__init__(fd, name)
        self.value_size = value_size
        self.max_entries = max_entries

    @classmethod
    def create(cls, value_size: int, max_entries: int, *, name: str = "mqtun_map",
               flags: int = 0) -> ArrayMap:
        if value_size <= 0 or max_entries <= 0:
            raise InvalidArgumentError("an array map needs value_size > 0 and max_entries > 0",
                                       op="bpf_map_create")
        attr = ctypes.create_string_buffer(struct.pack(
            u.BPF_MAP_CREATE_FULL_FORMAT, u.BPF_MAP_TYPE_ARRAY, 4, value_size, max_entries,
            flags, 0, 0, _obj_name(name)), u.BPF_ATTR_SIZE)
        fd = _bpf(u.BPF_MAP_CREATE, attr, name)
        return cls(fd, value_size, max_entries, name)

    def __len__(self) -> int:
        return self.max_entries

    def _check_key(self, key: int) -> None:
        if not 0 <= key < self.max_entries:
            raise InvalidArgumentError(
                f"key {key} is outside {self.name!r} (0..{self.max_entries - 1})", op="bpf_map"
            )

    def lookup(self, key: int) -> bytes:
        self._check_key(key)
        k = _buf(struct.pack("=I", key))
        v = ctypes.create_string_buffer(self.value_size)
        attr = ctypes.create_string_buffer(struct.pack(
            u.BPF_MAP_ELEM_FORMAT, self.fileno(), _addr(k), _addr(v), 0), u.BPF_ATTR_SIZE)
        _bpf(u.BPF_MAP_LOOKUP_ELEM, attr, self.name)
        return v.raw

    def update(self, key: int, value: bytes) -> None:
        self._check_key(key)
        if len(value) != self.value_size:
            raise InvalidArgumentError(
                f"{self.name!r} holds {self.value_size}-byte values, not {len(value)}",
                op="bpf_map",
            )
        k = _buf(struct.pack("=I", key))
        v = _buf(value)
        attr = ctypes.create_string_buffer(struct.pack(
            u.BPF_MAP_ELEM_FORMAT, self.fileno(), _addr(k), _addr(v), u.BPF_ANY),
            u.BPF_ATTR_SIZE)
        _bpf(u.BPF_MAP_UPDATE_ELEM, attr, self.name)

    def update_many(self, items: Mapping[int, bytes]) -> None:
        """Write several slots with one BPF_MAP_UPDATE_BATCH (one syscall)."""
        if not items:
            return
        keys = sorted(items)
        for key in keys:
            self._check_key(key)
            if len(items[key]) != self.value_size:
                raise InvalidArgumentError(
                    f"{self.name!r} holds {self.value_size}-byte values", op="bpf_map")
        kbuf = _buf(struct.pack(f"={len(keys)}I", *keys))
        vbuf = _buf(b"".join(items[k] for k in keys))
        attr = ctypes.create_string_buffer(struct.pack(
            u.BPF_MAP_BATCH_FORMAT, 0, 0, _addr(kbuf), _addr(vbuf), len(keys), self.fileno(),
            0, 0), u.BPF_ATTR_SIZE)
        try:
            _bpf(u.BPF_MAP_UPDATE_BATCH, attr, self.name)
        except BpfError as exc:
            if exc.errno not in (_errno.EINVAL, _errno.ENOTTY, u.ENOTSUPP):  # old kernel
                raise
            for key in keys:
                self.update(key, items[key])

    def __getitem__(self, key: int) -> bytes:
        return self.lookup(key)

    def __setitem__(self, key: int, value: bytes) -> None:
        self.update(key, value)

    def __iter__(self) -> Iterator[bytes]:
        for i in range(self.max_entries):
            yield self.lookup(i)

    def info(self) -> MapInfo:
        mtype, mid, ks, vs, me, flags, raw_name = self._info(u.BPF_MAP_INFO_FORMAT,
                                                             u.BPF_MAP_INFO_SIZE)
        return MapInfo(int(mid), int(mtype), int(ks), int(vs), int(me), int(flags),
                       bytes(raw_name).split(b"\0", 1)[0].decode())


def loaded_program_ids() -> list[int]:
    """Ids of every BPF program loaded in the system (what `bpftool prog` walks)."""
    ids: list[int] = []
    start = 0
    for _ in range(1 << 20):
        attr = ctypes.create_string_buffer(struct.pack("=II", start, 0), u.BPF_ATTR_SIZE)
        try:
            _bpf(u.BPF_PROG_GET_NEXT_ID, attr)
        except BpfError as exc:
            if exc.errno == _errno.ENOENT:
                break
            raise
        start, = struct.unpack_from("=I", attr, 4)
        ids.append(start)
    return ids


def link_create(program: Program, ifindex: int, attach_type: int) -> BpfObject:
    """BPF_LINK_CREATE: attach `program` to a device (e.g. attach_type BPF_TCX_EGRESS for a
    SCHED_CLS program on the egress path). Closing the returned link detaches it."""
    attr = ctypes.create_string_buffer(struct.pack(
        u.BPF_LINK_CREATE_FORMAT, program.fileno(), ifindex, attach_type, 0), u.BPF_ATTR_SIZE)
    link = BpfObject(_bpf(u.BPF_LINK_CREATE, attr, program.name), f"{program.name}@{ifindex}")
    link.kind = "BPF link"
    return link
