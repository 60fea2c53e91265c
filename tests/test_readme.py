"""Every ```python block of the README and of the docs/ pages runs as a reader would run
it and prints what the page shows.

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

ROOT = pathlib.Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
# Pages written by other work of this round, whose examples may need peers (wireguard-go, a
# kernel VXLAN) set up around them: not run here until they run alone in a plain namespace.
NOT_RUN = {"tunnels.md", "wireguard.md"}
PAGES = [README, *sorted(p for p in (ROOT / "docs").glob("*.md") if p.name not in NOT_RUN)]
# a python block, then (after blank lines only) the text block showing its output, if any
EXAMPLE = re.compile(r"^```python\n(.*?)^```\n(?:\n*^```text\n(.*?)^```$)?", re.S | re.M)


def _examples(page: pathlib.Path) -> list[tuple[str, str | None]]:
    return [(m[1], m[2]) for m in EXAMPLE.finditer(page.read_text())]


EXAMPLES = [(page.relative_to(ROOT), i, code, want) for page in PAGES
            for i, (code, want) in enumerate(_examples(page))]


def _env() -> dict[str, str]:
    """The environment that makes a child import this very mqtun."""
    src = str(pathlib.Path(mqtun.__file__).resolve().parents[1])
    path = os.environ.get("PYTHONPATH", "")
    return {**os.environ, "PYTHONPATH": f"{src}:{path}" if path else src}


def test_pages_have_examples() -> None:
    readme = _examples(README)
    assert len(readme) >= 5 and sum(1 for _, want in readme if want) >= 4
    assert len(EXAMPLES) >= 12
    for page in PAGES:
        assert len(_examples(page)) == page.read_text().count("```python"), page


def test_output_blocks_are_compared() -> None:
    """The comparison can fail: a wrong line, a missing line, an extra line."""
    checker = doctest.OutputChecker()
    assert checker.check_output("a ...\nb\n", "a 1 2\nb\n", doctest.ELLIPSIS)
    for got in ("a 1\nc\n", "a 1\n", "a 1\nb\nc\n"):
        assert not checker.check_output("a ...\nb\n", got, doctest.ELLIPSIS)


@pytest.mark.parametrize(("page", "index", "code", "want"), EXAMPLES,
                         ids=[f"{page}:{i}" for page, i, _, _ in EXAMPLES])
def test_example_prints_what_the_page_shows(page: pathlib.Path, index: int, code: str,
                                            want: str | None) -> None:
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
        f"{page} shows:\n{want}\nits example {index} printed:\n{out.stdout}")
