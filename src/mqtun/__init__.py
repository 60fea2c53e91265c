"""mqtun: multiqueue TUN/TAP for Python.

The public API, re-exported from the modules that define it.
"""

from mqtun.device import Device, tun_features, validate_name
from mqtun.errors import (
    DeviceGoneError,
    FlagMismatchError,
    InvalidArgumentError,
    MqtunError,
    PermissionDeniedError,
)
from mqtun.link import Link, LinkInfo, delete_link, find_link, list_tun_links
from mqtun.netns import NetNamespace
from mqtun.queue import Queue
from mqtun.stats import DropReason, QueueStats

__version__ = "0.1.0"

__all__ = [
    "Device",
    "DeviceGoneError",
    "DropReason",
    "FlagMismatchError",
    "InvalidArgumentError",
    "Link",
    "LinkInfo",
    "MqtunError",
    "NetNamespace",
    "PermissionDeniedError",
    "Queue",
    "QueueStats",
    "delete_link",
    "find_link",
    "list_tun_links",
    "tun_features",
    "validate_name",
]
