"""Handlers for `mqtun forward --handler MODULE:NAME`, and how a name becomes one.

A handler is any importable callable: for `--handler` it gets one wire packet (an IP packet
on a TUN, an Ethernet frame on a TAP: no header, checksums complete, within the MTU) and
returns what to write to the other device (a packet, an iterable of packets, or None to drop);
with `--handler-batch` it gets the list of packets one drain held and returns an iterable.
The two here pass everything through unchanged: they measure what the handler path costs
(`mqtun bench` configurations mqtun-1q-handler and mqtun-1q-batch) and are the smallest
working examples of each form.

    mqtun forward --handler mqtun.apps.handlers:identity tun-a tun-b
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Sequence
from typing import Any

from mqtun.errors import InvalidArgumentError

__all__ = ["identity", "identity_batch", "resolve_handler"]


def identity(packet: memoryview) -> memoryview:
    """Every packet through unchanged."""
    return packet


def identity_batch(packets: Sequence[memoryview]) -> Sequence[memoryview]:
    """Every drained batch through unchanged."""
    return packets


def resolve_handler(spec: str) -> Callable[..., Any]:
    """`MODULE:NAME` -> the callable NAME of MODULE (NAME may be dotted: `mod:Class.method`).

    Raises InvalidArgumentError with what is wrong and what to write instead."""
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise InvalidArgumentError(f"handler {spec!r}: write MODULE:NAME, e.g. "
                                   "mqtun.apps.handlers:identity")
    try:
        obj: Any = importlib.import_module(module_name)
    except ImportError as exc:
        raise InvalidArgumentError(f"handler {spec!r}: cannot import {module_name!r} ({exc}); "
                                   "is it on PYTHONPATH?") from None
    for part in attr.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise InvalidArgumentError(f"handler {spec!r}: {module_name!r} has no {attr!r}"
                                       ) from None
    if not callable(obj):
        raise InvalidArgumentError(f"handler {spec!r}: {attr!r} is a "
                                   f"{type(obj).__name__}, not a function")
    return obj  # type: ignore[no-any-return]
