"""Importing mqtun starts no thread: a worker forked from the application is a fork of one thread.

numpy starts its BLAS thread pool when it is imported, so mqtun imports it only where the
vectorized sums first need it (packet.checksum.numpy()). Each check runs in a fresh interpreter.
"""

from __future__ import annotations

import json
import subprocess
import sys

_IMPORT_ALL = """
import importlib, json, os, pkgutil, sys
import mqtun
names = [m.name for m in pkgutil.walk_packages(mqtun.__path__, "mqtun.")
         if m.name != "mqtun.__main__"]
for name in names:
    importlib.import_module(name)
report = {"modules": len(names), "threads": len(os.listdir("/proc/self/task")),
          "numpy": "numpy" in sys.modules}
c = importlib.import_module("mqtun.packet.checksum")
sums = c.piece_sums(bytes(range(256)) * 64, 1024, 16)
report["numpy_after_sum"] = "numpy" in sys.modules
report["vectorized"] = sums is not None
print(json.dumps(report))
"""


def _run(code: str) -> dict[str, object]:
    # the child inherits PYTHONPATH: it imports the same source as the test run
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=60, check=True)  # fmt: skip
    result: dict[str, object] = json.loads(out.stdout.strip().splitlines()[-1])
    return result


def test_importing_every_module_starts_no_thread() -> None:
    r = _run(_IMPORT_ALL)
    assert int(r["modules"]) > 20  # type: ignore[call-overload]
    assert r["threads"] == 1, r
    assert r["numpy"] is False, "numpy was imported by `import mqtun`"


def test_numpy_is_imported_where_the_sums_need_it() -> None:
    r = _run(_IMPORT_ALL)
    try:
        import numpy  # noqa: F401
    except ImportError:
        assert r["vectorized"] is False
    else:
        assert r["numpy_after_sum"] is True and r["vectorized"] is True, r
