"""The bench tests need the compiled tool; building it is quick and idempotent."""

from __future__ import annotations

from pathlib import Path

import pytest

from xdpturn_lab.bench import tools


@pytest.fixture(scope="session")
def blast() -> Path:
    return tools.build()
