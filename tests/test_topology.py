"""The A <-> forwarder <-> B topology of the demo and the benchmark: it connects, and it leaves
nothing behind, also when the forwarder fails to start."""

from __future__ import annotations

import re
import socket
import subprocess
import threading

import pytest

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
                                  ForwarderSpec("pytun", 2, offload=False)],
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
            assert [s.queue for s in samples] == [0, 1]
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
