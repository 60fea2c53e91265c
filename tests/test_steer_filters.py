"""Filters: eBPF (TUNSETFILTEREBPF), classic BPF (TUNATTACHFILTER) and the MAC filter
(TUNSETTXFILTER). Each against its model: synthetic packets through BPF_PROG_TEST_RUN, and
frames sent through a real device by a packet socket, read back from the queues."""

from __future__ import annotations

import errno
import random
import socket
import struct
import time
from collections.abc import Iterable

import pytest
from test_steer_packets import ether, ipv4, ipv6, l4_header, random_packet

from mqtun import Device, InvalidArgumentError, MqtunError
from mqtun import _uapi as u
from mqtun.steer import filters, programs
from mqtun.steer.asm import ClassicAssembler, ClassicProgram
from mqtun.steer.filters import FilterModel, TxFilterModel, ether_crc_bucket, run_classic

A4, B4 = socket.inet_aton("198.18.0.1"), socket.inet_aton("198.18.0.2")
A6 = socket.inet_pton(socket.AF_INET6, "fd00:6d71::1")
B6 = socket.inet_pton(socket.AF_INET6, "fd00:6d71::2")
MAC_A, MAC_B = bytes.fromhex("026d71000001"), bytes.fromhex("026d71000002")


# ---- eBPF filters against their model (no device) --------------------------------------------

FILTERS = [
    {},
    {"max_length": 40},
    {"ip_versions": [6]},
    {"ip_versions": [4], "protocols": [6, 17]},
    {"protocols": [17], "max_length": 60},
]


@pytest.mark.parametrize("tap", [False, True], ids=["tun", "tap"])
@pytest.mark.parametrize("spec", FILTERS, ids=lambda s: ",".join(f"{k}={v}" for k, v in
                                                                  s.items()) or "accept")
def test_ebpf_filter_equals_model(spec: dict, tap: bool) -> None:  # type: ignore[type-arg]
    rnd = random.Random(f"filter-{spec}-{tap}")
    with filters.ebpf_filter(tap=tap, **spec) as prog:
        for _ in range(1500):
            pkt = random_packet(rnd, tap)
            assert prog.run(pkt) == prog.model.ret(pkt), pkt.hex()


def test_drop_all_and_truncate() -> None:
    pkt = ipv4(A4, B4, 17, l4_header(17, 1, 2, bytes(100)))
    with filters.drop_all() as drop, filters.truncate(30) as snap, filters.accept_all() as keep:
        assert drop.run(pkt) == 0 == drop.kept(pkt)
        assert snap.run(pkt) == 30 == snap.kept(pkt)
        assert keep.run(pkt) == len(pkt) == keep.kept(pkt)
    with pytest.raises(InvalidArgumentError):
        FilterModel(ip_versions=[5])
    with pytest.raises(InvalidArgumentError):
        FilterModel(max_length=0)


# ---- classic BPF and the MAC filter models (pure) --------------------------------------------


def test_classic_programs_by_interpretation() -> None:
    v4 = ether(ipv4(A4, B4, 17, l4_header(17, 1, 2)), u.ETH_P_IP)
    v6 = ether(ipv6(A6, B6, [], 17, l4_header(17, 1, 2)), u.ETH_P_IPV6)
    tagged6 = ether(ipv6(A6, B6, [], 17, l4_header(17, 1, 2)), u.ETH_P_IPV6,
                    [(u.ETH_P_8021Q, 9)])
    arp = ether(bytes(28), u.ETH_P_ARP)
    only6 = filters.classic_only_ipv6()
    assert [run_classic(only6, f) != 0 for f in (v4, v6, tagged6, arp)] == [False, True, True,
                                                                           False]
    assert run_classic(only6, v6) == filters.ACCEPT_ALL
    only4 = filters.classic_only_ipv4()
    assert [run_classic(only4, f) != 0 for f in (v4, v6, tagged6, arp)] == [True, False, False,
                                                                           False]
    macs = filters.classic_accept_dst_macs(["02:00:6d:71:00:02", MAC_A])  # ether()'s dst
    assert run_classic(macs, v4) != 0
    assert run_classic(macs, bytes.fromhex("026d71000003") + v4[6:]) == 0
    assert run_classic(macs, b"\x02") == 0  # a load past the end drops
    with pytest.raises(InvalidArgumentError):
        filters.classic_accept_dst_macs([])
    with pytest.raises(InvalidArgumentError):
        filters.mac_bytes("02:00:00")


def test_tx_filter_packing_and_model() -> None:
    raw = filters.pack_tx_filter(["02:6d:71:00:00:01"], allmulti=True)
    assert raw == struct.pack("=HH", u.TUN_FLT_ALLMULTI, 1) + MAC_A
    exact = TxFilterModel([MAC_A])
    assert exact.accepts(MAC_A) and not exact.accepts(MAC_B)
    assert not exact.accepts("01:00:5e:00:00:01")  # multicast: no bucket set
    assert TxFilterModel([MAC_A], allmulti=True).accepts("01:00:5e:00:00:01")
    assert TxFilterModel([]).accepts(MAC_B)  # no address: no filter
    many = [bytes([2, 0, 0, 0, 0, i]) for i in range(8)] + [bytes.fromhex("01005e000001")]
    model = TxFilterModel(many)
    assert model.accepts("01:00:5e:00:00:01") and not model.accepts(MAC_B)
    same_bucket = [m for m in (bytes([1, 0, 0x5E, 0, 0, i]) for i in range(2, 256))
                   if ether_crc_bucket(m) == ether_crc_bucket("01:00:5e:00:00:01")]
    assert same_bucket and model.accepts(same_bucket[0])  # hashed: collisions pass
    assert TxFilterModel([*many, MAC_B]).accepts("02:99:99:99:99:99")  # unicast #10: off
    assert 0 <= ether_crc_bucket(MAC_A) < 64


# ---- on a real device ------------------------------------------------------------------------


def _device(ns, tap: bool, queues: int = 2) -> Device:  # type: ignore[no-untyped-def]
    dev = Device.create("mqf%d", queues, tap=tap, blocking=False)
    ns.run(["sysctl", "-qw", f"net.ipv6.conf.{dev.name}.disable_ipv6=1"])
    dev.link.up()
    return dev


def _send_and_read(dev: Device, frames: Iterable[bytes], expect: int) -> list[bytes]:
    """Send frames through the device with a packet socket; read its queues until `expect`
    packets came and 50 ms passed without more (or 3 s passed)."""
    kind = socket.SOCK_RAW if dev.tap else socket.SOCK_DGRAM
    with socket.socket(socket.AF_PACKET, kind, 0) as s:
        s.bind((dev.name, 0))
        for f in frames:
            if dev.tap:
                s.send(f)
            else:
                s.sendto(f, (dev.name, u.ETH_P_IPV6 if f[0] >> 4 == 6 else u.ETH_P_IP))
    out: list[bytes] = []
    deadline = time.monotonic() + 3.0
    quiet_since = time.monotonic()
    while time.monotonic() < deadline:
        for q in dev.active_queues:
            assert q is not None
            if batch := q.read_batch(512, timeout=0):
                out += batch
                quiet_since = time.monotonic()
        if len(out) >= expect and time.monotonic() - quiet_since > 0.05:
            break
        time.sleep(0.002)
    return out


def _frames(rnd: random.Random, n: int) -> list[bytes]:
    macs = [MAC_A, MAC_B, bytes.fromhex("333300000001"), bytes.fromhex("01005e000001"),
            bytes.fromhex("ffffffffffff")] + [bytes([1, 0, 0x5E, 0, 0, i]) for i in range(2, 40)]
    out = []
    for i in range(n):
        frame = random_packet(rnd, tap=True)
        if len(frame) < 14:
            continue
        dst = macs[i % len(macs)] if i % 3 else bytes([2, 0, 0, 0, i & 0xFF, i >> 8])
        out.append(dst + frame[6:])
    return out


@pytest.mark.parametrize("tap", [False, True], ids=["tun", "tap"])
def test_ebpf_filter_drops_and_trims_on_a_device(netns, tap: bool) -> None:  # type: ignore[no-untyped-def]
    rnd = random.Random(f"dev-filter-{tap}")
    with _device(netns, tap) as dev, filters.ebpf_filter(tap=tap, ip_versions=[4],
                                                          max_length=36) as flt, \
            programs.fixed(1) as steer:
        dev.set_filter_program(flt)
        dev.set_steering_program(steer)
        sent = [random_packet(rnd, tap) for _ in range(400)]
        sent = [p for p in sent if len(p) >= (14 if tap else 20)]
        want = sorted(p[: flt.kept(p)] for p in sent if flt.kept(p))
        got = _send_and_read(dev, sent, len(want))
        assert sorted(got) == want
        assert any(len(p) == 36 for p in got) and len(got) < len(sent)
        assert dev.filter_program is flt
        dev.set_filter_program(None)
        assert sorted(_send_and_read(dev, sent[:50], 50)) == sorted(sent[:50])


def test_classic_filters_on_a_tap(netns) -> None:  # type: ignore[no-untyped-def]
    rnd = random.Random("classic")
    frames = _frames(rnd, 600)
    with _device(netns, tap=True) as dev:
        for prog in (filters.classic_only_ipv6(), filters.classic_only_ipv4(),
                     filters.classic_accept_dst_macs([MAC_A, "01:00:5e:00:00:01"])):
            dev.attach_classic_filter(prog.code)
            assert dev.classic_filter.instructions == len(prog.code) // 8  # TUNGETFILTER
            want = [f for f in frames if run_classic(prog, f)]
            got = _send_and_read(dev, frames, len(want))
            assert sorted(got) == sorted(want) and 0 < len(want) < len(frames)
        dev.detach_classic_filter()
        assert sorted(_send_and_read(dev, frames, len(frames))) == sorted(frames)


@pytest.mark.parametrize(
    ("macs", "allmulti"),
    [
        ([MAC_A], False),
        ([MAC_A, MAC_B], True),
        ([bytes([2, 0, 0, 0, 0, i]) for i in range(8)]
         + [bytes([1, 0, 0x5E, 0, 0, i]) for i in range(2, 6)], False),
        ([bytes([2, 0, 0, 0, 0, i]) for i in range(8)] + [MAC_B], False),  # unicast #9: off
    ],
    ids=["one", "allmulti", "hashed-multicast", "unicast-past-eight"],
)
def test_mac_filter_on_a_tap(netns, macs: list[bytes], allmulti: bool) -> None:  # type: ignore[no-untyped-def]
    rnd = random.Random("txfilter")
    frames = _frames(rnd, 300)
    frames += [bytes([2, 0, 0, 0, 0, i]) + MAC_A + b"\x08\x06" + bytes(28) for i in range(10)]
    model = TxFilterModel(macs, allmulti)
    with _device(netns, tap=True) as dev:
        dev.set_tx_filter(macs, allmulti=allmulti)
        want = sorted(f for f in frames if model.accepts(f[:6]))
        assert sorted(_send_and_read(dev, frames, len(want))) == want
        dev.set_tx_filter([])
        assert len(_send_and_read(dev, frames, len(frames))) == len(frames)


# ---- the classic model against the kernel's checker and interpreter (issue 11) ------------------
def _raw_classic(*insns: tuple[int, int, int, int]) -> ClassicProgram:
    code = b"".join(struct.pack(u.SOCK_FILTER_FORMAT, *i) for i in insns)
    return ClassicProgram(code, len(insns))


RET_X = (u.BPF_RET | u.BPF_X, 0, 0, 0)


def test_classic_ret_x_is_refused_as_the_kernel_refuses_it() -> None:
    prog = _raw_classic((u.BPF_LDX | u.BPF_W | u.BPF_IMM, 0, 0, 20), RET_X)
    with pytest.raises(InvalidArgumentError, match="ret x"):
        run_classic(prog, bytes(60))
    txa = ClassicAssembler().ldx_imm(20).txa().ret_a().assemble()
    assert run_classic(txa, bytes(60)) == 20


@pytest.mark.parametrize("slot", [16, 255, 0xFFFFFFFF])
def test_classic_scratch_memory_outside_m0_m15_is_refused(slot: int) -> None:
    for insn in ((u.BPF_ST, 0, 0, slot), (u.BPF_STX, 0, 0, slot),
                 (u.BPF_LD | u.BPF_W | u.BPF_MEM, 0, 0, slot),
                 (u.BPF_LDX | u.BPF_W | u.BPF_MEM, 0, 0, slot)):
        prog = _raw_classic(insn, (u.BPF_RET | u.BPF_K, 0, 0, 0xFFFF))
        with pytest.raises(InvalidArgumentError, match="scratch memory"):
            run_classic(prog, bytes(60))


def test_the_kernel_refuses_what_the_model_refuses(netns) -> None:  # type: ignore[no-untyped-def]
    """The model's refusals are the kernel's: the same programs get EINVAL at attach."""
    refused = [_raw_classic((u.BPF_LDX | u.BPF_W | u.BPF_IMM, 0, 0, 20), RET_X),
               _raw_classic((u.BPF_ST, 0, 0, 16), (u.BPF_RET | u.BPF_K, 0, 0, 0xFFFF)),
               _raw_classic((u.BPF_LD | u.BPF_W | u.BPF_MEM, 0, 0, 16),
                            (u.BPF_RET | u.BPF_A, 0, 0, 0))]
    txa = ClassicAssembler().ldx_imm(20).txa().ret_a().assemble()
    frames = [f for f in _frames(random.Random("retx"), 40) if len(f) > 20]
    with _device(netns, tap=True) as dev:
        for prog in refused:
            with pytest.raises(InvalidArgumentError):
                run_classic(prog, frames[0])
            with pytest.raises(MqtunError) as exc:
                dev.attach_classic_filter(prog.code)
            assert exc.value.errno == errno.EINVAL
        dev.attach_classic_filter(txa.code)
        want = sorted(f[: run_classic(txa, f)] for f in frames)
        assert sorted(_send_and_read(dev, frames, len(want))) == want
