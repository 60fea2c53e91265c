"""Per-queue 64-bit counters, kept by mqtun because the kernel keeps none for tun queues.

The counters live in a flat buffer of unsigned 64-bit slots so that the runtime can place them
in shared memory and a parent process (or `mqtun top`) can read a worker's figures live. A
queue's own process is the only writer of its slots. Every slot wraps modulo 2**64 (a reader
takes deltas modulo 2**64, as for the kernel's counters).
"""

from __future__ import annotations

import ctypes
import enum
import errno
from collections.abc import Iterator, Mapping, MutableSequence
from dataclasses import dataclass
from typing import cast

__all__ = [
    "COUNTER_FIELDS",
    "DROP_FOR_ERRNO",
    "SLOT_COUNT",
    "Counters",
    "DropReason",
    "QueueStats",
    "drop_reason",
]


class DropReason(enum.IntEnum):
    """Why a packet was not delivered. Every undelivered packet is counted under one reason."""

    MALFORMED = 0  # could not be parsed (bad headers, truncated, bad virtio-net header)
    REFUSED = 1  # the kernel refused the write (EINVAL): bad packet for this device
    LINK_DOWN = 2  # write while the link is down (EIO)
    DEVICE_GONE = 3  # the device was deleted under us
    TOO_BIG = 4  # larger than the peer accepts (MTU, 64 KiB)
    NO_PEER = 5  # nowhere to send it (no queue, peer closed)
    HANDLER_ERROR = 6  # the user's handler raised
    FILTERED = 7  # the user's handler chose to drop it
    WRITE_ERROR = 8  # any other write error
    OFFLOAD = 9  # an offload could not be applied (split/coalesce failed)
    BAD_RESULT = 10  # the user's handler returned something that is not a packet
    VXLAN_SHORT = 11  # a tunnel datagram shorter than the VXLAN header
    VXLAN_BAD_FLAGS = 12  # VXLAN header without the I flag, or with a reserved bit set
    VXLAN_WRONG_VNI = 13  # VXLAN datagram of another network (VNI)
    VXLAN_TRUNCATED = 14  # VXLAN datagram whose inner frame is shorter than an Ethernet header
    WRONG_SOURCE = 15  # a tunnel datagram from another address than the configured remote
    SOCKET_OVERFLOW = 16  # a datagram the kernel dropped, the socket's receive buffer full
    QUEUE_FULL = 17  # the device's send buffer was full (EAGAIN) and a worker cannot keep it

    @property
    def label(self) -> str:
        return self.name.lower().replace("_", "-")


# Why the kernel refused a write, by errno: the one map every writer uses.
DROP_FOR_ERRNO: Mapping[int, DropReason] = {
    errno.EINVAL: DropReason.REFUSED,  # bad packet for this device, bad virtio-net header
    errno.EIO: DropReason.LINK_DOWN,  # the link is down
    errno.EMSGSIZE: DropReason.TOO_BIG,
    errno.EBUSY: DropReason.NO_PEER,  # a detached queue of a NAPI device
    errno.EBADF: DropReason.NO_PEER,  # the queue is closed
    errno.EBADFD: DropReason.DEVICE_GONE,  # the device was deleted
    # the send buffer is full (Device.set_sndbuf): the kernel counts no rx_dropped for it
    errno.EAGAIN: DropReason.QUEUE_FULL,
}


def drop_reason(err: int | None) -> DropReason:
    """The DropReason of a write the kernel refused with `err`."""
    return DROP_FOR_ERRNO.get(err or 0, DropReason.WRITE_ERROR)


COUNTER_FIELDS = (
    "read_packets",
    "read_bytes",
    "written_packets",
    "written_bytes",
    "read_errors",
    "write_errors",
    "read_wire_packets",
    "written_wire_packets",
)
_DROP_BASE = len(COUNTER_FIELDS)
SLOT_COUNT = _DROP_BASE + len(DropReason)
(READ_PACKETS, READ_BYTES, WRITTEN_PACKETS, WRITTEN_BYTES, READ_ERRORS, WRITE_ERRORS,
 READ_WIRE_PACKETS, WRITTEN_WIRE_PACKETS) = range(_DROP_BASE)


_SlotArray = ctypes.c_uint64 * SLOT_COUNT


class Counters:
    """A view of SLOT_COUNT uint64 slots in any buffer (bytearray or shared memory).

    `slots[i] += n` wraps modulo 2**64 (a ctypes uint64 store masks, where a 'Q' memoryview
    would raise). A read-only buffer gives read-only slots (a reader's view of a region).
    """

    __slots__ = ("_buffer", "_bytes", "slots")

    slots: MutableSequence[int]

    def __init__(self, buffer: memoryview | bytearray | None = None) -> None:
        if buffer is None:
            buffer = bytearray(SLOT_COUNT * 8)
        view = memoryview(buffer).cast("B")
        if len(view) < SLOT_COUNT * 8:
            raise ValueError(f"a counter buffer needs {SLOT_COUNT * 8} bytes")
        self._buffer = buffer
        self._bytes = view = view[: SLOT_COUNT * 8]
        if view.readonly:
            self.slots = cast(MutableSequence[int], view.cast("Q"))
        else:
            self.slots = cast(MutableSequence[int], _SlotArray.from_buffer(view))

    def tobytes(self) -> bytes:
        """The slots' current values as bytes (a private copy: `Counters(bytearray(...))`)."""
        return self._bytes.tobytes()

    def copy(self) -> Counters:
        """Private counters holding the current values (for a queue leaving shared memory)."""
        return Counters(bytearray(self.tobytes()))

    def drop(self, reason: DropReason, count: int = 1) -> None:
        """Count `count` packets dropped for `reason`."""
        self.slots[_DROP_BASE + reason] += count

    def wire_read(self, count: int) -> None:
        """Count `count` wire packets read (a super-packet counts every packet it holds)."""
        self.slots[READ_WIRE_PACKETS] += count

    def wire_written(self, count: int) -> None:
        """Count `count` wire packets written (a coalesced write counts every packet in it)."""
        self.slots[WRITTEN_WIRE_PACKETS] += count

    def snapshot(self) -> QueueStats:
        """An immutable copy of the current values."""
        values = list(self.slots)
        drops = {r.label: values[_DROP_BASE + r] for r in DropReason if values[_DROP_BASE + r]}
        return QueueStats(**dict(zip(COUNTER_FIELDS, values[:_DROP_BASE], strict=True)),
                          dropped=drops)

    def reset(self) -> None:
        for i in range(SLOT_COUNT):
            self.slots[i] = 0


@dataclass(frozen=True)
class QueueStats:
    """Counters of one queue (or a sum of queues) at one moment.

    `read_*` counts packets the kernel handed to userspace (the device's tx side);
    `written_*` counts packets userspace handed to the kernel (the device's rx side).
    Bytes exclude the packet-info and virtio-net headers, as the kernel's counters do.
    `read_packets`/`written_packets` count what the kernel counts (IFLA_STATS64 tx/rx_packets:
    a super-packet once); `read_wire_packets`/`written_wire_packets` count the wire packets
    they held (a TSO super-packet of 40 segments is 40), where the packet path ran. Drops are
    wire packets.
    """

    read_packets: int = 0
    read_bytes: int = 0
    written_packets: int = 0
    written_bytes: int = 0
    read_errors: int = 0
    write_errors: int = 0
    read_wire_packets: int = 0
    written_wire_packets: int = 0
    dropped: Mapping[str, int] = None  # type: ignore[assignment]

    def __post_init__(self) -> None:
        if self.dropped is None:
            object.__setattr__(self, "dropped", {})

    @property
    def dropped_total(self) -> int:
        return sum(self.dropped.values())

    def __add__(self, other: QueueStats) -> QueueStats:
        drops = dict(self.dropped)
        for k, v in other.dropped.items():
            drops[k] = drops.get(k, 0) + v
        sums = {f: getattr(self, f) + getattr(other, f) for f in COUNTER_FIELDS}
        return QueueStats(**sums, dropped=drops)

    def as_dict(self) -> dict[str, object]:
        out: dict[str, object] = {f: getattr(self, f) for f in COUNTER_FIELDS}
        out["dropped"] = dict(self.dropped)
        return out

    def __iter__(self) -> Iterator[int]:
        return (getattr(self, f) for f in COUNTER_FIELDS)


def total(stats: list[QueueStats]) -> QueueStats:
    """The sum of several queues' counters."""
    out = QueueStats()
    for s in stats:
        out = out + s
    return out
