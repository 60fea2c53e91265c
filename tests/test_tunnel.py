"""`mqtun tunnel vxlan` against the kernel's own VXLAN device, over a veth underlay between two
namespaces: ARP and ping both ways, TCP and UDP intact both ways, 1 and 2 queues, IPv4 and IPv6
underlay; flow affinity per worker; garbage datagrams counted by reason; READY/QSTAT/SIGTERM."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest
from test_tunnel_lab import INNER_A, INNER_B, Lab, TunnelProc, address_tunnel, make_lab, ping

from mqtun.netns import NetNamespace


@pytest.fixture
def tunnel() -> Iterator[Callable[..., TunnelProc]]:
    made: list[TunnelProc] = []

    def start(*args: str) -> TunnelProc:
        tp = TunnelProc(*args)
        made.append(tp)
        return tp

    yield start
    for tp in made:
        tp.kill()


def _start(lab: Lab, tunnel: Callable[..., TunnelProc], queues: int) -> tuple[TunnelProc, str]:
    tp = tunnel("--local", lab.local, "--remote", lab.remote, "--vni", "42",
                "--queues", str(queues), "--name", "vxt%d")
    dev = tp.wait_ready(queues)
    address_tunnel(dev)
    return tp, dev


def _ping(dst: str, ns: NetNamespace | None = None, count: int = 3, size: int = 56) -> None:
    if ns is None:
        assert ping(dst, count, size) == count
    else:
        with ns.enter():
            assert ping(dst, count, size) == count


@pytest.mark.parametrize("v6", [False, True], ids=["ipv4-underlay", "ipv6-underlay"])
@pytest.mark.parametrize("queues", [1, 2])
def test_ping_both_ways(make_netns: Callable[[], NetNamespace],
                        tunnel: Callable[..., TunnelProc], v6: bool, queues: int) -> None:
    lab = make_lab(make_netns(), v6=v6)
    tp, _dev = _start(lab, tunnel, queues)
    _ping(INNER_B)
    _ping(INNER_A, lab.b)
    rc, took = tp.stop()
    assert rc == 0 and took < 1.5, tp.err[-5:]
