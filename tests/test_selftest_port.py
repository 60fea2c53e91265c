"""The attach/detach/close/delete orders the kernel's own selftest checks, via mqtun's API.

Ported from tools/testing/selftests/net/tun.c (FIXTURE tun): a 2-queue multiqueue TAP with
IFF_NAPI; "delete" is an rtnetlink link deletion. Every step succeeds unless noted.
"""

from __future__ import annotations

import errno
from collections.abc import Iterator

import pytest

from mqtun import Device, DeviceGoneError, MqtunError, delete_link, find_link


@pytest.fixture
def tap2() -> Iterator[Device]:
    dev = Device.create("tap%d", 2, tap=True, napi=True, multi_queue=True)
    yield dev
    dev.close()


def test_delete_detach_close(tap2: Device) -> None:
    delete_link(tap2.name)
    # the kernel says EINVAL (as to a queue detached already); mqtun tells the two apart
    with pytest.raises(DeviceGoneError):
        tap2.queues[0].disable()
    tap2.close()


def test_detach_delete_close(tap2: Device) -> None:
    name = tap2.name
    tap2.queues[0].disable()
    delete_link(name)
    assert find_link(name) is None
    tap2.close()


def test_detach_close_delete(tap2: Device) -> None:
    name = tap2.name
    tap2.queues[0].disable()
    tap2.queues[0].close()
    delete_link(name)
    assert find_link(name) is None


def test_reattach_delete_close(tap2: Device) -> None:
    name = tap2.name
    q = tap2.queues[0]
    q.disable()
    q.enable()
    assert q.index == 1, "a re-attached queue takes the last index"
    delete_link(name)
    tap2.close()


def test_reattach_close_delete(tap2: Device) -> None:
    name = tap2.name
    q = tap2.queues[0]
    q.disable()
    q.enable()
    q.close()
    assert tap2.info().num_queues == 1
    delete_link(name)
    assert find_link(name) is None


def test_napi_write_on_a_detached_queue_is_refused(tap2: Device) -> None:
    tap2.link.up()
    q = tap2.queues[0]
    q.disable()
    frame = bytes.fromhex("ffffffffffff020000000002") + b"\x08\x00" + b"\x45" + b"\0" * 40
    with pytest.raises(MqtunError) as exc:
        q.write(frame)
    assert exc.value.errno == errno.EBUSY and "disabled" in str(exc.value)
