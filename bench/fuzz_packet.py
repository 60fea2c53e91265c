"""The long run of the codec properties: 100,000 hypothesis examples each instead of 200.

    sudo python3 bench/fuzz_packet.py            # the fuzz properties of every codec
    sudo python3 bench/fuzz_packet.py --all      # every property in tests/packet
    sudo python3 bench/fuzz_packet.py -- -x -q   # extra pytest arguments after --

The fuzz properties cover every codec a packet from the kernel meets: the virtio-net header
(decode and split of any bytes read from a vnet queue), GSO split, GRO coalesce, the header
parser and the steering models (tests/test_steer_model.py).
It runs the same test files as the suite with HYPOTHESIS_PROFILE=fuzz (registered in
tests/conftest.py), so a failure found here is a failing test there, shrunk by hypothesis.
Root is needed only because the suite's fixtures give every test a network namespace.
Not a test: the suite never runs it.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--all", action="store_true", help="every property, not only the fuzzers")
    ap.add_argument("pytest_args", nargs="*", help="passed on to pytest (after --)")
    args = ap.parse_args(argv)
    env = dict(os.environ, HYPOTHESIS_PROFILE="fuzz")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT / "src"), env.get("PYTHONPATH")]))
    cmd = [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "--timeout", "0",
           "--hypothesis-show-statistics", str(ROOT / "tests" / "packet"),
           str(ROOT / "tests" / "test_steer_model.py")]  # fmt: skip
    if not args.all:
        cmd += ["-k", "fuzz or random_bytes"]
    cmd += args.pytest_args
    return subprocess.call(cmd, cwd=ROOT, env=env)


if __name__ == "__main__":
    sys.exit(main())
