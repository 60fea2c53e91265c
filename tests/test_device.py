"""Devices: create, attach, flags, persistence, owner/group, queue counts — on the real kernel."""

from __future__ import annotations

import errno
import socket

import pytest
from nettools import ADDR_B, NET, run_as, wait_for

import mqtun
from mqtun import Device, FlagMismatchError, InvalidArgumentError, MqtunError, find_link


def test_single_queue_tun_defaults() -> None:
    with Device.create() as dev:
        info = dev.info()
        assert dev.name.startswith("mq") and info.name == dev.name
        assert (info.kind, info.packet_info, info.vnet_hdr, info.multi_queue) == (
            "tun", False, False, False)
        assert info.num_queues is None, "the kernel counts queues of multiqueue devices only"
        assert not info.persist
        assert dev.ifindex == info.ifindex
        name = dev.name
    assert find_link(name) is None, "a non-persistent device disappears with its last queue"


def test_pattern_and_fixed_names() -> None:
    with Device.create("mqa%d") as a, Device.create("mqa%d") as b, Device.create("fixed0") as c:
        assert {a.name, b.name} == {"mqa0", "mqa1"}
        assert c.name == "fixed0"


def test_tap_multiqueue_vnet_packet_info() -> None:
    with Device.create("tp%d", 4, tap=True, vnet_hdr=True, packet_info=True) as dev:
        info = dev.info()
        assert (info.kind, info.multi_queue, info.vnet_hdr, info.packet_info) == (
            "tap", True, True, True)
        assert info.num_queues == 4 and len(dev.queues) == 4
        assert [q.index for q in dev.queues] == [0, 1, 2, 3]
        assert dev.header_size == 4 + 10
        assert info.hwaddr and len(info.hwaddr.split(":")) == 6


def test_multi_queue_on_request_with_one_queue() -> None:
    with Device.create(queues=1, multi_queue=True) as dev:
        assert dev.info().multi_queue
        q = dev.add_queue()
        assert q.index == 1 and dev.info().num_queues == 2


def test_single_queue_device_refuses_a_second_queue() -> None:
    with Device.create() as dev, pytest.raises(InvalidArgumentError, match="no multiqueue"):
        dev.add_queue()


def test_256_queues_and_the_257th_is_refused() -> None:
    with Device.create("mq%d", 256) as dev:
        assert dev.info().num_queues == 256
        with pytest.raises(MqtunError) as exc:
            dev.add_queue()
        assert exc.value.errno == errno.E2BIG and "256" in str(exc.value)
        # and the kernel says the same to another opener
        with pytest.raises(MqtunError) as kexc:
            Device.attach(dev.name)
        assert kexc.value.errno == errno.E2BIG and dev.name in str(kexc.value)
        # detached queues count too: detach one, still no room
        dev.queues[5].disable()
        with pytest.raises(MqtunError) as dexc:
            Device.attach(dev.name)
        assert dexc.value.errno == errno.E2BIG


def test_persistent_device_survives_and_reattaches() -> None:
    dev = Device.create("keep0", 2, persist=True, tap=True)
    ifindex = dev.ifindex
    dev.close()
    info = find_link("keep0")
    assert info is not None and info.persist and info.num_queues == 0
    with Device.attach("keep0", 3) as again:
        assert again.ifindex == ifindex
        assert again.tap and again.multi_queue
        assert again.info().num_queues == 3
        again.delete()
    assert find_link("keep0") is None


def test_attach_with_foreign_queues_tracks_indices() -> None:
    with Device.create("sh0", 2) as owner, Device.attach("sh0", 2) as other:
        assert [q.index for q in other.queues] == [2, 3]
        assert other.active_queues[:2] == [None, None]
        with pytest.raises(InvalidArgumentError, match="another process"):
            other.queue(0)
        assert owner.info().num_queues == 4


def test_owner_and_group_are_set() -> None:
    with Device.create(owner="nobody", group="nogroup", persist=True) as dev:
        info = dev.info()
        assert info.owner == 65534 and info.group == 65534
        dev.set_owner(0)
        assert dev.info().owner == 0
        with pytest.raises(InvalidArgumentError, match="cannot be unset"):
            dev.set_owner(None)  # type: ignore[arg-type]
        dev.delete()


@pytest.mark.parametrize(
    ("kwargs", "word"),
    [
        ({"tap": True}, "tap"),
        ({"vnet_hdr": True}, "vnet_hdr"),
        ({"packet_info": True}, "packet_info"),
        ({"multi_queue": False}, "multi_queue"),
    ],
)
def test_attach_refuses_flag_mismatch(kwargs: dict[str, bool], word: str) -> None:
    with Device.create("mm0", 2), pytest.raises(FlagMismatchError) as exc:
        Device.attach("mm0", **kwargs)
    assert "mm0" in str(exc.value) and word in str(exc.value)


def test_attach_adopts_the_device_flags() -> None:
    with (
        Device.create("ad0", 1, tap=True, vnet_hdr=True, multi_queue=True) as dev,
        Device.attach("ad0") as other,
    ):
        assert (other.tap, other.vnet_hdr, other.multi_queue) == (True, True, True)
        assert other.header_size == dev.header_size == 10


def test_attach_more_queues_to_single_queue_device_is_refused() -> None:
    with Device.create("sq0", persist=True) as dev:
        dev.close()
        with pytest.raises(FlagMismatchError, match="without multiqueue"):
            Device.attach("sq0", 2)
        Device.attach("sq0").delete()


def test_attach_unknown_and_non_tun_devices() -> None:
    with pytest.raises(MqtunError, match="no tun/tap device named ghost0"):
        Device.attach("ghost0")
    with pytest.raises(InvalidArgumentError, match="not a tun/tap device"):
        Device.attach("lo")
    with pytest.raises(InvalidArgumentError, match="exact device name"):
        Device.attach("mq%d")


def test_create_refuses_an_existing_name() -> None:
    with Device.create("dup0", 2):
        with pytest.raises(MqtunError) as exc:
            Device.create("dup0")
        assert exc.value.errno == errno.EBUSY
        assert "dup0 already exists" in str(exc.value) and "attach" in str(exc.value)


@pytest.mark.parametrize(
    ("name", "why"),
    [
        ("a" * 16, "at most 15"),
        ("bad/name", "'/'"),
        ("has space", "' '"),
        ("a:b", "':'"),
        ("..", "not allowed"),
        ("mq%s", "pattern"),
        ("%d%d", "pattern"),
    ],
)
def test_bad_names_are_refused_before_the_kernel(name: str, why: str) -> None:
    with pytest.raises(InvalidArgumentError, match=why):
        Device.create(name)


@pytest.mark.parametrize("queues", [0, 257, -1, True, "4", 2.0])
def test_bad_queue_counts(queues: object) -> None:
    with pytest.raises(InvalidArgumentError, match="queue count"):
        Device.create("mq%d", queues)  # type: ignore[arg-type]


def test_unknown_owner_and_group() -> None:
    with pytest.raises(InvalidArgumentError, match="no such user"):
        Device.create(owner="no-such-user-mqtun")
    with pytest.raises(InvalidArgumentError, match="no such group"):
        Device.create(group="no-such-group-mqtun")
    assert not mqtun.list_tun_links(), "nothing half-created is left behind"


def test_attach_adopts_the_device_offload_mask_unless_told() -> None:
    """The mask is device-wide: a second holder attaching must not reset it under the first
    (whose TSO would stop, or whose reads would change shape); it adopts and can read it."""
    UDP_SEGMENT = 103
    uso = 0x01 | 0x20 | 0x40  # CSUM | USO4 | USO6
    owner = Device.create("off0", vnet_hdr=True, persist=True, offloads=uso)
    owner.link.up()
    owner.link.add_address(NET)

    def reads_for_one_gso_send(dev: Device) -> int:
        assert dev.link.wait_operational()
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.setsockopt(socket.SOL_UDP, UDP_SEGMENT, 1000)
            s.sendto(b"z" * 4000, (ADDR_B, 9))
        q = dev.queues[-1]
        wait_for(lambda: select_readable(q.fd), message=lambda: f"{dev.info()}")
        n = 0
        while (pkt := q.read(timeout=0.2)) is not None:
            ip = pkt[10:]  # after the virtio-net header
            n += ip[9] == socket.IPPROTO_UDP and ip[22:24] == b"\x00\x09"
        return n

    try:
        assert reads_for_one_gso_send(owner) == 1, "USO on: one super-packet"
        assert owner.offloads == uso, "read back from the kernel's device features"
        owner.close()
        with Device.attach("off0") as adopter:  # the default adopts the mask
            assert adopter.offloads == uso
            assert reads_for_one_gso_send(adopter) == 1
        with Device.attach("off0", offloads=0) as resetter:  # told: set for everyone
            assert resetter.offloads == 0
            assert reads_for_one_gso_send(resetter) == 4, "four wire-size datagrams"
    finally:
        Device.attach("off0").delete()


def select_readable(fd: int) -> bool:
    import select

    return bool(select.select([fd], [], [], 0.05)[0])


def test_tun_features_reports_multiqueue_support() -> None:
    feats = mqtun.tun_features()
    assert feats & 0x0100 and feats & 0x0001 and feats & 0x0002


def test_vnet_header_size_le_sndbuf_and_link_type() -> None:
    with Device.create(vnet_hdr=True) as dev:
        dev.set_vnet_hdr_size(12)
        assert dev.vnet_hdr_size == 12 and dev.header_size == 12
        with pytest.raises(InvalidArgumentError, match=">= 10"):
            dev.set_vnet_hdr_size(8)
        dev.set_vnet_le(True)
        assert dev.vnet_le
        dev.set_sndbuf(1 << 20)
        assert dev.sndbuf == 1 << 20
        with pytest.raises(InvalidArgumentError):
            dev.set_sndbuf(0)
        dev.link.up()
        with pytest.raises(MqtunError) as exc:
            dev.set_link_type(1)
        assert exc.value.errno == errno.EBUSY and "while it is up" in str(exc.value)
    with Device.create() as plain, pytest.raises(InvalidArgumentError, match="no virtio-net"):
        plain.set_vnet_hdr_size(12)


def test_offload_mask_errors_are_explained() -> None:
    with Device.create(vnet_hdr=True) as dev:
        with pytest.raises(MqtunError) as exc:
            dev.set_offloads(0x02)  # TSO4 without CSUM
        assert exc.value.errno == errno.EINVAL and "TUN_F_CSUM" in str(exc.value)
        dev.set_offloads(0x03)
        assert dev.offloads == 0x03


def test_carrier_off_and_on() -> None:
    with Device.create() as dev:
        dev.link.up()
        dev.set_carrier(False)
        assert not dev.info().carrier
        dev.set_carrier(True)
        assert dev.info().carrier


def test_unprivileged_user_cannot_create() -> None:
    def create() -> str:
        try:
            Device.create("np0")
        except mqtun.PermissionDeniedError as exc:
            return f"EPERM {exc}"
        return "created"

    out = run_as("nobody", create)
    assert out.startswith("EPERM") and "CAP_NET_ADMIN" in out
    assert find_link("np0") is None


def test_owner_may_open_queues_and_others_may_not() -> None:
    Device.create("own0", 1, multi_queue=True, owner="nobody", persist=True).close()

    def attach_two() -> str:
        try:
            with Device.attach("own0", 2) as d:
                return f"OK {d.info().num_queues}"
        except mqtun.PermissionDeniedError as exc:
            return f"EPERM {exc}"

    assert run_as("nobody", attach_two) == "OK 2"
    refused = run_as("daemon", attach_two)
    assert refused.startswith("EPERM") and "own0" in refused and "owner/group" in refused
    Device.attach("own0").delete()


# ---- messages name the real cause (issue 11) ----------------------------------------------------
def test_carrier_on_without_an_attached_queue_is_not_a_permission_problem() -> None:
    with Device.create("ca%d", 1, multi_queue=True) as dev:
        dev.queues[0].disable()
        with pytest.raises(MqtunError) as exc:
            dev.set_carrier(True)  # as root: the kernel's EPERM means "no queue attached"
        assert exc.value.errno == errno.EPERM
        assert not isinstance(exc.value, mqtun.PermissionDeniedError)
        assert "CAP_NET_ADMIN" not in str(exc.value) and "no queue is attached" in str(exc.value)


def test_a_bad_program_fd_is_not_a_closed_queue() -> None:
    import resource

    unused = resource.getrlimit(resource.RLIMIT_NOFILE)[0] - 1  # no open file there
    with Device.create() as dev:
        for attach in (dev.set_steering_program, dev.set_filter_program):
            with pytest.raises(MqtunError) as exc:
                attach(unused)
            assert exc.value.errno == errno.EBADF
            assert "closed" not in str(exc.value) and "program fd" in str(exc.value)


def test_enabling_a_queue_of_a_deleted_device_says_gone() -> None:
    with Device.create("eg0", 2) as dev:
        q = dev.queues[1]
        q.disable()
        mqtun.delete_link("eg0")
        with pytest.raises(mqtun.DeviceGoneError) as exc:
            q.enable()
        assert "already" not in str(exc.value) and "gone" in str(exc.value)


def test_ebusy_to_a_single_queue_caller_does_not_suggest_single_queue() -> None:
    with Device.create("sb0"), pytest.raises(MqtunError) as exc:
        Device.attach("sb0")  # queues=1, as the message of old suggested
    assert exc.value.errno == errno.EBUSY
    text = str(exc.value)
    assert "open it single-queue" not in text and "already open" in text and "sb0" in text


@pytest.mark.parametrize("name", ["br{c", "x{0}y", "{dev}", "{dev!r}", "a}b"])
def test_a_device_name_with_braces_is_quoted_as_it_is(name: str) -> None:
    with Device.create(name), pytest.raises(MqtunError) as exc:
        Device.create(name)
    assert exc.value.errno == errno.EBUSY
    assert f"device {name} already exists" in str(exc.value)


def test_every_kernel_errno_of_every_operation_has_its_text() -> None:
    """The (operation, errno) pairs the tun driver can return, each written for its operation."""
    from mqtun import errors

    pairs = [("create", e) for e in (errno.EPERM, errno.EBUSY, errno.EINVAL, errno.E2BIG)]
    pairs += [(op, e) for op in ("attach", "attach_single", "open_flags")
              for e in (errno.EPERM, errno.EBUSY, errno.EINVAL, errno.EEXIST)]
    pairs += [("add_queue", errno.E2BIG), ("detach", errno.EINVAL), ("reattach", errno.EINVAL),
              ("reattach", errno.EPERM), ("set_carrier", errno.EPERM),
              ("set_link_type", errno.EBUSY), ("set_offload", errno.EINVAL),
              ("set_vnet_hdr_size", errno.EINVAL), ("set_sndbuf", errno.EINVAL),
              ("set_steering", errno.EINVAL), ("set_steering", errno.EBADF),
              ("set_filter", errno.EINVAL), ("set_filter", errno.EBADF),
              ("set_txfilter", errno.EINVAL), ("attach_classic_filter", errno.EINVAL),
              ("detach_classic_filter", errno.EINVAL), ("get_classic_filter", errno.EINVAL),
              ("read", errno.EFAULT), ("read", errno.EINVAL), ("write", errno.EINVAL),
              ("write", errno.EIO), ("write", errno.EBUSY), ("write", errno.EAGAIN)]
    for op, err in pairs:
        assert errors.explained(op, err), (op, err)
        text = str(errors.kernel_error(OSError(err, "x"), op, "mq7"))
        assert "failed:" not in text and "cannot " + op not in text, (op, err, text)
    # op-independent errnos still name the operation
    gone = str(errors.kernel_error(OSError(errno.EBADFD, "x"), "set_carrier", "mq7"))
    assert "change the carrier of mq7" in gone and "gone" in gone


# ---- what the kernel knows comes from the kernel (issue 11) -------------------------------------
def test_attach_reads_the_virtio_net_header_size_the_device_has() -> None:
    """The size is device-wide: an attacher must not assume 10 when the owner set 24."""
    from mqtun.offload import read_packet

    with Device.create("vh%d", vnet_hdr=True, multi_queue=True) as owner:
        owner.set_vnet_hdr_size(24)
        owner.link.up()
        owner.link.add_address(NET)
        with Device.attach(owner.name) as other:
            assert other.vnet_hdr_size == 24 and other.header_size == 24
            assert other.queues[0].header_size == 24
            owner.close()
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
                s.sendto(b"v" * 30, (ADDR_B, 9))
            got = read_packet(other.queues[0], timeout=5)
            assert got is not None
            _hdr, packet = got
            assert packet[0] == 0x45 and bytes(packet[-30:]) == b"v" * 30, "split at 24"
            owner_set = Device.attach(other.name)
            owner_set.set_vnet_hdr_size(12)  # another holder changes it
            assert other.refresh_vnet_hdr_size() == 12 and other.queues[0].header_size == 12
            owner_set.close()


def test_queue_flags_and_limits_come_from_the_kernel() -> None:
    with Device.create("fl%d", 2) as dev, Device.create("sq%d") as single:
        q = dev.queues[1]
        assert q.flags & 0x0100 and not q.flags & 0x0400  # MULTI_QUEUE, not DETACH_QUEUE
        q.disable()
        assert q.flags & 0x0400, "TUNGETIFF reports a detached queue"
        assert dev.max_queues == 256 and single.max_queues == 1
        info = dev.info()
        assert (info.max_tx_queues, info.max_rx_queues) == (256, 256)
        assert (info.num_queues, info.num_disabled_queues) == (1, 1)
        assert dev.link.channels() == (1, 256), "what `ethtool -l` shows"
        dev.add_queue()
        assert dev.link.channels() == (2, 256) and dev.info().num_queues == 2
