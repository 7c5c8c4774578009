#!/usr/bin/env bash
# The whole test suite: set-up (idempotent), linters, type checks, then pytest.
# Kernel tests (BPF, XDP, namespaces) run when root; under CI=true a kernel test that cannot run
# fails instead of skipping (tests/conftest.py). Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
.venv/bin/ruff check src tests
.venv/bin/ruff format --check src tests
.venv/bin/mypy
exec .venv/bin/python -m pytest "$@"
