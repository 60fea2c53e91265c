"""The checksum, split and coalesce tests run three times (their modules ask for `both_sums`):
with the C loop (mqtun.packet._accel, when built) and numpy, with numpy alone, and with the
pure-Python code, so that every path meets the same oracle."""

from __future__ import annotations

import importlib
from collections.abc import Iterator
from typing import Any

import pytest

from mqtun.packet import accel

# mqtun.packet's own `checksum` attribute is the function, not the module
checksum: Any = importlib.import_module("mqtun.packet.checksum")


@pytest.fixture(params=["c", "numpy", "python"])
def both_sums(request: pytest.FixtureRequest) -> Iterator[str]:
    if request.param == "c" and not accel.available():
        pytest.skip("mqtun.packet._accel is not built here (no C compiler at install)")
    if request.param != "python" and checksum.numpy() is None:
        pytest.skip("numpy cannot be imported here")
    saved = checksum.VECTORIZE, accel.ACCELERATE
    checksum.VECTORIZE = request.param != "python"
    accel.ACCELERATE = request.param == "c"
    try:
        yield request.param
    finally:
        checksum.VECTORIZE, accel.ACCELERATE = saved


# The packet tests are sans-IO: no device, no namespace, no root. These two override the
# suite-wide autouse fixtures of tests/conftest.py (the root check and the per-test network
# namespace) for this directory, so `pytest tests/packet` runs as any user.
@pytest.fixture(scope="session")
def _guard_root_namespace() -> None:
    return None


@pytest.fixture
def netns() -> None:
    return None
