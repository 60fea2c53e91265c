"""The optional C loop of the offload codecs (`mqtun.packet._accel`, built with the package
when a C compiler is there).

`packet.gso` cuts a TCP super-packet's full-size segments with it, and
`packet.checksum.completed` finishes a NEEDS_CSUM packet's checksum in a copy, when it is built
and `ACCELERATE` is on; otherwise with numpy, or the pure-Python code. All three give the same
bytes (the tests hold each to an independent oracle). `MQTUN_NO_ACCEL=1` in the environment
turns it off, e.g. to measure what it buys.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

__all__ = ["ACCELERATE", "available", "completed", "tcp_rows"]

try:
    from mqtun.packet import _accel
except ImportError:  # built without a C compiler: the numpy and Python paths remain
    _accel = None  # type: ignore[assignment]

ACCELERATE: bool = os.environ.get("MQTUN_NO_ACCEL", "") in ("", "0")


def available() -> bool:
    """Whether the C loop was built (whatever ACCELERATE says)."""
    return _accel is not None


def tcp_rows() -> Callable[..., Any] | None:
    """`_accel.tcp_rows` when it is built and ACCELERATE is on, else None."""
    return _accel.tcp_rows if ACCELERATE and _accel is not None else None


def completed() -> Callable[[Any, int, int], bytes] | None:
    """`_accel.completed` when it is built and ACCELERATE is on, else None."""
    return _accel.completed if ACCELERATE and _accel is not None else None
