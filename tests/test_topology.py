"""The A <-> forwarder <-> B topology of the demo and the benchmark: it connects, and it leaves
nothing behind, also when the forwarder fails to start."""

from __future__ import annotations

import os
import re
import socket
import subprocess
import threading
from pathlib import Path

import pytest

from mqtun.apps.bench import build_c_forwarder
from mqtun.apps.topology import A_IP, B_IP, ForwarderSpec, Topology
from mqtun.errors import InvalidArgumentError, MqtunError
from mqtun.netns import NetNamespace


def _topology_namespaces() -> set[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, timeout=10)
    return {line.split()[0] for line in out.stdout.splitlines()
            if re.match(r"mqtun-[abf]-", line)}


def _tcp_echo(a: NetNamespace, b: NetNamespace) -> bytes:
    """One TCP round trip A -> B -> A over the topology."""
    ready = threading.Event()
    out: list[bytes] = []

    def serve() -> None:
        with b.enter(), socket.socket() as ls:
            ls.bind((B_IP, 7000))
            ls.listen(1)
            ls.settimeout(10)
            ready.set()
            conn, _ = ls.accept()
            with conn:
                conn.settimeout(10)
                conn.sendall(conn.recv(100))

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    assert ready.wait(10)
    with a.enter(), socket.create_connection((B_IP, 7000), timeout=10) as s:
        assert s.getsockname()[0] == A_IP
        s.sendall(b"through the forwarder")
        out.append(s.recv(100))
    t.join(10)
    return out[0]


@pytest.mark.parametrize("spec", [ForwarderSpec("veth"), ForwarderSpec("mqtun", 2),
                                  ForwarderSpec("pytun", 2, offload=False),
                                  ForwarderSpec("pytun", 1, offload=False, compat=True),
                                  ForwarderSpec("mqtun", 2, handler_batch=True,
                                                handler="mqtun.apps.handlers:identity_batch")],
                         ids=lambda s: s.label)
def test_topology_connects_a_and_b_and_cleans_up(spec: ForwarderSpec) -> None:
    before = _topology_namespaces()
    with Topology(spec) as topo:
        assert topo.a is not None and topo.b is not None
        assert _tcp_echo(topo.a, topo.b) == b"through the forwarder"
        pids = topo.forwarder_pids()
        if spec.kind == "veth":
            assert pids == [] and topo.f is None
        else:
            assert len(pids) == 1 + spec.queues  # the parent and a worker per queue
        if spec.kind == "mqtun":
            samples = topo.queue_samples()
            assert [s.queue for s in samples] == list(range(spec.queues))
            assert sum(s.a2b_packets for s in samples) > 0
            assert sum(s.b2a_packets for s in samples) > 0
    assert _topology_namespaces() <= before


def test_a_forwarder_that_fails_to_start_leaves_nothing() -> None:
    before = _topology_namespaces()
    with pytest.raises(MqtunError, match="did not start") as info:
        Topology(ForwarderSpec("mqtun", 1, cpus="9999")).start()  # no such CPU
    assert "CPU 9999" in str(info.value)  # the forwarder's own reason is passed on
    assert _topology_namespaces() <= before
    with pytest.raises(InvalidArgumentError):
        ForwarderSpec("pytun", 1, offload=True)  # python-pytun has no offloads


def _tcp_push(a: NetNamespace, b: NetNamespace, payload: bytes) -> bytes:
    """`payload` A -> B over one TCP connection; what B received."""
    got = bytearray()
    with b.enter():
        ls = socket.socket()
    with ls:
        ls.bind((B_IP, 7001))
        ls.listen(1)
        ls.settimeout(10)
        with a.enter():
            tx = socket.create_connection((B_IP, 7001), timeout=10)
        conn, _ = ls.accept()

        def send() -> None:
            with tx:
                tx.sendall(payload)

        sender = threading.Thread(target=send, daemon=True)
        sender.start()
        with conn:
            conn.settimeout(10)
            while chunk := conn.recv(1 << 16):
                got += chunk
        sender.join(10)
    return bytes(got)


@pytest.mark.parametrize("offload", [True, False], ids=["offloads", "no-offload"])
def test_the_c_forwarder_moves_tcp_and_udp_with_the_offloads_it_was_given(
        offload: bool, tmp_path: Path) -> None:
    """The bench's C baseline is a correct forwarder: TCP intact, every UDP datagram both ways,
    counted by the kernel; with offloads it moves TSO super-packets (far fewer packets than
    MSS-sized segments), without them one packet per segment."""
    binary, why = build_c_forwarder(tmp_path)
    assert binary is not None, why
    before = _topology_namespaces()
    spec = ForwarderSpec("c", 2, offload=offload, program=str(binary))
    with Topology(spec) as topo:
        assert topo.a is not None and topo.b is not None
        assert len(topo.forwarder_pids()) == 1  # one process, a thread per queue pair
        assert _tcp_echo(topo.a, topo.b) == b"through the forwarder"
        payload = os.urandom(2 << 20)
        start_b = topo.link_counters()[1]
        assert _tcp_push(topo.a, topo.b, payload) == payload
        end_a, end_b = topo.link_counters()
        segments = len(payload) // 1448
        written_to_b = (end_b - start_b).rx_packets
        if offload:
            assert written_to_b < segments / 4, written_to_b  # super-packets
        else:
            assert written_to_b >= segments, written_to_b
        for src, dst, dst_ip in ((topo.a, topo.b, B_IP), (topo.b, topo.a, A_IP)):
            with dst.enter():
                rx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            with src.enter():
                tx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            with rx, tx:
                rx.bind((dst_ip, 7002))
                rx.settimeout(5)
                sent = [os.urandom(64 + i) for i in range(50)]
                for d in sent:
                    tx.sendto(d, (dst_ip, 7002))
                assert sorted(rx.recv(2048) for _ in sent) == sorted(sent)
        moved = [after - was for after, was in zip(topo.link_counters(), (end_a, end_b),
                                                    strict=True)]
        assert all(m.rx_packets >= 50 and m.rx_dropped == 0 for m in moved), moved
    assert _topology_namespaces() <= before
