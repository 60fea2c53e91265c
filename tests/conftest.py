"""Every kernel test runs inside network namespaces it owns; nothing touches the machine's own.

The autouse `netns` fixture creates a fresh named namespace, moves the test's thread into it
for the duration of the test and removes it afterwards, even when the test fails. Tests that
need more hosts ask `make_netns` for more. A session check (which also needs root) makes sure
no link appeared in the machine's own namespace.

Sans-IO tests (packet codecs, steering models, the assemblers) need neither root nor a
namespace: everything under tests/packet/, and tests marked `sans_io` (a module sets
``pytestmark = pytest.mark.sans_io``), run as any user.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator

import pytest
from hypothesis import HealthCheck, settings
from pyroute2 import IPRoute

from mqtun.netns import NetNamespace

# Property tests: a short run in the suite; `HYPOTHESIS_PROFILE=fuzz` (bench/fuzz.sh) runs
# 100,000 examples per property. Tests leave max_examples to the profile.
_COMMON = {"deadline": None, "database": None,
           "suppress_health_check": [HealthCheck.function_scoped_fixture, HealthCheck.too_slow]}
settings.register_profile("ci", max_examples=200, **_COMMON)
settings.register_profile("fuzz", max_examples=100_000, **_COMMON)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


_SANS_IO_DIRS = ("packet",)  # directories under tests/ whose tests are all sans-IO


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "sans_io: a pure test: no root, no network namespace, no device")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    here = os.path.dirname(__file__)
    for item in items:
        rel = os.path.relpath(str(item.path), here)
        if rel.split(os.sep)[0] in _SANS_IO_DIRS:
            item.add_marker(pytest.mark.sans_io)


def _root_links() -> set[str]:
    with IPRoute() as ipr:
        return {link.get_attr("IFLA_IFNAME") for link in ipr.get_links()}


@pytest.fixture(scope="session")
def _guard_root_namespace() -> Iterator[None]:
    if os.geteuid() != 0:
        pytest.exit("mqtun's tests run against the real kernel and need root", returncode=1)
    before = _root_links()
    yield
    leaked = _root_links() - before
    assert not leaked, f"tests left links in the machine's namespace: {sorted(leaked)}"


@pytest.fixture
def make_netns(_guard_root_namespace: None) -> Iterator[Callable[[], NetNamespace]]:
    """A factory of extra namespaces, all removed when the test ends."""
    made: list[NetNamespace] = []

    def make() -> NetNamespace:
        ns = NetNamespace.create(prefix="mqt-")
        made.append(ns)
        # No IPv6 link-local autoconfiguration on new links: no router solicitations, DAD or
        # MLD reports mixed into the packets a test counts. Explicit IPv6 addresses still work.
        ns.run(["sysctl", "-qw", "net.ipv6.conf.default.addr_gen_mode=1"])
        return ns

    yield make
    for ns in reversed(made):
        ns.delete()


@pytest.fixture(autouse=True)
def netns(request: pytest.FixtureRequest) -> Iterator[NetNamespace | None]:
    """The namespace the test body runs in (None for a sans-IO test, which needs none)."""
    if request.node.get_closest_marker("sans_io") is not None:
        yield None
        return
    make: Callable[[], NetNamespace] = request.getfixturevalue("make_netns")
    ns = make()
    with ns.enter():
        yield ns
