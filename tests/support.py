"""Helpers shared by tests."""

from __future__ import annotations

import os
from typing import NoReturn

import pytest

IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


def unavailable(reason: str) -> NoReturn:
    """Skip a test whose prerequisite is missing; under CI=true fail instead, because CI
    installs everything and a skip there would hide a broken set-up."""
    if IN_CI:
        pytest.fail(f"cannot run in CI: {reason}", pytrace=False)
    pytest.skip(reason)
