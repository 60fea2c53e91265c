"""The runtime: a worker process per queue, the fast per-queue I/O loop, asyncio, and the
shared-memory counters that make every worker's figures readable from anywhere."""

from mqtun.runtime.aio import AsyncQueue, async_queues
from mqtun.runtime.loop import (
    DEFAULT_MODE,
    MODES,
    IOLoop,
    LoopConfig,
    PacketIO,
    Route,
    uring_available,
)
from mqtun.runtime.path import Layout, SuperPacket
from mqtun.runtime.shm import (
    EntryInfo,
    EntryState,
    Region,
    RegionInfo,
    list_regions,
    open_region,
    queue_stats_by_device,
    remove_stale_regions,
)
from mqtun.runtime.workers import WorkerEvent, WorkerInfo, WorkerPool, parse_cpus

__all__ = [
    "DEFAULT_MODE",
    "MODES",
    "AsyncQueue",
    "EntryInfo",
    "EntryState",
    "IOLoop",
    "Layout",
    "LoopConfig",
    "PacketIO",
    "Region",
    "RegionInfo",
    "Route",
    "SuperPacket",
    "WorkerEvent",
    "WorkerInfo",
    "WorkerPool",
    "async_queues",
    "list_regions",
    "open_region",
    "parse_cpus",
    "queue_stats_by_device",
    "remove_stale_regions",
    "uring_available",
]
