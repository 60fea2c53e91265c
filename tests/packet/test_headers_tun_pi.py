"""tun_pi: the one packet-info header builder (offload.write_packet and the runtime's path)."""

from __future__ import annotations

import struct

from mqtun._uapi import ETH_P_ARP, ETH_P_IP, ETH_P_IPV6, TUN_PI_FORMAT
from mqtun.packet.headers import tun_pi


def _proto(pi: bytes) -> int:
    flags, proto = struct.unpack(TUN_PI_FORMAT, pi)
    assert flags == 0
    return int.from_bytes(proto, "big")


def test_an_ip_packet_gets_its_version_as_protocol() -> None:
    assert _proto(tun_pi(b"\x45" + bytes(19), ethernet=False)) == ETH_P_IP
    assert _proto(tun_pi(b"\x60" + bytes(39), ethernet=False)) == ETH_P_IPV6


def test_a_frame_gets_its_ethertype_and_a_runt_gets_zero() -> None:
    frame = bytes(12) + ETH_P_ARP.to_bytes(2, "big") + bytes(28)
    assert _proto(tun_pi(frame, ethernet=True)) == ETH_P_ARP
    assert _proto(tun_pi(memoryview(frame)[:13], ethernet=True)) == 0
