"""Every ```python block of the README runs as a reader would run it and prints what the
README shows.

Each block runs as root in a fresh namespace made by a plain `ip netns add` (no sysctl set,
loopback down: what the README tells a reader to do), and its stdout must match the ```text
block right under it, `...` standing for anything (doctest's ELLIPSIS); a block with no
```text block under it must print nothing.
"""

from __future__ import annotations

import doctest
import os
import pathlib
import re
import subprocess
import sys
import uuid

import pytest

import mqtun
from mqtun.netns import NetNamespace

README = pathlib.Path(__file__).resolve().parent.parent / "README.md"
# a python block, then (after blank lines only) the text block showing its output, if any
EXAMPLE = re.compile(r"^```python\n(.*?)^```\n(?:\n*^```text\n(.*?)^```$)?", re.S | re.M)
EXAMPLES = [(m[1], m[2]) for m in EXAMPLE.finditer(README.read_text())]


def _env() -> dict[str, str]:
    """The environment that makes a child import this very mqtun."""
    src = str(pathlib.Path(mqtun.__file__).resolve().parents[1])
    path = os.environ.get("PYTHONPATH", "")
    return {**os.environ, "PYTHONPATH": f"{src}:{path}" if path else src}


def test_readme_has_examples() -> None:
    assert len(EXAMPLES) >= 10
    assert len(EXAMPLES) == README.read_text().count("```python"), "an unmatched block"
    assert sum(1 for _, want in EXAMPLES if want) >= 8


def test_output_blocks_are_compared() -> None:
    """The comparison can fail: a wrong line, a missing line, an extra line."""
    checker = doctest.OutputChecker()
    assert checker.check_output("a ...\nb\n", "a 1 2\nb\n", doctest.ELLIPSIS)
    for got in ("a 1\nc\n", "a 1\n", "a 1\nb\nc\n"):
        assert not checker.check_output("a ...\nb\n", got, doctest.ELLIPSIS)


@pytest.mark.parametrize(("code", "want"), EXAMPLES,
                         ids=[f"block{i}" for i in range(len(EXAMPLES))])
def test_readme_example_prints_what_the_readme_shows(code: str, want: str | None) -> None:
    name = f"mqt-readme-{uuid.uuid4().hex[:8]}"
    subprocess.run(["ip", "netns", "add", name], check=True, timeout=10)
    try:
        out = subprocess.run(["ip", "netns", "exec", name, sys.executable, "-c", code],
                             capture_output=True, text=True, timeout=60, env=_env())
    finally:
        NetNamespace(name).delete()
    assert out.returncode == 0, f"{out.stdout}\n{out.stderr}"
    want = want or ""
    assert doctest.OutputChecker().check_output(want, out.stdout, doctest.ELLIPSIS), (
        f"the README shows:\n{want}\nthe example printed:\n{out.stdout}")
