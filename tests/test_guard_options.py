"""--stun-rate-per-source, --stun-rate-total and --fastpath-guard (issue 12, docs/security.md)."""

from __future__ import annotations

import pytest

from tests.test_cli import GOOD, run_cli
from xdpturn.config import load_serve_config
from xdpturn.fastpath import GuardConfig


@pytest.mark.parametrize(
    ("flag", "value", "problem"),
    [
        ("--stun-rate-per-source", "-1", "expected a rate per second >= 0"),
        ("--stun-rate-total", "lots", "expected a rate per second >= 0"),
        ("--fastpath-guard", "maybe", "expected one of on, off"),
    ],
)
def test_a_bad_value_names_the_option(
    flag: str, value: str, problem: str, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, err = run_cli(["serve", *GOOD, flag, value], capsys)
    assert code == 2 and out == ""
    assert err.startswith(f"xdpturn serve: {flag}: {problem}")


def test_defaults_and_values_reach_the_fast_path_config() -> None:
    base = {"auth_secret": ["s"], "public_ipv4": "192.0.2.1"}
    assert load_serve_config(base).fastpath_settings.guard == GuardConfig()
    config = load_serve_config(
        {**base, "stun_rate_per_source": "0", "fastpath_guard": "off"},
        {"XDPTURN_STUN_RATE_TOTAL": "123"},
    )
    assert config.guard == GuardConfig(enabled=False, stun_rate_per_source=0, stun_rate_total=123)
    assert config.fastpath_settings.guard == config.guard
