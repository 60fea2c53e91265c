#!/usr/bin/env bash
# The test suite: lint, then every test against the real kernel (root, namespaces).
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m ruff check src tests bench
python3 -m pytest -q "$@"
