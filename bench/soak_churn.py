"""The long churn: queues detached and re-attached every 50 ms for 60 s under traffic.

    sudo python3 bench/soak_churn.py              # 60 s
    sudo python3 bench/soak_churn.py --seconds 300

It runs tests/test_reliability.py::test_churn_keeps_fds_memory_indices_and_traffic with
MQTUN_CHURN_SECONDS set, so the soak checks exactly what the 5 s CI variant checks: no fd
leak (/proc/self/fd before and after), parent RSS growth under 8 MiB and workers' under
4 MiB, parent RSS flat within 2 MiB after a 10 s warm-up, every queue index equal to the
kernel's (a fixed-queue steering program, once a second), answers in every second. Root is
needed because the test fixtures give it its own network namespace. Not part of the suite.
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
    ap.add_argument("--seconds", type=float, default=60.0, help="how long to churn")
    args = ap.parse_args(argv)
    env = dict(os.environ, MQTUN_CHURN_SECONDS=str(args.seconds))
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT / "src"), env.get("PYTHONPATH")]))
    test = "tests/test_reliability.py::test_churn_keeps_fds_memory_indices_and_traffic"
    cmd = [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "--timeout", "0", "-s",
           "-q", str(ROOT / test)]
    return subprocess.call(cmd, cwd=ROOT, env=env)


if __name__ == "__main__":
    sys.exit(main())
