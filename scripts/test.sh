#!/usr/bin/env bash
# The whole test suite: linters, type checks, then pytest (kernel tests included when root).
# Under CI=true a kernel test that cannot run fails instead of skipping (tests/conftest.py).
set -euo pipefail
cd "$(dirname "$0")/.."
.venv/bin/ruff check src tests
.venv/bin/ruff format --check src tests
.venv/bin/mypy
exec .venv/bin/python -m pytest "$@"
