#!/usr/bin/env bash
# The package as a user gets it: build the sdist and the wheel (the wheel from the sdist),
# check both with `twine check --strict`, install the wheel into a fresh virtualenv and use it
# there (every module imports, the console script runs). Nothing is left behind.
set -euo pipefail
cd "$(dirname "$0")/.."
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
unset PYTHONPATH  # the virtualenv must use what it installed, not this tree
export PIP_DISABLE_PIP_VERSION_CHECK=1

quiet() {  # run a command; show its output only if it fails
    if ! "$@" >"$work/log" 2>&1; then
        cat "$work/log"
        echo "check-dist: failed: $*" >&2
        exit 1
    fi
}

quiet python3 -m build --outdir "$work/dist" .
# twine in a virtualenv of its own: its docutils conflicts with some system packages (awscli)
quiet python3 -m venv "$work/tools"
quiet "$work/tools/bin/pip" install 'twine>=6.1'
"$work/tools/bin/twine" check --strict "$work"/dist/*

quiet python3 -m venv "$work/venv"
quiet "$work/venv/bin/pip" install "$work"/dist/mqtun-*.whl
(cd "$work" && "$work/venv/bin/python" - <<'PY'
import importlib
import pathlib
import pkgutil

import mqtun

here = pathlib.Path(mqtun.__file__).parent
assert "venv" in here.parts, f"imported the wrong mqtun: {here}"
assert (here / "py.typed").exists(), "py.typed is missing from the wheel"
assert (here / "apps" / "c_forward.c").exists(), "the bench's C forwarder is missing"
from mqtun.packet import accel
assert accel.available(), "the wheel was built without mqtun.packet._accel (is cc there?)"
assert (here / "packet" / "_accel.pyi").exists(), "the C loop's type stub is missing"
from mqtun import _reads  # the drain's read loop and the compat face's C fd methods
from mqtun.compat import pytun
assert pytun._QueueFile is _reads.QueueFile, "the compat face fell back to Python methods"
assert (here / "_reads.pyi").exists(), "the read loop's type stub is missing"
for mod in pkgutil.walk_packages(mqtun.__path__, "mqtun."):
    if not mod.name.endswith("__main__"):
        importlib.import_module(mod.name)
print("check-dist: mqtun from the wheel: every module imports")
PY
)
"$work/venv/bin/mqtun" --version
"$work/venv/bin/mqtun" --help >/dev/null
sdist=$(tar -tzf "$work"/dist/mqtun-*.tar.gz)
for f in LICENSE README.md CHANGELOG.md pyproject.toml setup.py src/mqtun/py.typed src/mqtun/packet/_accel.c src/mqtun/_reads.c; do
    grep -qx "mqtun-[^/]*/$f" <<<"$sdist" || { echo "check-dist: $f is not in the sdist" >&2; exit 1; }
done
echo "check-dist: $(cd "$work/dist" && echo *) built, twine-clean, installed and run in a fresh venv"
