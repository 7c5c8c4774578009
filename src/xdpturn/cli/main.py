"""The `xdpturn` command: serve, credentials, probe; status and drain live in cli.ops."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import sys
import time
from collections.abc import Sequence

from xdpturn import __version__
from xdpturn.cli.args import UsageError, parse_arg, run_command
from xdpturn.cli.ops import add_drain_command, add_status_command
from xdpturn.client.probe import format_probe, probe
from xdpturn.config import (
    SERVE_OPTIONS,
    ConfigError,
    RawValue,
    load_serve_config,
    parse_nonempty,
    parse_positive,
)
from xdpturn.config_file import read_config_file
from xdpturn.log import setup_logging
from xdpturn.proto.addr import TransportAddr
from xdpturn.proto.auth import mint_rest_credentials, rest_password
from xdpturn.server.lifecycle import StartError, event_loop_factory, run
from xdpturn.server.sockets import raise_open_file_limit
from xdpturn.server.workers import run_workers

log = logging.getLogger("xdpturn.server")

# serve


def _add_serve(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "serve",
        help="run the TURN relay",
        description="Run the TURN relay until SIGINT (stop now; with --state-dir, stop for a "
        "restart) or SIGTERM (drain, then stop). Every option can also be set with the "
        "environment variable shown (repeatable options: comma-separated values) or as a key "
        "of the --config file; the command line wins, then the environment, then the file.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--config",
        metavar="PATH",
        default=os.environ.get("XDPTURN_CONFIG"),
        help='TOML file whose keys are the option names below, e.g. ports = "49152-65535" '
        "[env XDPTURN_CONFIG]",
    )
    for option in SERVE_OPTIONS:
        details = [f"env {option.env}"]
        if option.default_text:
            details.append(f"default {option.default_text}")
        p.add_argument(
            option.flag,
            dest=option.name,
            metavar=option.metavar,
            action="append" if option.repeatable else "store",
            default=None,
            help=f"{option.help} [{'; '.join(details)}]",
        )
    p.set_defaults(run=_serve)


def _serve(args: argparse.Namespace) -> int:
    given: dict[str, RawValue] = {o.name: getattr(args, o.name) for o in SERVE_OPTIONS}
    try:
        file = read_config_file(args.config) if args.config else {}
        config = load_serve_config(given, os.environ, file, args.config or "")
    except ConfigError as e:
        raise UsageError("serve", str(e)) from None

    setup_logging(config.log_format, config.log_level)
    files, need = raise_open_file_limit(len(config.ports))
    if files < need:
        # Past it, Allocates get 508 "Relay out of resources" while ports are still free.
        log.warning(
            "the open-file limit is lower than the port range needs",
            extra={
                "open_files": files,
                "needed": need,
                "fix": "raise the hard limit (LimitNOFILE= in the systemd unit, ulimit -Hn) "
                "or run as root",
            },
        )
    try:
        return run_workers(config) if config.workers > 1 else run(config)
    except StartError as e:
        print(f"xdpturn serve: {e}", file=sys.stderr)
        return 1


# credentials


def _add_credentials(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "credentials",
        help="mint TURN REST API credentials",
        description="Print a TURN REST API username and password minted with a shared secret "
        "(the relay must know the secret: --auth-secret).",
    )
    p.add_argument("--secret", required=True, help="the shared secret")
    p.add_argument("--ttl", default="86400", metavar="SECONDS", help="validity (default 86400)")
    p.add_argument("--user", default="xdpturn", metavar="ID", help="user id (default xdpturn)")
    p.add_argument("--json", action="store_true", help="print a JSON object")
    p.set_defaults(run=_credentials)


def _credentials(args: argparse.Namespace) -> int:
    secret = parse_arg("credentials", "--secret", parse_nonempty, args.secret)
    ttl = parse_arg("credentials", "--ttl", parse_positive, args.ttl)
    user = parse_arg("credentials", "--user", parse_nonempty, args.user)
    now = time.time()
    creds = mint_rest_credentials(secret, now=now, ttl=ttl, user_id=user)
    if args.json:
        out = {"username": creds.username, "password": creds.password, "ttl": ttl}
        print(json.dumps(out))
    else:
        print(f"username: {creds.username}")
        print(f"password: {creds.password}")
    return 0


# probe


def parse_server(text: str) -> TransportAddr:
    """`HOST:PORT`, `[V6]:PORT`, a bare address (port 3478) or a `turn:` URI."""
    rest = text.removeprefix("turn:").partition("?")[0]
    try:
        return TransportAddr.parse(rest)
    except ValueError:
        pass
    try:
        return TransportAddr.parse(f"[{rest.strip('[]')}]:3478" if ":" in rest else f"{rest}:3478")
    except ValueError:
        raise ValueError(f"expected ADDRESS[:PORT] or turn:ADDRESS[:PORT], got {text!r}") from None


def _add_probe(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "probe",
        help="check a TURN relay end to end",
        description="Allocate on SERVER, relay datagrams through it and report loss and "
        "round-trip times. Exits non-zero on any loss or failure.",
    )
    p.add_argument("server", metavar="SERVER", help="ADDRESS[:PORT] or turn:ADDRESS[:PORT]")
    p.add_argument("--username", help="TURN username (not needed with --secret)")
    p.add_argument("--password", help="TURN password (not needed with --secret)")
    p.add_argument("--secret", help="mint REST API credentials with this shared secret")
    p.add_argument("--count", default="10", metavar="N", help="datagrams to send (default 10)")
    p.set_defaults(run=_probe)


def _probe(args: argparse.Namespace) -> int:
    server = parse_arg("probe", "SERVER", parse_server, args.server)
    count = parse_arg("probe", "--count", parse_positive, args.count)
    username, password = args.username, args.password
    if args.secret is not None:
        secret = parse_arg("probe", "--secret", parse_nonempty, args.secret)
        if username is None:
            creds = mint_rest_credentials(secret, now=time.time(), ttl=3600)
            username, password = creds.username, creds.password
        elif password is None:
            password = rest_password(secret, username)
    if username is None or password is None:
        raise UsageError("probe", "--username and --password are needed (or --secret)")
    with asyncio.Runner(loop_factory=event_loop_factory()) as runner:
        result = runner.run(probe(server, username, password, count=count))
    print(format_probe(result))
    return 0 if result.ok else 1


# main


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="xdpturn", description="TURN relay (RFC 8656).")
    parser.add_argument("--version", action="version", version=f"xdpturn {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    _add_serve(sub)
    _add_credentials(sub)
    _add_probe(sub)
    add_status_command(sub)
    add_drain_command(sub)
    from xdpturn.server.restart import add_detach_command

    add_detach_command(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    return run_command(build_parser(), argv)
