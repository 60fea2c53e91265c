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
python3 -m pytest -q "$@"
bash scripts/check-dist.sh
