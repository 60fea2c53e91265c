"""Every ```python block of docs/dataplane.md runs as a reader would run it (root, a fresh
namespace made by `ip netns add`) and prints what the ```text block under it shows (`...`
standing for anything)."""

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

DOC = pathlib.Path(__file__).resolve().parent.parent / "docs" / "dataplane.md"
EXAMPLE = re.compile(r"^```python\n(.*?)^```\n(?:\n*^```text\n(.*?)^```$)?", re.S | re.M)
EXAMPLES = [(m[1], m[2]) for m in EXAMPLE.finditer(DOC.read_text())]


def _env() -> dict[str, str]:
    src = str(pathlib.Path(mqtun.__file__).resolve().parents[1])
    path = os.environ.get("PYTHONPATH", "")
    return {**os.environ, "PYTHONPATH": f"{src}:{path}" if path else src}


def test_every_example_shows_its_output() -> None:
    assert len(EXAMPLES) >= 5
    assert len(EXAMPLES) == DOC.read_text().count("```python")
    assert all(want for _, want in EXAMPLES)


@pytest.mark.parametrize(("code", "want"), EXAMPLES,
                         ids=[f"block{i}" for i in range(len(EXAMPLES))])
def test_example_prints_what_the_doc_shows(code: str, want: str) -> None:
    name = f"mqt-dpdoc-{uuid.uuid4().hex[:8]}"
    subprocess.run(["ip", "netns", "add", name], check=True, timeout=10)
    try:
        out = subprocess.run(["ip", "netns", "exec", name, sys.executable, "-c", code],
                             capture_output=True, text=True, timeout=60, env=_env())
    finally:
        subprocess.run(["ip", "netns", "del", name], check=False, timeout=10)
    assert out.returncode == 0, out.stderr[-2000:]
    checker = doctest.OutputChecker()
    assert checker.check_output(want, out.stdout, doctest.ELLIPSIS), (
        f"want:\n{want}\ngot:\n{out.stdout}\nstderr:\n{out.stderr[-1000:]}")
