"""The documentation site builds with warnings as errors, and a wrong name in it fails the
build (so CI catches a page or an API reference that went stale)."""

from __future__ import annotations

import pathlib
import shutil
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent

pytest.importorskip("mkdocstrings", reason="the docs extra: pip install -e '.[docs]'")


def _build(root: pathlib.Path, site: pathlib.Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir",
                           str(site), "--config-file", str(root / "mkdocs.yml")],
                          capture_output=True, text=True, timeout=300, cwd=root)


def _copy(tmp: pathlib.Path) -> pathlib.Path:
    copy = tmp / "tree"
    copy.mkdir()
    for name in ("docs", "src"):
        shutil.copytree(ROOT / name, copy / name,
                        ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    for name in ("mkdocs.yml", "CHANGELOG.md"):
        shutil.copy(ROOT / name, copy / name)
    return copy


def test_the_site_builds_strictly(tmp_path: pathlib.Path) -> None:
    out = _build(ROOT, tmp_path / "site")
    assert out.returncode == 0, out.stderr
    api = (tmp_path / "site" / "reference" / "mqtun" / "index.html").read_text()
    assert 'id="mqtun.Device.create"' in api  # generated from the docstrings


@pytest.mark.parametrize("wrong", [
    "See [`Device.nosuch`][mqtun.Device.nosuch].",  # a cross-reference to a missing name
    "::: mqtun.NoSuchThing",                         # an API page for a missing object
    "See [the guide](nosuch.md).",                   # a link to a missing page
])
def test_a_wrong_name_fails_the_build(tmp_path: pathlib.Path, wrong: str) -> None:
    tree = _copy(tmp_path)
    page = tree / "docs" / "devices.md"
    page.write_text(page.read_text() + f"\n{wrong}\n")
    out = _build(tree, tmp_path / "site")
    assert out.returncode != 0, f"a wrong name did not fail the build: {wrong}"
