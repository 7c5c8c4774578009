"""`xdpturn serve --config PATH`: TOML keys are the option names; command line > environment >
file > defaults; unknown keys and bad values are usage errors that name the key and the file."""

from __future__ import annotations

import ipaddress
import shutil
from pathlib import Path

import pytest

from xdpturn.cli import main
from xdpturn.config import SERVE_OPTIONS, ConfigError, load_serve_config
from xdpturn.config_file import read_config_file
from xdpturn.fastpath import FastPathMode
from xdpturn.proto.addr import TransportAddr
from xdpturn.proto.ports import PortRange

EXAMPLE = Path(__file__).parent.parent / "deploy" / "xdpturn.toml"


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "xdpturn.toml"
    path.write_text(text)
    return path


def serve_error(args: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    code = main(["serve", *args])
    out, err = capsys.readouterr()
    assert code == 2 and out == "" and err.count("\n") == 1 and "Traceback" not in err
    return err


def test_the_deployed_example_loads(tmp_path: Path) -> None:
    shutil.copy(EXAMPLE, tmp_path / "xdpturn.toml")
    (tmp_path / "secrets").write_text("# shared with the REST API service\nsecret-one\n")
    path = tmp_path / "xdpturn.toml"
    config = load_serve_config({}, {}, read_config_file(path), str(path))
    assert [str(a) for a in config.listen] == ["0.0.0.0:3478", "[::]:3478"]
    assert config.public_ipv4 == ipaddress.IPv4Address("192.0.2.10")
    assert config.auth_secrets == ["secret-one"]  # "secrets" is relative to the file
    assert config.fastpath is FastPathMode.AUTO and config.interfaces == ["eth0"]
    assert config.metrics == TransportAddr.parse("127.0.0.1:9478")
    assert config.alternate_server == TransportAddr.parse("192.0.2.11:3478")
    assert config.drain_timeout == 300 and config.max_allocations_per_user == 20


def test_every_option_name_is_a_key(tmp_path: Path) -> None:
    path = write(tmp_path, "".join(f"# {o.name}\n" for o in SERVE_OPTIONS))
    assert read_config_file(path) == {}
    for option in SERVE_OPTIONS:  # no option is refused as an unknown key
        value = '["x"]' if option.repeatable else '"x"'
        read_config_file(write(tmp_path, f"{option.name} = {value}\n"))


def test_command_line_beats_environment_beats_file_beats_defaults(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        'listen = ["127.0.0.1:3478"]\n'
        'auth_secret = ["from-file"]\n'
        'realm = "file.example"\n'
        'ports = "40000-40099"\n'
        "max_allocations = 7\n"
        "drain_timeout = 2.5\n",
    )
    file = read_config_file(path)
    env = {"XDPTURN_REALM": "env.example", "XDPTURN_PORTS": "41000-41099"}
    config = load_serve_config({"ports": "42000-42099"}, env, file, str(path))
    assert config.ports == PortRange(42000, 42099)  # command line
    assert config.realm == "env.example"  # environment over file
    assert config.max_allocations == 7 and config.drain_timeout == 2.5  # file
    assert config.auth_secrets == ["from-file"]
    assert config.log_level == "INFO" and config.metrics is None  # defaults


def test_config_path_can_come_from_the_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write(tmp_path, 'listen = ["127.0.0.1:0"]\nauth_secret = "s"\nports = "9-1"\n')
    monkeypatch.setenv("XDPTURN_CONFIG", str(path))
    err = serve_error([], capsys)
    assert err.startswith(f"xdpturn serve: ports (in {path}): expected LOW-HIGH")


def test_an_unknown_key_names_the_key_and_the_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write(tmp_path, 'auth_secret = "s"\nlisten-address = "127.0.0.1:3478"\n')
    err = serve_error(["--config", str(path)], capsys)
    assert err.startswith(f"xdpturn serve: --config: '{path}': unknown key 'listen-address'")
    assert "did you mean 'listen_address'" in err


@pytest.mark.parametrize(
    ("text", "where", "problem"),
    [
        ('ports = "9-1"', "ports", "expected LOW-HIGH"),
        ("max_allocations = 0", "max_allocations", "expected a whole number >= 1"),
        ('max_bps = "fast"', "max_bps", "expected bits per second >= 1"),
        ('max_bps_per_allocation = "0k"', "max_bps_per_allocation", "expected bits per second"),
        ('fastpath = "turbo"', "fastpath", "expected one of auto, xdp, generic, off"),
        ("drain_timeout = -1", "drain_timeout", "expected seconds > 0"),
        ('metrics = "localhost"', "metrics", "expected ADDRESS:PORT"),
        ("realm = true", "realm", "expected a string or a number, got bool"),
        ("realm = {name = 'x'}", "realm", "expected a string or a number, got dict"),
        ('realm = ["a", "b"]', "realm", "expected one value, not a list"),
    ],
)
def test_a_bad_value_names_the_key_and_the_file(
    tmp_path: Path, text: str, where: str, problem: str, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write(tmp_path, f'listen = ["127.0.0.1:0"]\nauth_secret = "s"\n{text}\n')
    err = serve_error(["--config", str(path)], capsys)
    assert err.startswith(f"xdpturn serve: {where} (in {path}): {problem}")


def test_unreadable_or_invalid_files_are_usage_errors(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    missing = tmp_path / "missing.toml"
    err = serve_error(["--config", str(missing)], capsys)
    assert err.startswith(f"xdpturn serve: --config: cannot read '{missing}'")
    broken = write(tmp_path, "listen = [\n")
    err = serve_error(["--config", str(broken)], capsys)
    assert err.startswith(f"xdpturn serve: --config: '{broken}' is not valid TOML")


def test_a_file_value_is_overridden_without_being_parsed(tmp_path: Path) -> None:
    """A key the command line sets is not read from the file: a stale value there is harmless."""
    path = write(tmp_path, 'listen = ["127.0.0.1:0"]\nauth_secret = "s"\nports = "9-1"\n')
    config = load_serve_config({"ports": "20000-20009"}, {}, read_config_file(path), str(path))
    assert config.ports == PortRange(20000, 20009)
    with pytest.raises(ConfigError) as raised:
        load_serve_config({}, {}, read_config_file(path), str(path))
    assert raised.value.option == f"ports (in {path})"
