"""The checksum, split and coalesce tests run twice (their modules ask for `both_sums`): with
the vectorized sums (numpy, when installed) and with the pure-Python ones, so that both paths
meet the same oracle."""

from __future__ import annotations

import importlib
from collections.abc import Iterator
from typing import Any

import pytest

# mqtun.packet's own `checksum` attribute is the function, not the module
checksum: Any = importlib.import_module("mqtun.packet.checksum")


@pytest.fixture(params=["numpy", "python"])
def both_sums(request: pytest.FixtureRequest) -> Iterator[str]:
    if request.param == "numpy" and checksum.numpy() is None:
        pytest.skip("numpy cannot be imported here")
    saved = checksum.VECTORIZE
    checksum.VECTORIZE = request.param == "numpy"
    try:
        yield request.param
    finally:
        checksum.VECTORIZE = saved


# The packet tests are sans-IO: no device, no namespace, no root. These two override the
# suite-wide autouse fixtures of tests/conftest.py (the root check and the per-test network
# namespace) for this directory, so `pytest tests/packet` runs as any user.
@pytest.fixture(scope="session")
def _guard_root_namespace() -> None:
    return None


@pytest.fixture
def netns() -> None:
    return None
