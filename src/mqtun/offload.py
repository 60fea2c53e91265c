"""Offloads on a real device: which ones the kernel takes, turning them on, and queue I/O with them.

The packet work (checksums, split, coalesce) is `mqtun.packet`'s; this module is the thin shell
that talks to a `Device`:

- `Offloads`: the TUN_F_* bits as an IntFlag;
- `check_offloads`: the kernel's rules for a mask, checked before the kernel sees it, with a
  message that says which rule a mask breaks (the kernel only says EINVAL);
- `probe_offloads()`: what the running kernel accepts, found by trying (unknown bits give
  EINVAL, which is the kernel's documented way to probe) on a scratch device of its own;
- `enable_offloads(dev, flags)`: check, then TUNSETOFFLOAD;
- queue helpers: read a packet as (VnetHeader, memoryview), read the wire packets a super-packet
  stands for, write a super-packet to a device without offloads by splitting it, and gather
  wire-size packets into super-packets before writing them to a device with a vnet header.
"""

from __future__ import annotations

import contextlib
import enum
import errno
from collections.abc import Sequence
from typing import TYPE_CHECKING

from mqtun import _uapi
from mqtun.errors import DeviceGoneError, InvalidArgumentError, MqtunError, QueueFullError
from mqtun.packet import ZERO_HEADER, VnetHeader, coalesce, decode, encode, split
from mqtun.packet.headers import Buffer, MalformedPacket, tun_pi
from mqtun.stats import DropReason, drop_reason

if TYPE_CHECKING:
    from mqtun.device import Device
    from mqtun.queue import Queue

__all__ = [
    "Offloads",
    "check_offloads",
    "enable_offloads",
    "probe_offloads",
    "read_packet",
    "read_packets",
    "read_segments",
    "write_coalesced",
    "write_packet",
    "write_split",
]


class Offloads(enum.IntFlag):
    """TUNSETOFFLOAD bits: what the reader of a queue accepts from the kernel."""

    NONE = 0
    CSUM = _uapi.TUN_F_CSUM
    """Packets may come with a partial checksum (NEEDS_CSUM): the reader completes it."""
    TSO4 = _uapi.TUN_F_TSO4
    TSO6 = _uapi.TUN_F_TSO6
    TSO_ECN = _uapi.TUN_F_TSO_ECN
    UFO = _uapi.TUN_F_UFO
    """Accepted and ignored by the kernel since 4.14: it never hands out UFO packets."""
    USO4 = _uapi.TUN_F_USO4
    USO6 = _uapi.TUN_F_USO6
    UDP_TUNNEL_GSO = _uapi.TUN_F_UDP_TUNNEL_GSO
    UDP_TUNNEL_GSO_CSUM = _uapi.TUN_F_UDP_TUNNEL_GSO_CSUM

    # the usual sets
    TSO = TSO4 | TSO6
    USO = USO4 | USO6


_SEGMENTATION = Offloads.TSO4 | Offloads.TSO6 | Offloads.USO4 | Offloads.USO6
_TUNNEL = Offloads.UDP_TUNNEL_GSO | Offloads.UDP_TUNNEL_GSO_CSUM


def check_offloads(flags: int) -> Offloads:
    """`flags` as `Offloads` if the kernel's set_offload would take it, else InvalidArgumentError.

    The rules (drivers/net/tun.c set_offload): only known bits; every other bit needs CSUM;
    TSO_ECN needs TSO4 or TSO6; USO4 and USO6 go together; UDP_TUNNEL_GSO needs a plain
    segmentation offload (TSO4, TSO6 or USO); UDP_TUNNEL_GSO_CSUM needs UDP_TUNNEL_GSO.
    """
    if not isinstance(flags, int) or flags < 0:
        raise InvalidArgumentError(f"offloads must be a non-negative int, not {flags!r}")
    unknown = flags & ~_uapi.TUN_F_ALL
    if unknown:
        raise InvalidArgumentError(
            f"unknown offload bits {unknown:#x} (known: {_uapi.TUN_F_ALL:#x})"
        )
    f = Offloads(flags)
    if f and not f & Offloads.CSUM:
        raise InvalidArgumentError(
            f"offloads {f!r} need CSUM: a packet the kernel does not checksum can be neither "
            "segmented nor left partial; add Offloads.CSUM"
        )
    if f & Offloads.TSO_ECN and not f & Offloads.TSO:
        raise InvalidArgumentError("TSO_ECN only applies with TSO4 or TSO6")
    if bool(f & Offloads.USO4) != bool(f & Offloads.USO6):
        raise InvalidArgumentError("USO4 and USO6 go together (the kernel has one UDP GSO switch)")
    if f & _TUNNEL and not f & _SEGMENTATION:
        raise InvalidArgumentError(
            "UDP_TUNNEL_GSO needs a plain segmentation offload too (TSO4, TSO6 or USO)"
        )
    if f & Offloads.UDP_TUNNEL_GSO_CSUM and not f & Offloads.UDP_TUNNEL_GSO:
        raise InvalidArgumentError("UDP_TUNNEL_GSO_CSUM needs UDP_TUNNEL_GSO")
    return f


# One candidate per feature, each the smallest mask the kernel would accept with it.
_PROBES: tuple[tuple[Offloads, Offloads], ...] = (
    (Offloads.CSUM, Offloads.CSUM),
    (Offloads.TSO4, Offloads.CSUM | Offloads.TSO4),
    (Offloads.TSO6, Offloads.CSUM | Offloads.TSO6),
    (Offloads.TSO_ECN, Offloads.CSUM | Offloads.TSO4 | Offloads.TSO_ECN),
    (Offloads.UFO, Offloads.CSUM | Offloads.UFO),
    (Offloads.USO, Offloads.CSUM | Offloads.USO),
    (Offloads.UDP_TUNNEL_GSO, Offloads.CSUM | Offloads.TSO4 | Offloads.UDP_TUNNEL_GSO),
    (Offloads.UDP_TUNNEL_GSO_CSUM, Offloads.CSUM | Offloads.TSO4 | _TUNNEL),
)


def probe_offloads(dev: Device | None = None) -> Offloads:
    """Every offload the running kernel accepts, found by trying each one.

    The mask is device-wide, so trying masks on a device in use would hand its other holders
    packets they did not ask for: the trials run on a private scratch device made for them
    (and gone after), never on `dev`, which only says the caller has a device in mind. Needs
    CAP_NET_ADMIN (to create the scratch device).
    """
    from mqtun.device import Device

    found = Offloads.NONE
    with Device.create("mqprobe%d", vnet_hdr=True, offloads=None) as scratch:
        for feature, mask in _PROBES:
            try:
                scratch.set_offloads(int(mask))
            except MqtunError as exc:
                if exc.errno != errno.EINVAL:
                    raise
            else:
                found |= feature
    return found


def enable_offloads(dev: Device, flags: int) -> Offloads:
    """Check `flags` against the kernel's rules and the device, then set them (TUNSETOFFLOAD).

    Offloads hand out packets that need their virtio-net header to be understood, so a device
    without one is refused, as are the UDP-tunnel offloads on a header shorter than 24 bytes
    (the tunnel offsets live in bytes 20-23).
    """
    f = check_offloads(flags)
    if f and not dev.vnet_hdr:
        raise InvalidArgumentError(
            f"offloads on {dev.name} need a virtio-net header: create the device with "
            "vnet_hdr=True", device=dev.name,
        )  # fmt: skip
    if f & _TUNNEL and dev.vnet_hdr_size < _uapi.VIRTIO_NET_HDR_V1_HASH_TUNNEL_SIZE:
        raise InvalidArgumentError(
            f"UDP-tunnel offloads need a 24-byte virtio-net header on {dev.name}: "
            "call set_vnet_hdr_size(24) first", device=dev.name,
        )  # fmt: skip
    dev.set_offloads(int(f))
    return f


# ---- queue I/O ------------------------------------------------------------------------------
def _layout(queue: Queue) -> tuple[int, int, bool]:
    """(packet-info bytes, virtio-net header bytes, tap) of the queue's device."""
    dev = queue.device
    return (_uapi.TUN_PI_SIZE if dev.packet_info else 0), dev.vnet_hdr_size, dev.tap


def _wire_count(hdr: VnetHeader, packet: Buffer) -> int:
    """How many wire packets a (super-)packet stands for: what a drop of it costs."""
    if not hdr.is_gso or hdr.gso_size <= 0:
        return 1
    payload = len(packet) - hdr.hdr_len
    return max(1, -(-payload // hdr.gso_size))


def _decode(queue: Queue, data: bytes, pi: int, size: int,
            little_endian: bool | None) -> tuple[VnetHeader, memoryview]:
    """(header, packet) of one read; a header that cannot be decoded is a MALFORMED drop."""
    view = memoryview(data)
    if not size:
        return ZERO_HEADER, view[pi:]
    try:
        hdr = decode(view[pi:], size, little_endian=little_endian)
    except MalformedPacket:
        queue.counters.drop(DropReason.MALFORMED)
        raise
    return hdr, view[pi + size :]


def read_packet(
    queue: Queue, timeout: float | None = 0.0, *, little_endian: bool | None = None
) -> tuple[VnetHeader, memoryview] | None:
    """One packet from `queue` as (virtio-net header, the packet), or None if none came in time.

    A device without a virtio-net header gives ZERO_HEADER. `little_endian` is the header's byte
    order: None (native) unless the device was told set_vnet_le(True). A header that cannot be
    decoded is counted as a MALFORMED drop and raises MalformedPacket.
    """
    data = queue.read(timeout)
    if data is None:
        return None
    pi, size, _ = _layout(queue)
    return _decode(queue, data, pi, size, little_endian)


def read_packets(
    queue: Queue,
    max_packets: int = 64,
    timeout: float | None = 0.0,
    *,
    little_endian: bool | None = None,
) -> list[tuple[VnetHeader, memoryview]]:
    """Up to `max_packets` queued packets as (header, packet) pairs, in one drain.

    A packet whose header cannot be decoded is counted as a MALFORMED drop and left out; the
    rest of the batch comes back.
    """
    pi, size, _ = _layout(queue)
    out = []
    for data in queue.read_batch(max_packets, timeout):
        with contextlib.suppress(MalformedPacket):
            out.append(_decode(queue, data, pi, size, little_endian))
    return out


def read_segments(
    queue: Queue, timeout: float | None = 0.0, *, little_endian: bool | None = None
) -> list[bytes]:
    """The wire packets the next packet of `queue` stands for (a super-packet is split).

    Empty if nothing came in time. A packet that cannot be split is counted as an OFFLOAD drop
    (a header that cannot be decoded as MALFORMED) and raises `MalformedPacket`.
    """
    got = read_packet(queue, timeout, little_endian=little_endian)
    if got is None:
        return []
    hdr, packet = got
    try:
        return split(hdr, packet, tap=queue.device.tap)
    except MalformedPacket:
        queue.counters.drop(DropReason.OFFLOAD)
        raise


def write_packet(
    queue: Queue, hdr: VnetHeader, packet: Buffer, *, little_endian: bool | None = None
) -> int:
    """Write one packet with its virtio-net header (gathered, the packet is not copied).

    A refused super-packet is counted as a drop of every wire packet it stands for.
    """
    pi, size, tap = _layout(queue)
    if not size:
        if hdr.is_gso or hdr.needs_csum:
            raise InvalidArgumentError(
                f"{queue.device.name} has no virtio-net header to carry {hdr!r}: "
                "use write_split", device=queue.device.name,
            )  # fmt: skip
        parts: list[Buffer] = [packet]
    else:
        parts = [encode(hdr, size, little_endian=little_endian), packet]
    if pi:
        parts.insert(0, tun_pi(packet, tap))
    try:
        return queue.writev(parts)
    except QueueFullError:
        raise  # not a drop (the queue's EAGAIN rule): the packet is still the caller's
    except MqtunError as exc:
        extra = _wire_count(hdr, packet) - 1  # Queue.writev counted one
        if extra:
            queue.counters.drop(drop_reason(exc.errno), extra)
        raise


def _write_all(queue: Queue, items: Sequence[tuple[VnetHeader, Buffer]],
               little_endian: bool | None) -> int:
    """Write every item, each failure counted (by write_packet); the first failure is raised
    after the others were tried. A deleted device or a closed queue stops at once, the items
    left counted as drops too. A send buffer that stays full stops at once too, nothing
    counted: QueueFullError says how many were written, the rest are still the caller's.
    Returns how many were written."""
    written = 0
    first: MqtunError | None = None
    for i, (hdr, data) in enumerate(items):
        try:
            write_packet(queue, hdr, data, little_endian=little_endian)
            written += 1
        except QueueFullError as exc:
            exc.written = written
            raise
        except MqtunError as exc:
            if isinstance(exc, DeviceGoneError) or exc.errno == errno.EBADF:
                left = sum(_wire_count(h, d) for h, d in items[i + 1 :])
                if left:
                    queue.counters.drop(drop_reason(exc.errno), left)
                raise
            first = first or exc
    if first is not None:
        raise first
    return written


def write_split(
    queue: Queue,
    hdr: VnetHeader,
    packet: Buffer,
    *,
    tap: bool | None = None,
    little_endian: bool | None = None,
) -> int:
    """Write a super-packet to a device that takes only wire packets: split it, write each.

    `tap` says what `packet` is (an Ethernet frame or an IP packet); by default the same as the
    target device. Returns how many packets were written. Every segment is tried; each refused
    one is counted as a drop, and the first refusal raised at the end. A super-packet that
    cannot be split is counted as OFFLOAD drops (one per wire packet it claims to be).
    """
    src_tap = queue.device.tap if tap is None else tap
    try:
        segments = split(hdr, packet, tap=src_tap)
    except MalformedPacket:
        queue.counters.drop(DropReason.OFFLOAD, _wire_count(hdr, packet))
        raise
    return _write_all(queue, [(ZERO_HEADER, seg) for seg in segments], little_endian)


def write_coalesced(
    queue: Queue,
    packets: Sequence[Buffer],
    *,
    udp: bool = True,
    verify: bool = True,
    little_endian: bool | None = None,
) -> int:
    """Write wire-size packets to a vnet device, same-flow runs joined into super-packets.

    Writing a GSO packet needs no offload flag on the device (TUNSETOFFLOAD only governs what
    the kernel hands out), only the virtio-net header. `udp=False` keeps UDP out for kernels
    older than 6.2. Returns how many writes were made. Every write is tried; a refused one is
    counted as a drop of each wire packet it held, and the first refusal raised at the end.
    """
    if not queue.device.vnet_hdr:
        raise InvalidArgumentError(
            f"{queue.device.name} has no virtio-net header: coalesced writes need vnet_hdr=True",
            device=queue.device.name,
        )
    items = coalesce(packets, tap=queue.device.tap, udp=udp, verify=verify)
    return _write_all(queue, items, little_endian)
