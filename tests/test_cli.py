"""The `xdpturn` command line: option errors, environment variables, credentials, serve."""

from __future__ import annotations

import ipaddress
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.support import BOUNDED, Serve, binding
from xdpturn.cli import main
from xdpturn.config import SERVE_OPTIONS, load_serve_config
from xdpturn.fastpath import FastPathMode
from xdpturn.proto.addr import TransportAddr
from xdpturn.proto.auth import Authenticator
from xdpturn.proto.ports import PortRange

GOOD = ["--listen", "127.0.0.1:0", "--auth-secret", "s3cret"]


def run_cli(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    try:
        code = main(args)
    except SystemExit as e:  # argparse's own usage errors
        code = int(e.code or 0)
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize(
    ("flag", "value", "problem"),
    [
        ("--ports", "9-1", "expected LOW-HIGH with 1 <= LOW <= HIGH <= 65535, got '9-1'"),
        ("--ports", "1-70000", "expected LOW-HIGH"),
        ("--listen", "localhost", "expected ADDRESS:PORT"),
        ("--public-ipv4", "::1", "expected an IPv4 address"),
        ("--public-ipv6", "10.0.0.1", "expected an IPv6 address"),
        ("--public-ipv4", "0.0.0.0", "clients cannot reach"),
        ("--user", "alice", "expected NAME:PASSWORD"),
        ("--allow-peer", "10.0.0.1/8", "expected a network such as 10.0.0.0/8"),
        ("--deny-peer", "192.0.2.0/33", "expected a network such as 10.0.0.0/8"),
        ("--unauthenticated-rate", "-1", "expected a rate per second >= 0"),
        ("--max-allocations", "0", "expected a whole number >= 1"),
        ("--max-allocations-per-user", "many", "expected a whole number >= 1"),
        ("--max-allocations-per-ip", "-1", "expected a whole number >= 1"),
        ("--log-format", "xml", "expected one of json, text"),
        ("--log-level", "loud", "expected one of DEBUG"),
        ("--fastpath", "turbo", "expected one of auto, xdp, generic, off"),
        ("--interface", "a/b", "expected a network interface name"),
        ("--auth-secret-file", "/nonexistent/secret", "cannot read"),
        ("--realm", "", "must not be empty"),
    ],
)
def test_a_bad_value_names_the_option_and_exits_2(
    flag: str, value: str, problem: str, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, err = run_cli(["serve", *GOOD, flag, value], capsys)
    assert code == 2 and out == ""
    assert err.startswith(f"xdpturn serve: {flag}: {problem}")
    assert err.count("\n") == 1 and "Traceback" not in err


@pytest.mark.parametrize(
    ("args", "flag"),
    [
        (["--auth-secret", "s"], "--public-ipv4"),  # wildcard listeners, no public address
        (["--listen", "127.0.0.1:0"], "--auth-secret"),  # no credentials at all
        ([*GOOD, "--fastpath", "xdp"], "--interface"),
        ([*GOOD, "--listen", "127.0.0.1:3478", "--listen", "127.0.0.1:3478"], "--listen"),
    ],
)
def test_inconsistent_options_name_an_option_and_exit_2(
    args: list[str], flag: str, capsys: pytest.CaptureFixture[str]
) -> None:
    code, _, err = run_cli(["serve", *args], capsys)
    assert code == 2 and err.startswith(f"xdpturn serve: {flag}: ")


def test_a_bad_environment_value_names_option_and_variable(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("XDPTURN_PORTS", "9-1")
    code, _, err = run_cli(["serve", *GOOD], capsys)
    assert code == 2
    assert err.startswith("xdpturn serve: --ports (from XDPTURN_PORTS): expected LOW-HIGH")


def test_environment_variables_configure_serve_and_the_command_line_wins(
    tmp_path: Path,
) -> None:
    secrets = tmp_path / "secrets"
    secrets.write_text("# rotated monthly\nfile-one\n\nfile-two\n")
    env = {
        "XDPTURN_LISTEN": "127.0.0.1:3478, [::1]:3478",
        "XDPTURN_PORTS": "40000-40099",
        "XDPTURN_AUTH_SECRET": "a,b",
        "XDPTURN_AUTH_SECRET_FILE": str(secrets),
        "XDPTURN_USER": "alice:pw:with:colons",
        "XDPTURN_ALLOW_PEER": "10.0.0.0/8,fd00::/8",
        "XDPTURN_DENY_PEER": "10.9.0.0/16",
        "XDPTURN_UNAUTHENTICATED_RATE": "5",
        "XDPTURN_MAX_ALLOCATIONS": "7",
        "XDPTURN_MAX_BPS_PER_ALLOCATION": "2M",
        "XDPTURN_MAX_BPS": "1g",
        "XDPTURN_FASTPATH": "generic",
        "XDPTURN_INTERFACE": "eth0,eth1",
        "XDPTURN_REALM": "env.example",
    }
    config = load_serve_config({"realm": "cli.example"}, env)
    assert [str(a) for a in config.listen] == ["127.0.0.1:3478", "[::1]:3478"]
    assert config.ports == PortRange(40000, 40099)
    assert config.auth_secrets == ["a", "b", "file-one", "file-two"]
    assert config.users == {"alice": "pw:with:colons"}
    assert [str(n) for n in config.allow_peers] == ["10.0.0.0/8", "fd00::/8"]
    assert [str(n) for n in config.deny_peers] == ["10.9.0.0/16"]
    assert config.max_allocations == 7 and config.max_allocations_per_ip is None
    assert (config.max_bps_per_allocation, config.max_bps) == (2_000_000, 10**9)
    assert config.server.max_bps == 10**9 // config.workers  # each worker's share of the cap
    assert config.fastpath_settings.allocation_rate_bps == 2_000_000  # the kernel's limit too
    assert config.fastpath is FastPathMode.GENERIC and config.interfaces == ["eth0", "eth1"]
    assert config.realm == "cli.example"
    server = config.server  # public addresses derived from the specific listeners
    assert [str(n) for n in server.deny_peers] == ["10.9.0.0/16"]
    assert (server.unauthenticated_rate, server.unauthenticated_burst) == (5.0, 10)
    assert server.public_ipv4 == ipaddress.IPv4Address("127.0.0.1")
    assert server.public_ipv6 == ipaddress.IPv6Address("::1")


def test_defaults_listen_on_both_wildcards_and_need_a_public_address() -> None:
    config = load_serve_config({"auth_secret": ["s"], "public_ipv4": "192.0.2.1"})
    assert [str(a) for a in config.listen] == ["0.0.0.0:3478", "[::]:3478"]
    assert config.ports == PortRange(49152, 65535) and config.fastpath is FastPathMode.OFF
    server = config.server
    assert str(server.public_ipv4) == "192.0.2.1" and server.public_ipv6 is None


def test_help_documents_every_option_with_its_variable(
    capsys: pytest.CaptureFixture[str],
) -> None:
    code, out, _ = run_cli(["serve", "--help"], capsys)
    assert code == 0
    flat = " ".join(out.split())
    for option in SERVE_OPTIONS:
        assert option.flag in flat and option.env in flat


@pytest.mark.parametrize("as_json", [False, True])
def test_credentials_are_accepted_by_the_authenticator(
    as_json: bool, capsys: pytest.CaptureFixture[str]
) -> None:
    args = ["credentials", "--secret", "s3cret", "--ttl", "60", "--user", "bob"]
    code, out, _ = run_cli([*args, "--json"] if as_json else args, capsys)
    assert code == 0
    lines = [line.split(": ", 1) for line in out.splitlines()]
    fields = json.loads(out) if as_json else {key: value for key, value in lines}
    username, password = fields["username"], fields["password"]
    assert username.endswith(":bob") and int(username.split(":")[0]) <= time.time() + 61
    assert Authenticator(secrets=["s3cret"]).passwords(username, time.time()) == [password]
    assert Authenticator(secrets=["other"]).passwords(username, time.time()) != [password]


def test_credentials_reject_a_bad_ttl(capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run_cli(["credentials", "--secret", "s", "--ttl", "soon"], capsys)
    assert code == 2 and err.startswith("xdpturn credentials: --ttl: ")


def test_probe_needs_credentials(capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run_cli(["probe", "127.0.0.1:3478", "--username", "u"], capsys)
    assert code == 2 and err.startswith("xdpturn probe: --username and --password")


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_serve_runs_until_a_signal_then_exits_0(sig: signal.Signals) -> None:
    serve = Serve(
        ["--listen", "127.0.0.1:0", "--log-format", "json"],
        env={"XDPTURN_AUTH_SECRET": "s3cret", "XDPTURN_PORTS": "20000-29999"},
    )
    try:
        started = serve.wait_for("listening")
        listen = started["listen"]
        assert isinstance(listen, list) and started["fastpath"] == "off"
        assert binding(TransportAddr.parse(listen[0]))
        serve.proc.send_signal(sig)
        assert serve.wait_for("stopped")["level"] == "INFO"
        assert serve.proc.wait(timeout=BOUNDED) == 0
    finally:
        if serve.proc.poll() is None:
            serve.proc.kill()
            serve.proc.wait()


def test_serve_reports_a_busy_address_without_a_traceback() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as squatter:
        squatter.bind(("127.0.0.1", 0))
        port = squatter.getsockname()[1]
        result = subprocess.run(
            [sys.executable, "-m", "xdpturn", "serve", "--listen", f"127.0.0.1:{port}"],
            env={**os.environ, "XDPTURN_AUTH_SECRET": "s"},
            capture_output=True,
            text=True,
            timeout=BOUNDED,
        )
    assert result.returncode == 1
    # The last line: a warning about the machine's open-file limit may come first.
    last = result.stderr.splitlines()[-1]
    assert last.startswith(f"xdpturn serve: --listen: cannot bind 127.0.0.1:{port}")
    assert "Traceback" not in result.stderr


def test_probe_through_a_served_relay(capsys: pytest.CaptureFixture[str]) -> None:
    serve = Serve(
        ["--listen", "127.0.0.1:0", "--auth-secret", "s3cret", "--ports", "20000-29999"],
        env={"XDPTURN_LOG_FORMAT": "json"},
    )
    try:
        listen = serve.wait_for("listening")["listen"]
        assert isinstance(listen, list)
        server = str(listen[0])
        code, out, _ = run_cli(["probe", server, "--secret", "s3cret", "--count", "5"], capsys)
        assert code == 0 and "result: OK" in out
        refused = ["probe", f"turn:{server}?transport=udp", "--username", "u", "--password", "p"]
        code, out, _ = run_cli(refused, capsys)
        assert code == 1 and "401" in out
    finally:
        serve.proc.terminate()
        serve.proc.wait(timeout=BOUNDED)
