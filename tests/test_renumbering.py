"""Queue indices after detach/attach/close: checked by which fd really receives a packet.

A steering program that returns the constant k sends every packet to kernel queue k, so the
queue that receives it is the kernel's queue k — independent of mqtun's bookkeeping, which
must name the same fd.
"""

from __future__ import annotations

import random
import select

from nettools import ADDR_B, NET, udp_flows

from mqtun import Device, Queue
from mqtun.steer import fixed


def _receiver_of_kernel_index(dev: Device, k: int) -> Queue:
    with fixed(k) as prog:
        dev.set_steering_program(prog)
    udp_flows(ADDR_B, [9000 + k])
    live = [q for q in dev.queues if not q.closed]
    ready, _, _ = select.select(live, [], [], 5)
    assert len(ready) == 1, f"exactly one queue receives the packet, got {ready}"
    (q,) = ready
    assert len(q.read_batch(8)) == 1
    return q


def _check(dev: Device) -> None:
    info = dev.info()
    active = [q for q in dev.active_queues if q is not None]
    disabled = [q for q in dev.queues if not q.closed and not q.enabled]
    assert (info.num_queues, info.num_disabled_queues) == (len(active), len(disabled))
    for k in range(len(active)):
        assert _receiver_of_kernel_index(dev, k) is dev.queue(k), f"kernel queue {k}"
        assert dev.queue(k).index == k


def test_detach_moves_the_last_queue_into_the_slot() -> None:
    with Device.create("rn%d", 4) as dev:
        dev.link.up()
        dev.link.add_address(NET)
        q0, q1, q2, q3 = dev.queues
        _check(dev)
        q1.disable()
        assert dev.active_queues == [q0, q3, q2] and q1.index is None
        _check(dev)
        q0.disable()
        assert dev.active_queues == [q2, q3]
        _check(dev)
        q1.enable()
        assert q1.index == 2
        _check(dev)
        q3.close()
        assert dev.active_queues == [q2, q1]
        _check(dev)
        q4 = dev.add_queue()
        assert q4.index == 2
        _check(dev)
        q0.close()  # closing a disabled queue moves nothing
        assert dev.active_queues == [q2, q1, q4]
        _check(dev)


def test_random_churn_keeps_indices_true() -> None:
    rng = random.Random(1234)
    with Device.create("rc%d", 6) as dev:
        dev.link.up()
        dev.link.add_address(NET)
        for _ in range(25):
            live = [q for q in dev.queues if not q.closed]
            enabled = [q for q in live if q.enabled]
            action = rng.choice(["disable", "enable", "close", "add"])
            if action == "disable" and len(enabled) > 1:
                rng.choice(enabled).disable()
            elif action == "enable" and len(live) > len(enabled):
                rng.choice([q for q in live if not q.enabled]).enable()
            elif action == "close" and len(enabled) > 1:
                rng.choice(live).close()
            elif action == "add" and len(live) < 10:
                dev.add_queue()
            _check(dev)
