"""`mqtun wg` end to end: a real TUN on our side, Debian's wireguard-go on the other, `wg`
configuring both, UDP through the tunnel both ways, and wireguard-go's lifecycle contract."""

from __future__ import annotations

import contextlib
import hashlib
import os
import signal
import socket
import stat
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator

import pytest
from pyroute2.ethtool.ioctl import IoctlEthtool  # type: ignore[import-untyped]
from wg_peer import (
    SOCKET_DIR,
    WireguardGo,
    b64,
    mqtun_wg_command,
    need_wireguard_go,
    underlay,
)

from mqtun.link import find_link
from mqtun.netns import NetNamespace
from mqtun.wireguard.crypto import public_key

OUR_UNDERLAY, THEIR_UNDERLAY = "198.18.78.1", "198.18.78.2"
OUR_TUNNEL, THEIR_TUNNEL = "198.19.78.1", "198.19.78.2"
OUR_PORT, THEIR_PORT = 51830, 51831
OUR_KEY = bytes.fromhex("a8" * 31 + "40")
THEIR_KEY = bytes.fromhex("b0" * 31 + "50")


def _wait(cond: Callable[[], bool], timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(0.05)
    return cond()


def _link_exists(ns: NetNamespace, name: str) -> bool:
    return ns.run(["ip", "link", "show", name], check=False).returncode == 0


class MqtunWg:
    """`python3 -m mqtun wg --foreground NAME` in `ns`, stopped and cleaned up on exit."""

    def __init__(self, ns: NetNamespace, *extra: str) -> None:
        self.ns = ns
        self.name = f"wgmq{uuid.uuid4().hex[:8]}"
        self.socket = os.path.join(SOCKET_DIR, f"{self.name}.sock")
        self.proc = ns.popen([sys.executable, "-m", "mqtun", "wg", "--foreground", *extra,
                              self.name], stderr=subprocess.PIPE)

    def __enter__(self) -> MqtunWg:
        if not _wait(lambda: os.path.exists(self.socket) or self.proc.poll() is not None):
            self.close()
            raise AssertionError("mqtun wg did not serve its socket")
        if self.proc.poll() is not None:
            err = self.proc.stderr.read().decode() if self.proc.stderr else ""
            raise AssertionError(f"mqtun wg exited: {err}")
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=5)
        if self.proc.stderr:
            self.proc.stderr.close()
        if os.path.exists(self.socket):
            os.unlink(self.socket)


@contextlib.contextmanager
def _tunnel(netns: NetNamespace, theirs_ns: NetNamespace, tmp_path: object, extra: tuple[str, ...],
            theirs: list[str]) -> Iterator[tuple[MqtunWg, WireguardGo]]:
    """`mqtun wg` (with `extra` arguments) here, the peer (`theirs`: wireguard-go's command or
    another `mqtun wg`) in `theirs_ns`, configured for each other over a veth."""
    underlay(theirs_ns, "wgv0", "wgv1", OUR_UNDERLAY, THEIR_UNDERLAY)
    key_file = f"{tmp_path}/ours"
    with open(key_file, "w") as f:
        f.write(b64(OUR_KEY) + "\n")
    with WireguardGo(theirs_ns, THEIR_KEY, THEIR_PORT, command=theirs) as wg, \
            MqtunWg(netns, *extra) as ours:
        wg.address(f"{THEIR_TUNNEL}/24")
        wg.add_peer(public_key(OUR_KEY), allowed_ips=f"{OUR_TUNNEL}/32",
                    endpoint=f"{OUR_UNDERLAY}:{OUR_PORT}")
        netns.run(["wg", "set", ours.name, "private-key", key_file, "listen-port", str(OUR_PORT),
                   "peer", b64(public_key(THEIR_KEY)), "allowed-ips", f"{THEIR_TUNNEL}/32",
                   "endpoint", f"{THEIR_UNDERLAY}:{THEIR_PORT}"])
        netns.run(["ip", "address", "add", f"{OUR_TUNNEL}/24", "dev", ours.name])
        netns.run(["ip", "link", "set", ours.name, "up"])
        yield ours, wg


@pytest.fixture(params=[(), ("--queues", "2"), ("--no-offload",)],
                ids=["1-queue", "2-workers", "no-offload"])
def pair(netns: NetNamespace, make_netns: Callable[[], NetNamespace], tmp_path: object,
         request: pytest.FixtureRequest) -> Iterator[tuple[MqtunWg, WireguardGo]]:
    """mqtun wg and wireguard-go; every test runs single, multi-worker and without offloads."""
    need_wireguard_go()
    with _tunnel(netns, make_netns(), tmp_path, request.param, ["wireguard-go", "-f"]) as p:
        yield p


@pytest.fixture(params=[(), ("--queues", "2")], ids=["1-queue", "2-workers"])
def mqtun_pair(netns: NetNamespace, make_netns: Callable[[], NetNamespace], tmp_path: object,
               request: pytest.FixtureRequest) -> Iterator[tuple[MqtunWg, WireguardGo]]:
    """mqtun wg on both ends (the same arguments), offloads on."""
    need_wireguard_go()
    with _tunnel(netns, make_netns(), tmp_path, request.param,
                 mqtun_wg_command(*request.param)) as p:
        yield p


def _udp_exchange(client_ns: NetNamespace | None, client_addr: str, server_ns: NetNamespace,
                  server_addr: str) -> None:
    """One datagram each way between sockets made in the two namespaces (retried: the first
    datagram may wait for the handshake)."""
    with server_ns.enter():
        server = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    if client_ns is None:
        client = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    else:
        with client_ns.enter():
            client = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    with server, client:
        server.bind((server_addr, 7000))
        client.bind((client_addr, 0))
        server.settimeout(1)
        client.settimeout(1)
        for _attempt in range(8):
            client.sendto(b"ping " + client_addr.encode(), (server_addr, 7000))
            try:
                data, src = server.recvfrom(2048)
            except TimeoutError:
                continue
            assert data == b"ping " + client_addr.encode() and src[0] == client_addr
            server.sendto(b"pong", src)
            assert client.recvfrom(2048) == (b"pong", (server_addr, 7000))
            return
        raise AssertionError("no datagram crossed the tunnel in 8 s")


def test_mqtun_and_wireguard_go_through_real_tun_devices(
        pair: tuple[MqtunWg, WireguardGo], netns: NetNamespace) -> None:
    ours, wg = pair
    assert stat.S_IMODE(os.stat(ours.socket).st_mode) == 0o600
    _udp_exchange(None, OUR_TUNNEL, wg.ns, THEIR_TUNNEL)          # we initiate
    # and from their side: a fresh initiation from wireguard-go
    netns.run(["wg", "set", ours.name, "peer", b64(public_key(THEIR_KEY)), "remove"])
    netns.run(["wg", "set", ours.name, "peer", b64(public_key(THEIR_KEY)), "allowed-ips",
               f"{THEIR_TUNNEL}/32"])
    wg.wg("set", wg.name, "peer", b64(public_key(OUR_KEY)), "remove")
    wg.add_peer(public_key(OUR_KEY), allowed_ips=f"{OUR_TUNNEL}/32",
                endpoint=f"{OUR_UNDERLAY}:{OUR_PORT}")
    _udp_exchange(wg.ns, THEIR_TUNNEL, netns, OUR_TUNNEL)
    dump = netns.run(["wg", "show", ours.name, "dump"]).stdout.splitlines()
    fields = dump[1].split("\t")
    assert fields[0] == b64(public_key(THEIR_KEY))
    assert fields[2] == f"{THEIR_UNDERLAY}:{THEIR_PORT}"      # learned from their initiation
    assert int(fields[4]) > 0 and int(fields[5]) > 0 and int(fields[6]) > 0
    theirs = wg.peer_stats(public_key(OUR_KEY))
    assert theirs.latest_handshake > 0 and theirs.rx_bytes > 0


def _tcp_transfer(client_ns: NetNamespace | None, server_ns: NetNamespace, server_addr: str,
                  size: int = 2 << 20) -> None:
    """`size` bytes over TCP from a client in one namespace to a server in the other, checked
    by digest (a flow through the tunnel, with its retransmits, both stacks real)."""
    payload = os.urandom(size)
    with server_ns.enter():
        listener = socket.create_server((server_addr, 7001))
    received: list[bytes] = []

    def serve() -> None:
        listener.settimeout(20)
        conn, _ = listener.accept()
        with conn:
            conn.settimeout(20)
            chunks = []
            while chunk := conn.recv(1 << 16):
                chunks.append(chunk)
            received.append(hashlib.sha256(b"".join(chunks)).digest())

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        if client_ns is None:
            client = socket.create_connection((server_addr, 7001), timeout=20)
        else:
            with client_ns.enter():
                client = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            client.settimeout(20)
            client.connect((server_addr, 7001))
        with client:
            client.sendall(payload)
        thread.join(timeout=30)
    finally:
        listener.close()
    assert received == [hashlib.sha256(payload).digest()]


def test_tcp_both_ways(pair: tuple[MqtunWg, WireguardGo], netns: NetNamespace) -> None:
    _, wg = pair
    _udp_exchange(None, OUR_TUNNEL, wg.ns, THEIR_TUNNEL)  # handshake done
    _tcp_transfer(None, wg.ns, THEIR_TUNNEL)              # mqtun -> wireguard-go
    _tcp_transfer(wg.ns, netns, OUR_TUNNEL)               # wireguard-go -> mqtun


def _transfer_figures(ns: NetNamespace, ifname: str) -> tuple[int, int]:
    """(rx bytes, tx bytes) of the interface's one peer, as `wg show` reports them."""
    fields = ns.run(["wg", "show", ifname, "transfer"]).stdout.split()
    return int(fields[1]), int(fields[2])


def _tun_reads(ns: NetNamespace, ifname: str) -> tuple[int, int]:
    """(packets, bytes) the kernel handed to the TUN's reader (its tx counters; `ip netns
    exec` mounts the namespace's own /sys)."""
    base = f"/sys/class/net/{ifname}/statistics"
    out = ns.run(["cat", f"{base}/tx_packets", f"{base}/tx_bytes"]).stdout.split()
    return int(out[0]), int(out[1])


def _receive_buffer_drops(ns: NetNamespace) -> int:
    """Datagrams the namespace's UDP sockets dropped for a full receive buffer."""
    lines = [line.split() for line in ns.run(["cat", "/proc/net/snmp"]).stdout.splitlines()
             if line.startswith("Udp:")]
    return int(dict(zip(lines[0], lines[1], strict=True))["RcvbufErrors"])


def _counters_reconcile(ours: MqtunWg, netns: NetNamespace, theirs: WireguardGo) -> None:
    """What each side sent is what the other received, byte for byte once quiet, unless the
    receiver's socket dropped datagrams (wireguard-go's small buffer overflows under TCP):
    then the sender counted more."""
    def reconciled() -> bool:
        rx, tx = _transfer_figures(netns, ours.name)
        stats = theirs.peer_stats(public_key(OUR_KEY))
        sent_ok = tx == stats.rx_bytes or (tx > stats.rx_bytes and
                                           _receive_buffer_drops(theirs.ns) > 0)
        got_ok = rx == stats.tx_bytes or (rx < stats.tx_bytes and
                                          _receive_buffer_drops(netns) > 0)
        return sent_ok and got_ok
    assert _wait(reconciled, timeout=10), (_transfer_figures(netns, ours.name),
                                           theirs.peer_stats(public_key(OUR_KEY)),
                                           _receive_buffer_drops(netns),
                                           _receive_buffer_drops(theirs.ns))


def test_offloads_on_tcp_intact_and_counters_reconcile(
        pair: tuple[MqtunWg, WireguardGo], netns: NetNamespace,
        request: pytest.FixtureRequest) -> None:
    """With offloads (the default) the TUN has TSO/USO and the kernel hands it super-packets
    (more than one MTU per read on average), TCP is intact both ways against wireguard-go and
    both sides count the same bytes; --no-offload turns all of it off."""
    ours, wg = pair
    offloaded = "--no-offload" not in request.node.callspec.params["pair"]
    ethtool = IoctlEthtool(ours.name)  # (this test runs inside `netns`)
    try:
        features = ethtool.get_features()
        for feature in ("tx-tcp-segmentation", "tx-tcp6-segmentation", "tx-udp-segmentation"):
            assert bool(features[feature]) == offloaded, feature
    finally:
        ethtool.close()
    _udp_exchange(None, OUR_TUNNEL, wg.ns, THEIR_TUNNEL)
    packets0, bytes0 = _tun_reads(netns, ours.name)
    _tcp_transfer(None, wg.ns, THEIR_TUNNEL, size=4 << 20)
    packets1, bytes1 = _tun_reads(netns, ours.name)
    if offloaded:
        assert bytes1 - bytes0 > 1420 * (packets1 - packets0)  # super-packets were read
    _tcp_transfer(wg.ns, netns, OUR_TUNNEL, size=4 << 20)
    _counters_reconcile(ours, netns, wg)


def test_mqtun_to_mqtun_tcp_both_ways(mqtun_pair: tuple[MqtunWg, WireguardGo],
                                      netns: NetNamespace) -> None:
    """mqtun wg on both ends (one queue each, or two workers each), offloads on: GSO trains
    meet a GRO socket, TCP intact both ways, the two ends' counters reconcile."""
    ours, theirs = mqtun_pair
    _udp_exchange(None, OUR_TUNNEL, theirs.ns, THEIR_TUNNEL)
    _tcp_transfer(None, theirs.ns, THEIR_TUNNEL, size=4 << 20)
    _tcp_transfer(theirs.ns, netns, OUR_TUNNEL, size=4 << 20)
    _counters_reconcile(ours, netns, theirs)


@pytest.mark.parametrize("pair", [("--queues", "2")], indirect=True)
def test_two_worker_processes(pair: tuple[MqtunWg, WireguardGo], netns: NetNamespace) -> None:
    """--queues 2: a multiqueue TUN, a worker process per queue, TCP through it both ways."""
    ours, wg = pair
    info = find_link(ours.name)
    assert info is not None and info.multi_queue and info.num_queues == 2
    assert len(netns.pids()) >= 3  # the main process and two workers
    _udp_exchange(None, OUR_TUNNEL, wg.ns, THEIR_TUNNEL)
    _tcp_transfer(None, wg.ns, THEIR_TUNNEL)
    _tcp_transfer(wg.ns, netns, OUR_TUNNEL)


def test_persistent_keepalive(pair: tuple[MqtunWg, WireguardGo], netns: NetNamespace) -> None:
    ours, wg = pair
    _udp_exchange(None, OUR_TUNNEL, wg.ns, THEIR_TUNNEL)
    before = wg.peer_stats(public_key(OUR_KEY)).rx_bytes
    netns.run(["wg", "set", ours.name, "peer", b64(public_key(THEIR_KEY)),
               "persistent-keepalive", "1"])
    # one keepalive at once (turned on), then one a second: at least three 32-byte ones
    assert _wait(lambda: wg.peer_stats(public_key(OUR_KEY)).rx_bytes >= before + 3 * 32,
                 timeout=6)
    assert netns.run(["wg", "show", ours.name, "persistent-keepalive"]).stdout.split()[1] == "1"


def test_ipv6_underlay(pair: tuple[MqtunWg, WireguardGo], netns: NetNamespace) -> None:
    """The dual-stack socket: the same interface reaches wireguard-go over IPv6 too."""
    ours, wg = pair
    netns.run(["ip", "address", "add", "fd00:79::1/64", "dev", "wgv0", "nodad"])
    wg.ns.run(["ip", "address", "add", "fd00:79::2/64", "dev", "wgv1", "nodad"])
    netns.run(["wg", "set", ours.name, "peer", b64(public_key(THEIR_KEY)), "endpoint",
               f"[fd00:79::2]:{THEIR_PORT}"])
    wg.wg("set", wg.name, "peer", b64(public_key(OUR_KEY)), "endpoint",
          f"[fd00:79::1]:{OUR_PORT}")
    _udp_exchange(None, OUR_TUNNEL, wg.ns, THEIR_TUNNEL)
    assert wg.peer_stats(public_key(OUR_KEY)).endpoint == f"[fd00:79::1]:{OUR_PORT}"
    dump = netns.run(["wg", "show", ours.name, "endpoints"]).stdout.split()
    assert dump[1] == f"[fd00:79::2]:{THEIR_PORT}"


def test_listen_port_and_fwmark_reach_the_socket(netns: NetNamespace) -> None:
    need_wireguard_go()
    with MqtunWg(netns) as ours:
        netns.run(["wg", "set", ours.name, "listen-port", "51877", "fwmark", "0x51"])
        sockets = netns.run(["ss", "-uaneH"]).stdout
        assert any(":51877 " in line and "fwmark:0x51" in line for line in sockets.splitlines())
        assert netns.run(["wg", "show", ours.name, "fwmark"]).stdout.strip() == "0x51"


def test_exits_when_the_interface_is_deleted(netns: NetNamespace) -> None:
    need_wireguard_go()
    with MqtunWg(netns) as ours:
        assert _link_exists(netns, ours.name)
        netns.run(["ip", "link", "del", ours.name])
        assert ours.proc.wait(timeout=10) == 0
        assert not os.path.exists(ours.socket)


def test_sigterm_stops_and_cleans_up(netns: NetNamespace) -> None:
    need_wireguard_go()
    with MqtunWg(netns) as ours:
        ours.proc.send_signal(signal.SIGTERM)
        assert ours.proc.wait(timeout=10) == 0
        assert not os.path.exists(ours.socket) and not _link_exists(netns, ours.name)


def test_detaches_by_default(netns: NetNamespace) -> None:
    need_wireguard_go()
    name = f"wgmq{uuid.uuid4().hex[:8]}"
    path = os.path.join(SOCKET_DIR, f"{name}.sock")
    try:
        done = netns.run([sys.executable, "-m", "mqtun", "wg", name], timeout=20)
        assert done.returncode == 0 and os.path.exists(path) and _link_exists(netns, name)
    finally:
        netns.run(["ip", "link", "del", name], check=False)   # the daemon exits with its link
    assert _wait(lambda: not os.path.exists(path))


def test_wg_quick_up_and_down(netns: NetNamespace, make_netns: Callable[[], NetNamespace],
                              tmp_path: object) -> None:
    """WG_QUICK_USERSPACE_IMPLEMENTATION=mqtun-wg wg-quick up CONF (through a wrapper that
    runs this tree's mqtun), traffic to wireguard-go, then wg-quick down."""
    need_wireguard_go()
    theirs_ns = make_netns()
    underlay(theirs_ns, "wgq0", "wgq1", OUR_UNDERLAY, THEIR_UNDERLAY)
    wrapper = f"{tmp_path}/mqtun-wg"
    with open(wrapper, "w") as f:
        f.write(f'#!/bin/sh\nexec {sys.executable} -m mqtun wg "$@"\n')
    os.chmod(wrapper, 0o755)
    name = f"wgmq{uuid.uuid4().hex[:8]}"
    conf = f"{tmp_path}/{name}.conf"
    with open(conf, "w") as f:
        f.write(f"[Interface]\nPrivateKey = {b64(OUR_KEY)}\nListenPort = {OUR_PORT}\n"
                f"Address = {OUR_TUNNEL}/24\n\n[Peer]\nPublicKey = {b64(public_key(THEIR_KEY))}\n"
                f"Endpoint = {THEIR_UNDERLAY}:{THEIR_PORT}\nAllowedIPs = {THEIR_TUNNEL}/32\n")
    os.chmod(conf, 0o600)
    env = {**os.environ, "WG_QUICK_USERSPACE_IMPLEMENTATION": wrapper}
    path = os.path.join(SOCKET_DIR, f"{name}.sock")
    with WireguardGo(theirs_ns, THEIR_KEY, THEIR_PORT) as wg:
        wg.address(f"{THEIR_TUNNEL}/24")
        wg.add_peer(public_key(OUR_KEY), allowed_ips=f"{OUR_TUNNEL}/32")
        try:
            up = netns.run(["wg-quick", "up", conf], env=env, check=False, timeout=30)
            assert up.returncode == 0, up.stderr
            _udp_exchange(None, OUR_TUNNEL, wg.ns, THEIR_TUNNEL)
            down = netns.run(["wg-quick", "down", conf], env=env, check=False, timeout=30)
            assert down.returncode == 0, down.stderr
            assert _wait(lambda: not os.path.exists(path)) and not _link_exists(netns, name)
        finally:
            netns.run(["ip", "link", "del", name], check=False)


def test_refuses_an_interface_that_exists(netns: NetNamespace) -> None:
    need_wireguard_go()
    netns.run(["ip", "link", "add", "wgmqtaken", "type", "veth", "peer", "name", "wgmqtaken1"])
    done = netns.run([sys.executable, "-m", "mqtun", "wg", "--foreground", "wgmqtaken"],
                     check=False, timeout=20)
    assert done.returncode != 0 and "wgmqtaken is a veth link" in done.stderr
    assert "Traceback" not in done.stderr
    assert not os.path.exists(os.path.join(SOCKET_DIR, "wgmqtaken.sock"))
