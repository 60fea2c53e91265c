"""A <-> forwarder <-> B: three network namespaces, the shape the demo and the benchmark share.

    ns A: dev 198.18.0.1/24  <->  ns F: forwarder (a process)  <->  ns B: dev 198.18.0.2/24

The forwarder is one of:

- ``veth``: a veth pair straight from A to B, no F, no userspace: the kernel-only ceiling;
- ``mqtun``: ``python -m mqtun forward`` run in F; once it prints ``READY queues=N`` its two
  devices are moved into A and B (the queue fds stay valid), as a container runtime would;
- ``pytun``: the same with python-pytun, the peer library (`mqtun.apps.pytun_forward`), or
  with ``compat`` the very same program on `mqtun.compat.pytun`;
- ``c``: the same with the bench's minimal C forwarder (``c_forward.c``, built by the bench;
  `ForwarderSpec.program` is the binary), offloads as mqtun forward negotiates them.

Everything lives in namespaces made here and is removed by `close()` -- on an exception and on
Ctrl-C too -- so nothing touches the machine's own namespace. Every wait is bounded.
"""

from __future__ import annotations

import contextlib
import errno
import os
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import mqtun
from mqtun.errors import InvalidArgumentError, MqtunError
from mqtun.netns import NetNamespace
from mqtun.runtime.shm import Region, list_regions

__all__ = ["A_IP", "B_IP", "KINDS", "ForwarderSpec", "LinkCounters", "QueueSample", "Topology",
           "check_lab", "cpu_seconds", "lab_errors", "udp_counters"]

A_IP, B_IP = "198.18.0.1", "198.18.0.2"
DEV_A, DEV_B = "tun-a", "tun-b"
KINDS = ("veth", "mqtun", "pytun", "c")
_CLK_TCK = os.sysconf("SC_CLK_TCK")


@dataclass(frozen=True)
class ForwarderSpec:
    """What joins A and B. `cpus` pins forwarder worker i to cpus[i % len] ("auto": all)."""

    kind: str = "mqtun"
    queues: int = 1
    offload: bool = True
    cpus: str | None = "auto"
    mode: str | None = None  # mqtun's I/O loop mode (None: its default)
    program: str | None = None  # kind "c": the built forwarder binary
    handler: str | None = None  # kind "mqtun": `forward --handler MODULE:NAME`
    handler_batch: bool = False  # kind "mqtun": `forward --handler-batch`
    coalesce: bool | None = None  # kind "mqtun": `--coalesce`/`--no-coalesce` (None: default)
    compat: bool = False  # kind "pytun": the same program on `mqtun.compat.pytun`

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise InvalidArgumentError(f"forwarder kind {self.kind!r}: use one of {KINDS}")
        if self.kind == "pytun" and self.offload:
            raise InvalidArgumentError("python-pytun has no offloads: use offload=False")
        if self.kind != "mqtun" and (self.handler or self.handler_batch or self.coalesce
                                     is not None):
            raise InvalidArgumentError("handler and coalesce are options of kind mqtun")
        if self.compat and self.kind != "pytun":
            raise InvalidArgumentError("compat is an option of kind pytun")

    @property
    def label(self) -> str:
        """A short row name: veth, mqtun 2q, mqtun 1q no-offload, pytun 2q, c 1q."""
        if self.kind == "veth":
            return "veth"
        tail = " no-offload" if self.kind in ("mqtun", "c") and not self.offload else ""
        tail += f" {self.mode}" if self.mode else ""
        tail += (" batch-handler" if self.handler_batch else " handler") if self.handler else ""
        tail += {None: "", True: " coalesce", False: " no-coalesce"}[self.coalesce]
        tail += " on mqtun.compat" if self.compat else ""
        return f"{self.kind} {self.queues}q{tail}"


@dataclass(frozen=True)
class QueueSample:
    """One queue pair's counters at one moment (from the forwarder's shared memory)."""

    queue: int
    a2b_packets: int
    b2a_packets: int
    a2b_bytes: int
    b2a_bytes: int
    drops: int
    a2b_read: int = 0  # read from A's device (what the forwarder took in, A -> B)
    b2a_read: int = 0
    a2b_wire: int = 0  # wire packets written to B's device (a super-packet counts each)
    a2b_read_wire: int = 0  # wire packets read from A's device


# Programs the topology runs, and the Debian package that has each (for the one-line refusal).
PACKAGES = {"ip": "iproute2", "ss": "iproute2", "iperf3": "iperf3", "sockperf": "sockperf",
            "taskset": "util-linux", "cc": "gcc"}


def _no_cap(command: str, what: str) -> str:
    """The refusal for a missing capability: which one, and how a container gets it."""
    cap = "SYS_ADMIN" if "netns add" in what else "NET_ADMIN"
    return (f"mqtun {command} needs CAP_{cap} (it makes network namespaces and devices) and "
            f"this process lacks it; in a container run it with --cap-add {cap} or "
            f"--privileged ({what})")


def check_lab(command: str) -> None:
    """Refuse in one line, before anything is made, what surely fails: not root, no iproute2."""
    if os.geteuid() != 0:
        raise MqtunError(errno.EPERM, f"mqtun {command} needs root: it creates network "
                         f"namespaces and devices (run it as root, e.g. sudo mqtun {command})",
                         op=command)
    if shutil.which("ip") is None:
        raise MqtunError(errno.ENOENT, f"mqtun {command} needs iproute2's `ip` on PATH "
                         "(Debian: apt-get install iproute2)", op=command)


@contextlib.contextmanager
def lab_errors(command: str) -> Iterator[None]:
    """Turn what a helper program's failure raises into one MqtunError line that says what is
    missing: a program not on PATH, or the capabilities a namespace needs (a container's root
    usually lacks CAP_NET_ADMIN: then `ip netns exec NS ip link set lo up` fails)."""
    try:
        yield
    except FileNotFoundError as exc:
        prog = os.path.basename(str(exc.filename or "?"))
        pkg = f" (Debian: apt-get install {PACKAGES[prog]})" if prog in PACKAGES else ""
        raise MqtunError(errno.ENOENT, f"mqtun {command} needs `{prog}` on PATH{pkg}",
                         op=command) from None
    except subprocess.CalledProcessError as exc:
        said = (exc.stderr or exc.stdout or "")
        said = said.decode(errors="replace") if isinstance(said, bytes) else said
        cmd = exc.cmd if isinstance(exc.cmd, str) else " ".join(map(str, exc.cmd))
        if "not permitted" in said or "Permission denied" in said:
            what = f"`{cmd}`: {said.strip().splitlines()[-1]}"
            raise MqtunError(errno.EPERM, _no_cap(command, what), op=command) from None
        last = said.strip().splitlines()[-1] if said.strip() else f"exit {exc.returncode}"
        raise MqtunError(5, f"mqtun {command}: `{cmd}` failed: {last}", op=command) from None
    except MqtunError as exc:
        if "not permitted" in exc.message:
            raise MqtunError(errno.EPERM, _no_cap(command, exc.message), op=command) from None
        raise


@dataclass(frozen=True)
class LinkCounters:
    """A device's kernel counters (/proc/net/dev). On a TUN device tx is what userspace read
    from it (tx_dropped: its queue was full), rx what userspace wrote into it."""

    rx_packets: int
    rx_dropped: int
    tx_packets: int
    tx_dropped: int

    def __sub__(self, other: LinkCounters) -> LinkCounters:
        return LinkCounters(self.rx_packets - other.rx_packets,
                            self.rx_dropped - other.rx_dropped,
                            self.tx_packets - other.tx_packets,
                            self.tx_dropped - other.tx_dropped)


def _link_counters(ns: NetNamespace, dev: str) -> LinkCounters:
    """`dev`'s counters in `ns`, read by this thread from inside the namespace (no process)."""
    with ns.enter(), open("/proc/thread-self/net/dev") as f:
        for line in f:
            name, _, rest = line.partition(":")
            if name.strip() == dev:
                v = [int(x) for x in rest.split()]
                return LinkCounters(v[1], v[3], v[9], v[11])
    raise MqtunError(errno.ENODEV, f"{dev} is not in namespace {ns.name}", op="topology")


def udp_counters(ns: NetNamespace) -> dict[str, int]:
    """The Udp: line of /proc/net/snmp in `ns` (InDatagrams, OutDatagrams, RcvbufErrors...),
    read by this thread from inside the namespace."""
    with ns.enter(), open("/proc/thread-self/net/snmp") as f:
        rows = [line.split() for line in f if line.startswith("Udp:")]
    return dict(zip(rows[0][1:], map(int, rows[1][1:]), strict=False))


def cpu_seconds(pids: list[int]) -> float:
    """utime + stime of these processes, in seconds (processes that are gone count 0)."""
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat", "rb") as f:
                stat = f.read()
        except OSError:
            continue
        fields = stat[stat.rfind(b")") + 2:].split()
        total += int(fields[11]) + int(fields[12])  # utime, stime (fields 14 and 15)
    return total / _CLK_TCK


def _mqtun_env() -> dict[str, str]:
    """Environment for a child ``python -m mqtun`` that imports this very mqtun."""
    src = str(Path(mqtun.__file__).resolve().parents[1])
    path = os.environ.get("PYTHONPATH", "")
    return {**os.environ, "PYTHONPATH": f"{src}:{path}" if path else src}


class Topology:
    """The three namespaces and the forwarder; a context manager that always cleans up."""

    def __init__(self, spec: ForwarderSpec, *, ready_timeout: float = 20.0,
                 txqueuelen: int = 1000) -> None:
        self.spec = spec
        self.ready_timeout = ready_timeout
        self.txqueuelen = txqueuelen
        self.a: NetNamespace | None = None
        self.b: NetNamespace | None = None
        self.f: NetNamespace | None = None
        self.proc: subprocess.Popen[bytes] | None = None
        self._stderr: IO[bytes] | None = None
        self._region: Region | None = None

    # ---- building ----------------------------------------------------------------------------
    def start(self) -> Topology:
        try:
            self.a = self._namespace("a")
            self.b = self._namespace("b")
            if self.spec.kind == "veth":
                self._veth()
            else:
                self.f = self._namespace("f")
                self._start_forwarder()
                for dev, ns, ip in ((DEV_A, self.a, A_IP), (DEV_B, self.b, B_IP)):
                    self.f.run(["ip", "link", "set", dev, "netns", ns.name], timeout=10)
                    self._address(ns, dev, ip)
        except BaseException:
            self.close()
            raise
        return self

    @staticmethod
    def _namespace(role: str) -> NetNamespace:
        ns = NetNamespace.create(prefix=f"mqtun-{role}-")
        try:
            # no IPv6 autoconfiguration chatter (router solicitations, DAD) in the counts;
            # written directly, not with sysctl(8), which a fresh machine may lack
            with ns.enter(), contextlib.suppress(OSError), open(
                    "/proc/sys/net/ipv6/conf/default/addr_gen_mode", "w") as f:
                f.write("1")
        except BaseException:
            ns.delete()
            raise
        return ns

    def _address(self, ns: NetNamespace, dev: str, ip: str) -> None:
        ns.run(["ip", "addr", "add", f"{ip}/24", "dev", dev])
        ns.run(["ip", "link", "set", dev, "txqueuelen", str(self.txqueuelen), "up"])

    def _veth(self) -> None:
        assert self.a is not None and self.b is not None
        self.a.run(["ip", "link", "add", DEV_A, "type", "veth", "peer", "name", DEV_B,
                    "netns", self.b.name])
        self._address(self.a, DEV_A, A_IP)
        self._address(self.b, DEV_B, B_IP)

    def _forwarder_argv(self) -> list[str]:
        s = self.spec
        cpus = ["--cpus", s.cpus] if s.cpus else []
        if s.kind == "mqtun":
            return [sys.executable, "-m", "mqtun", "forward", "--queues", str(s.queues),
                    *([] if s.offload else ["--no-offload"]),
                    *(["--mode", s.mode] if s.mode else []),
                    *(["--handler", s.handler] if s.handler else []),
                    *(["--handler-batch"] if s.handler_batch else []),
                    *({None: [], True: ["--coalesce"], False: ["--no-coalesce"]}[s.coalesce]),
                    *cpus, DEV_A, DEV_B]
        if s.kind == "c":
            if not s.program:
                raise InvalidArgumentError("the C forwarder needs its binary (program=)")
            from mqtun.apps.forward import _OFFLOAD_LADDER  # the very masks mqtun forward tries

            ladder = ",".join(hex(m) for m in _OFFLOAD_LADDER if m) if s.offload else "none"
            return [s.program, DEV_A, DEV_B, str(s.queues), ladder,
                    "auto" if s.cpus else "none"]
        return [sys.executable, "-m", "mqtun.apps.pytun_forward", "--queues", str(s.queues),
                *(["--compat"] if s.compat else []), *cpus, DEV_A, DEV_B]

    def _start_forwarder(self) -> None:
        assert self.f is not None
        self._stderr = tempfile.TemporaryFile()  # noqa: SIM115 -- closed by close()
        self.proc = self.f.popen(self._forwarder_argv(), stdout=subprocess.PIPE,
                                 stderr=self._stderr, stdin=subprocess.DEVNULL,
                                 env=_mqtun_env())
        line = self._read_line(self.ready_timeout)
        want = f"READY queues={self.spec.queues}"
        if line != want:
            raise MqtunError(5, f"{self.spec.label} forwarder did not start (expected "
                             f"{want!r}, got {line!r}): {self.stderr_tail()}", op="topology")

    def _read_line(self, timeout: float) -> str:
        """The forwarder's first stdout line, waiting at most `timeout` seconds."""
        assert self.proc is not None and self.proc.stdout is not None
        fd = self.proc.stdout.fileno()
        buf = b""
        deadline = time.monotonic() + timeout
        while b"\n" not in buf:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([fd], [], [], left)[0]:
                break
            chunk = os.read(fd, 4096)
            if not chunk:
                break
            buf += chunk
        return buf.split(b"\n", 1)[0].decode(errors="replace").strip()

    def stderr_tail(self, lines: int = 3) -> str:
        """The last lines the forwarder wrote on stderr (for error messages)."""
        if self._stderr is None:
            return ""
        self._stderr.seek(0)
        text = self._stderr.read().decode(errors="replace").strip().splitlines()
        return " | ".join(text[-lines:]) or "(no output)"

    # ---- measuring ---------------------------------------------------------------------------
    def forwarder_pids(self) -> list[int]:
        """Every process of the forwarder (everything running in namespace F)."""
        return self.f.pids() if self.f is not None else []

    def forwarder_cpu(self) -> float:
        """CPU seconds the forwarder's processes have used so far."""
        return cpu_seconds(self.forwarder_pids())

    def link_counters(self) -> tuple[LinkCounters, LinkCounters]:
        """The kernel's counters of A's and of B's device (tun-a in A, tun-b in B)."""
        assert self.a is not None and self.b is not None
        return _link_counters(self.a, DEV_A), _link_counters(self.b, DEV_B)

    def queue_samples(self) -> list[QueueSample]:
        """Per-queue counters of an mqtun forwarder, read from its shared-memory region."""
        if self.spec.kind != "mqtun" or self.proc is None:
            return []
        if self._region is None:
            found = [r for r in list_regions() if r.pid == self.proc.pid and r.alive]
            if not found:
                raise MqtunError(2, "the forwarder's counters region is missing",
                                 op="topology")
            self._region = Region.open(found[-1].path)
        by_queue: dict[int, dict[str, int]] = {}
        for e in self._region.entries():
            row = by_queue.setdefault(e.queue, dict.fromkeys(
                ("a2b_p", "b2a_p", "a2b_b", "b2a_b", "drops", "a2b_r", "b2a_r", "a2b_w",
                 "b2a_w", "a2b_rw", "b2a_rw"), 0))  # fmt: skip
            side = "a2b" if e.device == DEV_B else "b2a"  # written to B = moved A -> B
            row[f"{side}_p"] += e.stats.written_packets
            row[f"{side}_b"] += e.stats.written_bytes
            row[f"{side}_w"] += e.stats.written_wire_packets
            row["drops"] += e.stats.dropped_total
            read_side = "a2b" if e.device == DEV_A else "b2a"  # read from A = moved A -> B
            row[f"{read_side}_r"] += e.stats.read_packets
            row[f"{read_side}_rw"] += e.stats.read_wire_packets
        return [QueueSample(q, r["a2b_p"], r["b2a_p"], r["a2b_b"], r["b2a_b"], r["drops"],
                            r["a2b_r"], r["b2a_r"], r["a2b_w"], r["a2b_rw"])
                for q, r in sorted(by_queue.items())]  # fmt: skip

    # ---- cleaning up -------------------------------------------------------------------------
    def close(self) -> None:
        """Stop the forwarder (SIGTERM, then SIGKILL), then remove every namespace."""
        if self._region is not None:
            self._region.close()
            self._region = None
        if self.proc is not None:
            if self.proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    self.proc.send_signal(signal.SIGTERM)
                try:
                    self.proc.wait(timeout=3)
                except subprocess.TimeoutExpired:
                    self.proc.kill()
                    with contextlib.suppress(subprocess.TimeoutExpired):
                        self.proc.wait(timeout=3)
            if self.proc.stdout is not None:
                self.proc.stdout.close()
            self.proc = None
        for ns in (self.a, self.b, self.f):
            if ns is not None:
                with contextlib.suppress(MqtunError, OSError, subprocess.SubprocessError):
                    ns.delete()
        self.a = self.b = self.f = None
        if self._stderr is not None:
            self._stderr.close()
            self._stderr = None

    def __enter__(self) -> Topology:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()
