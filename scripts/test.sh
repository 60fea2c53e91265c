#!/usr/bin/env bash
# The test suite: lint and types (mypy --strict), the docs site (warnings are errors: a wrong name fails), every test
# against the real kernel (root, namespaces), then the package as users get it (sdist,
# wheel, twine, a fresh venv).
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m ruff check src tests bench
python3 -m mypy --strict src/mqtun
site=$(mktemp -d)
python3 -m mkdocs build --strict --quiet --site-dir "$site"
rm -rf "$site"
if [ "$#" -gt 0 ]; then
    python3 -m pytest -q "$@"
else
    # The sans-IO tests (marked sans_io: no device, no namespace, most of them property tests)
    # on up to 4 cores at once; then the kernel tests one at a time, as their namespaces and
    # timings need.
    cores=$(nproc)
    python3 -m pytest -q -m sans_io -n "$(( cores < 4 ? cores : 4 ))"
    python3 -m pytest -q -m "not sans_io"
fi
bash scripts/check-dist.sh
