"""mqtun.compat.pytun against python-pytun itself: one script, two namespaces, equal transcripts.

`scenario()` drives a python-pytun-shaped module through creation (TUN and TAP, good and bad
flags, names, paths), every attribute, up/down, real packets both ways (UDP through a TUN,
ARP and UDP through a TAP, a virtio-net header, truncation), non-blocking reads, persistence,
operations after close, multiqueue attach/detach and the kernel's refusals. Every observable
result goes into a transcript: returned values, exceptions (type, errno, args), the kernel's
state over netlink (link flags, queue counts, IPv4 addresses, routes, rx counters) and the
packets. python-pytun runs in one fresh namespace, mqtun's face in another; the transcripts
must be equal. IPv6 is disabled in both so that no router solicitation or MLD report lands
in a read at a moment that depends on timers.
"""

from __future__ import annotations

import contextlib
import gc
import importlib.util
import os
import select
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterator
from types import ModuleType
from typing import Any

import pytest
from nettools import udp_packet
from pyroute2 import IPRoute

from mqtun import find_link
from mqtun.compat import pytun as compat
from mqtun.netns import NetNamespace
from mqtun.packet import accel

reference = pytest.importorskip("pytun")  # python-pytun: a test dependency only

TAP_MAC = b"\x02\x00\x00\x00\x00\x01"
PEER_MAC = b"\x02\x00\x00\x00\x00\x02"
WAIT = 2.0  # seconds any single packet may take; every wait is bounded by it


class Transcript:
    """Observable results in order: (label, value or normalized exception)."""

    def __init__(self, pt: ModuleType) -> None:
        self.pt = pt
        self.items: list[tuple[str, Any]] = []

    def do(self, label: str, fn: Callable[[], Any]) -> Any:
        """Run fn, record what it returned or raised; return the value (None if it raised)."""
        try:
            value = fn()
        except Exception as exc:  # the exception is the observable result
            self.items.append((label, self._exc(exc)))
            return None
        self.items.append((label, self._value(value)))
        return value

    def note(self, label: str, value: Any) -> None:
        self.items.append((label, value))

    def _exc(self, exc: Exception) -> tuple[Any, ...]:
        if isinstance(exc, self.pt.Error):
            return ("raised", "Error", exc.errno, exc.args)
        # python-level argument errors: same type; CPython words its own messages differently
        return ("raised", type(exc).__name__)

    def _value(self, value: Any) -> Any:
        return "<device>" if isinstance(value, self.pt.TunTapDevice) else value


# ---- kernel state, read the same way for both runs ----------------------------------------------
def kernel_state(name: str) -> Any:
    """What the kernel says about `name`: link flags, queues, IPv4 addresses, routes."""
    info = find_link(name)
    if info is None:
        return None
    d = info.as_dict()
    index = d.pop("ifindex")
    for volatile in ("operstate", "carrier", "addresses"):  # linkwatch is asynchronous
        d.pop(volatile)
    if d["hwaddr"] not in (None, TAP_MAC.hex(":")):
        d["hwaddr"] = "random"
    stats = d.pop("stats")
    d["rx"] = (stats.get("rx_packets"), stats.get("rx_bytes"), stats.get("rx_errors"))
    with IPRoute() as ipr:
        d["ipv4"] = [
            (a["prefixlen"], a["flags"], a["scope"],
             sorted((k, v) for k, v in a["attrs"] if k != "IFA_CACHEINFO"))
            for a in ipr.get_addr(family=socket.AF_INET, index=index)
        ]
        d["routes"] = sorted(
            (r.get_attr("RTA_TABLE"), r["type"], r["scope"], r["proto"], r["dst_len"],
             r.get_attr("RTA_DST"), r.get_attr("RTA_PREFSRC"), r.get_attr("RTA_GATEWAY"))
            for r in ipr.route("dump") if r.get_attr("RTA_OIF") == index
        )
    return d


def ifindex(name: str) -> int | None:
    info = find_link(name)
    return None if info is None else info.ifindex


# ---- packets ---------------------------------------------------------------------------------
def read_matching(dev: Any, match: Callable[[bytes], bool], size: int = 4096) -> Any:
    """The next packet `match` accepts (others are skipped), or "timeout"; never blocks long."""
    deadline = time.monotonic() + WAIT
    while (left := deadline - time.monotonic()) > 0:
        ready, _, _ = select.select([dev], [], [], left)
        if not ready:
            break
        pkt = dev.read(size)
        if match(pkt):
            return pkt
    return "timeout"


def stable(pkt: Any, ip_offset: int) -> Any:
    """A packet with its IPv4 identification zeroed (the kernel picks it at random) and
    the header checksum replaced by whether it was right."""
    if not isinstance(pkt, bytes) or len(pkt) < ip_offset + 20:
        return pkt
    hdr = bytearray(pkt[ip_offset:ip_offset + 20])
    words = struct.unpack("!10H", hdr)
    total = sum(words)
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    hdr[4:6] = hdr[10:12] = b"\0\0"
    return (pkt[:ip_offset] + bytes(hdr) + pkt[ip_offset + 20:], total == 0xFFFF)


def readable(*devs: Any) -> list[int]:
    """Which of `devs` has a packet queued (positions), waiting at most WAIT."""
    ready, _, _ = select.select(list(devs), [], [], WAIT)
    return [i for i, d in enumerate(devs) if d in ready]


def send_udp(src: str, sport: int, dst: str, dport: int, payload: bytes) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind((src, sport))
        s.sendto(payload, (dst, dport))


def receiver(addr: str, port: int) -> socket.socket:
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind((addr, port))
    s.settimeout(WAIT)
    return s


def recv(s: socket.socket) -> Any:
    try:
        return s.recvfrom(4096)
    except TimeoutError:
        return "timeout"
    finally:
        s.close()


def is_udp4(pkt: bytes, offset: int = 0) -> bool:
    return len(pkt) >= offset + 20 and pkt[offset] >> 4 == 4 and pkt[offset + 9] == 17


def ether(dst: bytes, src: bytes, ethertype: int, payload: bytes) -> bytes:
    return dst + src + struct.pack("!H", ethertype) + payload


def arp_reply(peer_ip: str, my_ip: str) -> bytes:
    body = struct.pack("!HHBBH6s4s6s4s", 1, 0x0800, 6, 4, 2, PEER_MAC,
                       socket.inet_aton(peer_ip), TAP_MAC, socket.inet_aton(my_ip))
    return ether(TAP_MAC, PEER_MAC, 0x0806, body)


def pi(proto: int = 0x0800) -> bytes:
    return struct.pack("!HH", 0, proto)


# ---- the script ---------------------------------------------------------------------------------
def scenario(pt: ModuleType) -> list[tuple[str, Any]]:
    """Everything a python-pytun user can observe, in one fixed order."""
    t = Transcript(pt)
    do = t.do

    # the module's face
    # what `from pytun import *` gives (python-pytun has no __all__: its public names)
    t.note("names", sorted(getattr(pt, "__all__", [n for n in dir(pt) if n[0] != "_"])))
    t.note("constants", {n: getattr(pt, n) for n in dir(pt) if n.startswith("IFF_")})
    t.note("error is OSError", issubclass(pt.Error, OSError))

    # construction refused before or by the kernel
    T = pt.TunTapDevice
    do("bad flags: neither", lambda: T(flags=0))
    do("bad flags: both", lambda: T(flags=pt.IFF_TUN | pt.IFF_TAP))
    do("name too long", lambda: T("x" * 16))
    do("name bytes", lambda: T(b"tun9"))
    do("name with NUL", lambda: T("a\0b"))
    do("name with space", lambda: T("a b"))
    do("name with slash", lambda: T("a/b"))
    do("name with two patterns", lambda: T("a%d%d"))
    do("flags not int", lambda: T(flags=1.0))
    do("flags overflow", lambda: T(flags=2**40))
    do("missing dev path", lambda: T(dev="/nonexistent/tun"))
    do("dev not a tun node", lambda: T(dev="/dev/null"))
    one_queue = do("IFF_ONE_QUEUE accepted", lambda: T("oneq0", pt.IFF_TUN | pt.IFF_ONE_QUEUE))
    do("one-queue close", one_queue.close)

    # --- a TUN device with python-pytun's defaults: packet info on ---------------------------
    tun = do("create tun default", T)
    do("tun name", lambda: tun.name)
    do("tun fileno valid", lambda: tun.fileno() >= 0)
    do("tun fd blocking", lambda: os.get_blocking(tun.fileno()))
    t.note("tun state new", kernel_state("tun0"))
    second = do("second default name", T)
    do("second name", lambda: second.name)
    do("second close", second.close)
    for attr in ("addr", "dstaddr", "netmask", "mtu", "hwaddr"):
        do(f"tun get {attr} (fresh)", lambda a=attr: getattr(tun, a))
    do("set netmask before addr", lambda: setattr(tun, "netmask", "255.255.255.0"))
    do("set dstaddr before addr", lambda: setattr(tun, "dstaddr", "198.18.0.2"))
    do("set addr not str", lambda: setattr(tun, "addr", 5))
    do("set addr non-ascii", lambda: setattr(tun, "addr", "198.18.0.é"))
    do("set addr garbage", lambda: setattr(tun, "addr", "not-an-address"))
    do("set addr multicast", lambda: setattr(tun, "addr", "224.0.0.1"))
    do("set addr", lambda: setattr(tun, "addr", "198.18.0.1"))
    t.note("tun state addr", kernel_state("tun0"))
    do("set addr again (same)", lambda: setattr(tun, "addr", "198.18.0.1"))
    do("set netmask non-contiguous", lambda: setattr(tun, "netmask", "255.0.255.0"))
    do("set netmask", lambda: setattr(tun, "netmask", "255.255.255.0"))
    do("set dstaddr", lambda: setattr(tun, "dstaddr", "198.18.0.2"))
    for attr in ("addr", "dstaddr", "netmask"):
        do(f"tun get {attr}", lambda a=attr: getattr(tun, a))
    t.note("tun state p2p", kernel_state("tun0"))
    do("set addr replaces (resets peer)", lambda: setattr(tun, "addr", "198.19.0.1"))
    t.note("tun state replaced", kernel_state("tun0"))
    do("set addr 0.0.0.0 removes", lambda: setattr(tun, "addr", "0.0.0.0"))
    do("tun get addr (removed)", lambda: tun.addr)
    do("set addr back", lambda: setattr(tun, "addr", "198.18.0.1"))
    do("set dstaddr back", lambda: setattr(tun, "dstaddr", "198.18.0.2"))
    for bad in (0, -5, 10, 70000, 1.5, "1400"):
        do(f"set mtu {bad!r}", lambda v=bad: setattr(tun, "mtu", v))
    do("set mtu", lambda: setattr(tun, "mtu", 1400))
    do("tun get mtu", lambda: tun.mtu)
    do("tun set hwaddr", lambda: setattr(tun, "hwaddr", TAP_MAC))
    do("tun set hwaddr short", lambda: setattr(tun, "hwaddr", b"\x02\x00"))
    do("tun set hwaddr str", lambda: setattr(tun, "hwaddr", "02:00:00:00:00:01"))
    do("set name", lambda: setattr(tun, "name", "other0"))
    do("up", tun.up)
    do("up again", tun.up)
    t.note("tun state up", kernel_state("tun0"))

    # packets: kernel -> userspace (with the 4-byte packet info)
    send_udp("198.18.0.1", 40001, "198.18.0.2", 40002, b"to-userspace-1")
    t.note("tun read", stable(read_matching(tun, lambda p: is_udp4(p, 4)), 4))
    send_udp("198.18.0.1", 40001, "198.18.0.2", 40002, b"to-userspace-2, truncated")
    t.note("tun read truncated",
           stable(read_matching(tun, lambda p: is_udp4(p, 4), size=4 + 20 + 4), 4))
    send_udp("198.18.0.1", 40001, "198.18.0.2", 40002, b"to-userspace-3")
    if readable(tun) == [0]:
        do("tun read shorter than packet info", lambda: tun.read(2))
    do("tun read 0", lambda: tun.read(0))
    do("tun read float", lambda: tun.read(1.5))
    # userspace -> kernel
    rx = receiver("198.18.0.1", 40003)
    do("tun write", lambda: tun.write(pi() + udp_packet("198.18.0.2", "198.18.0.1", 40004,
                                                          40003, b"from-userspace")))
    t.note("tun written packet arrives", recv(rx))
    do("tun write str", lambda: tun.write("not a packet"))
    do("tun write bytearray", lambda: tun.write(bytearray(b"abcd")))
    do("tun write int", lambda: tun.write(5))
    do("tun write without packet info", lambda: tun.write(udp_packet(
        "198.18.0.2", "198.18.0.1", 1, 2)))
    do("down", tun.down)
    do("write while down", lambda: tun.write(pi() + udp_packet("198.18.0.2", "198.18.0.1", 1, 2)))
    do("up after down", tun.up)
    # non-blocking reads, as python-pytun's users set them up themselves
    os.set_blocking(tun.fileno(), False)
    do("non-blocking read, nothing queued", lambda: tun.read(2048))
    os.set_blocking(tun.fileno(), True)
    t.note("tun state traffic", kernel_state("tun0"))

    # persistence and life after close
    do("persist not bool", lambda: tun.persist(1))
    do("persist", lambda: tun.persist(True))
    index_before = ifindex("tun0")
    do("close", tun.close)
    do("close again", tun.close)
    t.note("tun state persistent, closed", kernel_state("tun0"))
    do("fileno after close", tun.fileno)
    do("name after close", lambda: tun.name)
    do("read after close", lambda: tun.read(100))
    do("write after close", lambda: tun.write(b"x"))
    do("persist after close", lambda: tun.persist(False))
    do("mq_attach after close", lambda: tun.mq_attach(False))
    do("addr after close", lambda: tun.addr)
    do("mtu after close", lambda: tun.mtu)
    do("down after close", tun.down)
    do("set mtu after close", lambda: setattr(tun, "mtu", 1500))
    t.note("tun state down by name", kernel_state("tun0"))
    again = do("re-attach persistent", lambda: T("tun0"))
    t.note("same ifindex", ifindex("tun0") == index_before)
    do("re-attached addr kept", lambda: again.addr)
    do("exclusive on existing name", lambda: T("tun0", pt.IFF_TUN | pt.IFF_TUN_EXCL))
    do("second queue without multiqueue", lambda: T("tun0"))
    do("other type on existing name", lambda: T("tun0", pt.IFF_TAP))
    do("multiqueue on single-queue device", lambda: T("tun0", pt.IFF_TUN | pt.IFF_MULTI_QUEUE))
    do("mq_attach(False) single-queue", lambda: again.mq_attach(False))
    do("mq_attach(True) attached", lambda: again.mq_attach(True))
    do("mq_attach not bool", lambda: again.mq_attach(0))
    do("persist off", lambda: again.persist(False))
    do("close re-attached", again.close)
    t.note("tun state gone", kernel_state("tun0"))
    do("addr of a gone device", lambda: again.addr)
    do("up of a gone device", again.up)
    do("hwaddr of a gone device", lambda: again.hwaddr)

    # a dropped object closes its fd, so a non-persistent device goes with it
    dropped = T("gc0")
    t.note("gc device exists", kernel_state("gc0") is not None)
    del dropped
    gc.collect()
    t.note("gc device gone", kernel_state("gc0"))

    # --- a TAP device without packet info -------------------------------------------------------
    tap = do("create tap", lambda: T(flags=pt.IFF_TAP | pt.IFF_NO_PI))
    do("tap name", lambda: tap.name)
    mac = tap.hwaddr
    t.note("tap random mac", (len(mac), mac[0] & 1, bool(mac[0] & 2)))
    do("tap set multicast mac", lambda: setattr(tap, "hwaddr", b"\x01\x00\x00\x00\x00\x01"))
    do("tap set bytearray mac", lambda: setattr(tap, "hwaddr", bytearray(TAP_MAC)))
    do("tap set mac", lambda: setattr(tap, "hwaddr", TAP_MAC))
    do("tap get mac", lambda: tap.hwaddr)
    do("tap set addr (classful + broadcast)", lambda: setattr(tap, "addr", "198.18.1.1"))
    t.note("tap state addr", kernel_state("tap0"))
    do("tap set netmask /16", lambda: setattr(tap, "netmask", "255.255.0.0"))
    t.note("tap state /16", kernel_state("tap0"))
    do("tap set netmask /24", lambda: setattr(tap, "netmask", "255.255.255.0"))
    do("tap set class A addr", lambda: setattr(tap, "addr", "10.1.2.3"))
    t.note("tap state class A", kernel_state("tap0"))
    do("tap set addr", lambda: setattr(tap, "addr", "198.18.1.1"))
    for attr in ("addr", "dstaddr", "netmask", "mtu"):
        do(f"tap get {attr}", lambda a=attr: getattr(tap, a))
    do("tap up", tap.up)
    send_udp("198.18.1.1", 40011, "198.18.1.2", 40012, b"via-arp")
    t.note("tap arp request", read_matching(tap, lambda f: f[12:14] == b"\x08\x06"))
    do("tap write arp reply", lambda: tap.write(arp_reply("198.18.1.2", "198.18.1.1")))
    t.note("tap udp frame", stable(read_matching(tap, lambda f: f[12:14] == b"\x08\x00"
                                                 and is_udp4(f, 14)), 14))
    rx = receiver("198.18.1.1", 40013)
    do("tap write frame", lambda: tap.write(ether(TAP_MAC, PEER_MAC, 0x0800, udp_packet(
        "198.18.1.2", "198.18.1.1", 40014, 40013, b"frame-from-userspace"))))
    t.note("tap written frame arrives", recv(rx))
    do("tap write runt frame", lambda: tap.write(b"\x00" * 10))
    t.note("tap state traffic", kernel_state("tap0"))
    do("tap close", tap.close)
    t.note("tap state gone", kernel_state("tap0"))

    # --- a TAP device with a virtio-net header --------------------------------------------------
    vnet = do("create tap vnet", lambda: T("vnet0", pt.IFF_TAP | pt.IFF_NO_PI
                                           | pt.IFF_VNET_HDR))
    vnet.hwaddr = TAP_MAC
    vnet.addr = "198.18.2.1"
    vnet.up()
    t.note("vnet state", kernel_state("vnet0"))
    send_udp("198.18.2.1", 40021, "198.18.2.2", 40022, b"vnet")
    t.note("vnet arp request", read_matching(vnet, lambda f: f[10 + 12:10 + 14]
                                             == b"\x08\x06"))
    send_udp("198.18.2.1", 40021, "198.18.2.3", 40022, b"vnet")
    if readable(vnet) == [0]:
        do("vnet read shorter than the header", lambda: vnet.read(5))
    do("vnet write frame", lambda: vnet.write(bytes(10) + ether(
        TAP_MAC, PEER_MAC, 0x0800, udp_packet("198.18.2.2", "198.18.2.1", 1, 2))))
    do("vnet write shorter than the header", lambda: vnet.write(bytes(6)))
    do("vnet close", vnet.close)

    # --- multiqueue: several objects on one name, attach and detach -----------------------------
    mq = pt.IFF_TUN | pt.IFF_NO_PI | pt.IFF_MULTI_QUEUE
    a = do("mq first queue", lambda: T("mqt0", mq))
    b = do("mq second queue", lambda: T("mqt0", mq))
    t.note("mq state 2 queues", kernel_state("mqt0"))
    do("mq queue without multiqueue flag", lambda: T("mqt0", pt.IFF_TUN | pt.IFF_NO_PI))
    do("mq queue of other type", lambda: T("mqt0", pt.IFF_TAP | pt.IFF_NO_PI
                                            | pt.IFF_MULTI_QUEUE))
    do("mq exclusive", lambda: T("mqt0", mq | pt.IFF_TUN_EXCL))
    c = do("mq third queue asks packet info (ignored)", lambda: T("mqt0", pt.IFF_TUN
                                                                  | pt.IFF_MULTI_QUEUE))
    t.note("mq state 3 queues", kernel_state("mqt0"))
    do("mq third close", c.close)
    a.addr = "198.18.3.1"
    a.dstaddr = "198.18.3.2"
    a.up()
    do("mq detach second", lambda: b.mq_attach(False))
    t.note("mq state detached", kernel_state("mqt0"))
    do("mq detach again", lambda: b.mq_attach(False))
    send_udp("198.18.3.1", 40031, "198.18.3.2", 40032, b"one active queue")
    t.note("mq which queue has it", readable(a, b))
    t.note("mq read", stable(read_matching(a, is_udp4), 0))
    os.set_blocking(b.fileno(), False)
    do("mq read detached, non-blocking", lambda: b.read(2048))
    os.set_blocking(b.fileno(), True)
    rx = receiver("198.18.3.1", 40033)
    do("mq write on detached queue", lambda: b.write(udp_packet(
        "198.18.3.2", "198.18.3.1", 40034, 40033, b"from detached")))
    t.note("mq written packet arrives", recv(rx))
    do("mq re-attach", lambda: b.mq_attach(True))
    do("mq re-attach again", lambda: b.mq_attach())
    t.note("mq state re-attached", kernel_state("mqt0"))
    do("mq detach first", lambda: a.mq_attach(False))
    send_udp("198.18.3.1", 40031, "198.18.3.2", 40032, b"the other queue")
    t.note("mq which queue has it now", readable(a, b))
    t.note("mq read second", stable(read_matching(b, is_udp4), 0))
    do("mq close detached first", a.close)
    t.note("mq state one left", kernel_state("mqt0"))
    do("mq close second", b.close)
    t.note("mq state gone", kernel_state("mqt0"))
    return t.items


def _no_ipv6(ns: NetNamespace) -> None:
    ns.run(["sysctl", "-qw", "net.ipv6.conf.all.disable_ipv6=1",
            "net.ipv6.conf.default.disable_ipv6=1"])


def _python_face() -> ModuleType:
    """mqtun.compat.pytun as it is where mqtun._reads is not built (fileno/read/write as
    Python methods): the module loaded anew with the C loops off, beside the imported one."""
    spec = importlib.util.find_spec("mqtun.compat.pytun")
    assert spec is not None and spec.loader is not None
    face = importlib.util.module_from_spec(spec)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(accel, "ACCELERATE", False)
        spec.loader.exec_module(face)
    assert face._QueueFile is face._QueueFilePython
    face.Error = compat.Error  # one exception class for both faces (the module raises its global)
    return face


def _faces() -> list[Any]:
    """Both faces where the C one is built (as CI builds it): the imported module is the C
    face then, its fd methods those of mqtun._reads.QueueFile."""
    faces: list[Any] = [pytest.param(_python_face, id="python")]
    if compat._QueueFileC is not None:
        assert compat._QueueFile is compat._QueueFileC, "the C methods are the default"
        faces.append(pytest.param(lambda: compat, id="c"))
    return faces


@pytest.fixture(params=_faces())
def face(request: pytest.FixtureRequest) -> ModuleType:
    module: ModuleType = request.param()
    return module


def test_same_transcript_as_python_pytun(
    netns: NetNamespace, make_netns: Callable[[], NetNamespace], face: ModuleType
) -> None:
    _no_ipv6(netns)
    expected = scenario(reference)
    other = make_netns()
    _no_ipv6(other)
    with other.enter():
        got = scenario(face)
    assert len(expected) > 150
    for (label_e, want), (label_g, have) in zip(expected, got, strict=True):
        assert label_e == label_g
        assert have == want, f"{label_e}: python-pytun gave {want!r}, mqtun.compat {have!r}"


def test_the_script_sees_real_traffic(netns: NetNamespace) -> None:
    """Guard against a vacuous comparison: the packets the script waits for did arrive."""
    _no_ipv6(netns)
    items = dict(scenario(compat))
    for label in ("tun read", "tun read truncated", "tap arp request", "tap udp frame",
                  "vnet arp request", "mq read", "mq read second"):
        value = items[label]
        packet = value[0] if isinstance(value, tuple) else value
        assert isinstance(packet, bytes), label
        if isinstance(value, tuple):
            assert value[1] is True, f"{label}: bad IPv4 header checksum"
    for label in ("tun written packet arrives", "tap written frame arrives",
                  "mq written packet arrives"):
        assert items[label] != "timeout", label
    truncated = items["tun read truncated"][0]
    assert truncated[:4] == struct.pack("=H", 1) + b"\x08\x00", "TUN_PKT_STRIP is set"
    assert len(truncated) == 28
    assert items["mq which queue has it"] == [0] and items["mq which queue has it now"] == [1]


@pytest.fixture
def tun(face: ModuleType) -> Iterator[compat.TunTapDevice]:
    dev: compat.TunTapDevice = face.TunTapDevice("ctun0", compat.IFF_TUN | compat.IFF_NO_PI)
    yield dev
    dev.close()


def test_close_from_another_thread_wakes_a_blocked_read(tun: compat.TunTapDevice) -> None:
    """python-pytun's read stays blocked after close() (its issue #18); this one returns."""
    outcome: list[object] = []

    def reader() -> None:
        try:
            outcome.append(tun.read(2048))
        except compat.Error as exc:
            outcome.append(exc.errno)

    thread = threading.Thread(target=reader, daemon=True)
    thread.start()
    time.sleep(0.2)
    assert thread.is_alive() and not outcome, "the read blocks while nothing arrives"
    tun.close()
    thread.join(WAIT)
    assert not thread.is_alive(), "close() did not wake the blocked read"
    assert outcome == [9], "the woken read raises Error(EBADF), like any read after close"
    assert tun.fileno() == -1


def test_a_queue_closed_underneath_is_not_read_by_its_old_number(
        tun: compat.TunTapDevice) -> None:
    """The fd methods read the queue's fd on every call: closed by any path (here the mqtun
    Device underneath), every one acts on -1, never on a number the kernel may hand out again."""
    tun.device.close()
    reused = os.open("/dev/null", os.O_RDONLY)  # likely the number the queue had
    try:
        assert tun.fileno() == -1
        for call in (lambda: tun.read(2048), lambda: tun.write(b"x" * 20),
                     lambda: tun.write("str too")):
            with pytest.raises(compat.Error) as exc:
                call()
            assert exc.value.errno == 9
    finally:
        os.close(reused)


def test_two_threads_reading_one_device_each_get_whole_packets(
        tun: compat.TunTapDevice) -> None:
    """read() keeps one buffer between calls: a second thread reading meanwhile must not
    share it, or one thread's packet is overwritten while it is being copied out."""
    tun.addr = "198.18.0.1"
    tun.dstaddr = "198.18.0.2"
    tun.up()
    count, size = 2000, 1200
    got: list[list[bytes]] = [[], []]
    stop = time.monotonic() + 2 * WAIT  # the readers' bound, even if sending fails

    def reader(out: list[bytes]) -> None:
        while time.monotonic() < stop and len(got[0]) + len(got[1]) < count:
            if select.select([tun], [], [], 0.05)[0]:
                with contextlib.suppress(compat.Error):  # the other thread took it
                    out.append(tun.read(2048))

    os.set_blocking(tun.fileno(), False)  # two readers, one packet: the loser gets EAGAIN
    threads = [threading.Thread(target=reader, args=(out,), daemon=True) for out in got]
    for thread in threads:
        thread.start()
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            for i in range(count):
                s.sendto(i.to_bytes(4, "big") * (size // 4), ("198.18.0.2", 40050))
                if i % 50 == 49:
                    time.sleep(0.002)  # stay under the device's transmit queue
    finally:
        for thread in threads:
            thread.join(3 * WAIT)
    packets = [p for p in got[0] + got[1] if len(p) >= 28 and p[9] == 17]
    assert len(packets) > count // 2 and got[0] and got[1], "both threads read"
    seen = set()
    for pkt in packets:
        payload = pkt[28:]
        assert len(payload) == size and payload == payload[:4] * (size // 4), "a whole packet"
        seen.add(payload[:4])
    assert len(seen) == len(packets), "no packet was read twice"


def test_ipv6_addresses_and_packets(tun: compat.TunTapDevice) -> None:
    tun.addr = "198.18.0.1"
    tun.add_address("fd00:6d71::1/64")
    tun.up()
    assert "fd00:6d71::1/64" in tun.addresses and "198.18.0.1/32" in tun.addresses
    assert tun.addr == "198.18.0.1", "the IPv4 attributes are unchanged by an IPv6 address"
    with socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as s:
        s.sendto(b"six", ("fd00:6d71::2", 40041))
    pkt = read_matching(tun, lambda p: p[0] >> 4 == 6 and p[6] == 17)
    assert isinstance(pkt, bytes) and pkt[24:40] == socket.inet_pton(socket.AF_INET6,
                                                                     "fd00:6d71::2")
    tun.remove_address("fd00:6d71::1/64")
    assert not [a for a in tun.addresses if a.startswith("fd00")]


def test_owner_and_group(tun: compat.TunTapDevice) -> None:
    assert (tun.owner, tun.group) == (None, None)
    tun.owner = 65534
    tun.group = "nogroup" if _has_group("nogroup") else 65534
    assert tun.owner == 65534 and tun.group is not None
    info = find_link("ctun0")
    assert info is not None and (info.owner, info.group) == (tun.owner, tun.group)
    tun.close()
    with pytest.raises(compat.Error) as exc:
        tun.owner = 0
    assert exc.value.errno == 9


def _has_group(name: str) -> bool:
    import grp

    try:
        grp.getgrnam(name)
    except KeyError:
        return False
    return True


def test_the_mqtun_device_underneath() -> None:
    with compat.TunTapDevice("cmq0", compat.IFF_TUN | compat.IFF_NO_PI
                             | compat.IFF_MULTI_QUEUE) as first:
        # a later queue asking for packet info gets the device's choice, and knows it
        with compat.TunTapDevice("cmq0", compat.IFF_TUN | compat.IFF_MULTI_QUEUE) as second:
            assert second.device.packet_info is False and second.queue.header_size == 0
            assert second.device.multi_queue and second.queue.index == 1
            assert first.device.info().num_queues == 2
            # switching to mqtun's own calls: a non-blocking fd, then timeouts work
            os.set_blocking(second.fileno(), False)
            assert second.queue.read(timeout=0.05) is None
        assert first.queue.index == 0 and first.device.name == "cmq0"
    assert find_link("cmq0") is None


def test_deliberate_difference_close_on_exec() -> None:
    """python-pytun's fd is inherited by every child process (keeping the device alive);
    mqtun's is close-on-exec like every fd Python opens. Pass it on with pass_fds."""
    with compat.TunTapDevice("cexec0") as dev:
        assert os.get_inheritable(dev.fileno()) is False
    ref = reference.TunTapDevice("pexec0")
    try:
        assert os.get_inheritable(ref.fileno()) is True
    finally:
        ref.close()


def test_errors_keep_mqtun_explanation_as_cause() -> None:
    with compat.TunTapDevice("ccause0") as dev, pytest.raises(compat.Error) as exc:
        compat.TunTapDevice("ccause0", compat.IFF_TUN | compat.IFF_TUN_EXCL)
    assert exc.value.args == (16, os.strerror(16))
    assert "ccause0" in str(exc.value.__cause__)
    assert dev.name == "ccause0"
