"""The `serve` configuration: one table of options, parsed and checked in one place.

Each option has one name that is used three ways: `--ports` on the command line, `XDPTURN_PORTS`
in the environment (repeatable options comma-separated there), and `ports` as a key of a
configuration file. `load_serve_config` turns raw text values into a typed `ServeConfig`, or raises
`ConfigError` naming the option that is wrong.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, cast

from xdpturn.fastpath import FastPathConfig, FastPathMode
from xdpturn.log import LEVELS, LogFormat
from xdpturn.proto.addr import Family, IPAddress, TransportAddr
from xdpturn.proto.auth import Authenticator
from xdpturn.proto.server import ServerConfig
from xdpturn.tls import server_context

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
ENV_PREFIX = "XDPTURN_"
DEFAULT_TURN_PORT = 3478


class ConfigError(ValueError):
    """A bad option value. `str()` is `--option: what is wrong`."""

    def __init__(self, option: str, problem: str) -> None:
        super().__init__(f"{option}: {problem}")
        self.option = option
        self.problem = problem


@dataclass(frozen=True, slots=True)
class PortRange:
    low: int
    high: int

    def __post_init__(self) -> None:
        if not 1 <= self.low <= self.high <= 0xFFFF:
            raise ValueError(f"bad port range {self.low}-{self.high}")

    def __len__(self) -> int:
        return self.high - self.low + 1

    def __contains__(self, port: object) -> bool:
        return isinstance(port, int) and self.low <= port <= self.high

    def __str__(self) -> str:
        return f"{self.low}-{self.high}"


@dataclass
class ServeConfig:
    """Everything `xdpturn serve` needs. Defaults match the command line's."""

    listen: list[TransportAddr] = field(
        default_factory=lambda: [
            TransportAddr(ipaddress.IPv4Address("0.0.0.0"), DEFAULT_TURN_PORT),
            TransportAddr(ipaddress.IPv6Address("::"), DEFAULT_TURN_PORT),
        ]
    )
    public_ipv4: ipaddress.IPv4Address | None = None
    public_ipv6: ipaddress.IPv6Address | None = None
    ports: PortRange = field(default_factory=lambda: PortRange(49152, 65535))
    realm: str = "xdpturn"
    auth_secrets: list[str] = field(default_factory=list)
    users: dict[str, str] = field(default_factory=dict)
    allow_peers: list[IPNetwork] = field(default_factory=list)
    deny_peers: list[IPNetwork] = field(default_factory=list)
    # Answers per second to unauthenticated UDP requests, per client IP (0: no limit).
    unauthenticated_rate: float = 20.0
    max_allocations_per_user: int | None = None
    max_allocations_per_ip: int | None = None
    max_allocations: int | None = None
    log_format: LogFormat = "auto"
    log_level: str = "INFO"
    fastpath: FastPathMode = FastPathMode.OFF
    interfaces: list[str] = field(default_factory=list)
    listen_tcp: list[TransportAddr] = field(default_factory=list)  # TURN over TCP
    listen_tls: list[TransportAddr] = field(default_factory=list)  # TURN over TLS
    tls_cert: Path | None = None
    tls_key: Path | None = None
    # Bounds on TCP/TLS connections, so silent or stalled ones cannot hold sockets forever.
    max_stream_connections: int = 10000
    stream_idle_timeout: float = 30.0
    metrics: TransportAddr | None = None  # HTTP listener for /metrics, /status, /drain
    alternate_server: TransportAddr | None = None  # where Allocate is sent while draining
    drain_timeout: float = 300.0

    def relay_address(self, family: Family) -> IPAddress | None:
        """The address clients are told for relays of `family`: the --public-* option, else
        the first specific (not wildcard) --listen address of that family, else None."""
        given = self.public_ipv4 if family is Family.IPV4 else self.public_ipv6
        if given is not None:
            return given
        return next((a for a in self.listen_ips(family) if not a.is_unspecified), None)

    def relay_bind_address(self, family: Family) -> IPAddress:
        """Where allocation sockets bind: the first --listen address of the family (so a relay
        told to listen on loopback stays on loopback), else the wildcard."""
        ips = self.listen_ips(family)
        if ips:
            return ips[0]
        return ipaddress.IPv4Address(0) if family is Family.IPV4 else ipaddress.IPv6Address(0)

    def listen_ips(self, family: Family) -> list[IPAddress]:
        return [a.ip for a in self.listen if a.family is family]

    def check(self) -> None:
        """Raise ConfigError for combinations no single value shows to be wrong."""
        if not self.listen:
            raise ConfigError("--listen", "at least one address is needed")
        fixed = [a for a in self.listen if a.port != 0]  # port 0: the kernel picks, never equal
        if len(set(fixed)) != len(fixed):
            raise ConfigError("--listen", "the same address is given twice")
        if self.relay_address(Family.IPV4) is None and self.relay_address(Family.IPV6) is None:
            listening = ", ".join(str(a) for a in self.listen)
            raise ConfigError(
                "--public-ipv4",
                "needed (or --public-ipv6): the relay must tell clients its address, and the "
                f"--listen addresses ({listening}) are wildcards",
            )
        if not self.auth_secrets and not self.users:
            raise ConfigError(
                "--auth-secret", "no credentials: give --auth-secret, --auth-secret-file or --user"
            )
        if self.fastpath is not FastPathMode.OFF and not self.interfaces:
            raise ConfigError("--interface", f"needed with --fastpath {self.fastpath.value}")
        self._check_streams()

    def _check_streams(self) -> None:
        for flag, addrs in (("--listen-tcp", self.listen_tcp), ("--listen-tls", self.listen_tls)):
            fixed = [a for a in addrs if a.port != 0]
            if len(set(fixed)) != len(fixed):
                raise ConfigError(flag, "the same address is given twice")
        both = {a for a in self.listen_tcp if a.port} & {a for a in self.listen_tls if a.port}
        if both:
            raise ConfigError(
                "--listen-tls", f"{min(both, key=str)} is also a --listen-tcp address"
            )
        if not self.listen_tls:
            return
        if self.tls_cert is None:
            raise ConfigError("--tls-cert", "needed with --listen-tls")
        if self.tls_key is None:
            raise ConfigError("--tls-key", "needed with --listen-tls")
        try:
            server_context(self.tls_cert, self.tls_key)
        except (OSError, ValueError) as e:  # ssl.SSLError is an OSError
            raise ConfigError(
                "--tls-cert", f"cannot use {self.tls_cert} with key {self.tls_key}: {e}"
            ) from None

    def server_config(self) -> ServerConfig:
        v4 = self.relay_address(Family.IPV4)
        v6 = self.relay_address(Family.IPV6)
        return ServerConfig(
            realm=self.realm,
            public_ipv4=v4 if isinstance(v4, ipaddress.IPv4Address) else None,
            public_ipv6=v6 if isinstance(v6, ipaddress.IPv6Address) else None,
            auth=Authenticator(secrets=list(self.auth_secrets), users=dict(self.users)),
            allow_peers=list(self.allow_peers),
            deny_peers=list(self.deny_peers),
            unauthenticated_rate=self.unauthenticated_rate,
            # Two seconds' worth at once: room for a few clients behind one NAT starting together.
            unauthenticated_burst=max(1, int(2 * self.unauthenticated_rate)),
            max_allocations=self.max_allocations,
            max_allocations_per_user=self.max_allocations_per_user,
            max_allocations_per_ip=self.max_allocations_per_ip,
        )

    def fastpath_config(self, turn_port: int = DEFAULT_TURN_PORT) -> FastPathConfig:
        server = self.server_config()
        v4 = self.relay_bind_address(Family.IPV4)
        v6 = self.relay_bind_address(Family.IPV6)
        return FastPathConfig(
            mode=self.fastpath,
            interfaces=list(self.interfaces),
            turn_port=turn_port,
            public_ipv4=server.public_ipv4,
            public_ipv6=server.public_ipv6,
            local_ipv4=None if v4.is_unspecified else cast(ipaddress.IPv4Address, v4),
            local_ipv6=None if v6.is_unspecified else cast(ipaddress.IPv6Address, v6),
        )


# Value parsers: text in, typed value out, ValueError with the reason (ConfigError adds the name).


def parse_listen(text: str) -> TransportAddr:
    try:
        return TransportAddr.parse(text)
    except ValueError:
        raise ValueError(
            f"expected ADDRESS:PORT such as 0.0.0.0:3478 or [::]:3478, got {text!r}"
        ) from None


def parse_port_range(text: str) -> PortRange:
    low, sep, high = text.partition("-")
    if sep and low.strip().isdigit() and high.strip().isdigit():
        lo, hi = int(low), int(high)
        if 1 <= lo <= hi <= 0xFFFF:
            return PortRange(lo, hi)
    raise ValueError(f"expected LOW-HIGH with 1 <= LOW <= HIGH <= 65535, got {text!r}")


def parse_ipv4(text: str) -> ipaddress.IPv4Address:
    try:
        return ipaddress.IPv4Address(text)
    except ValueError:
        raise ValueError(f"expected an IPv4 address, got {text!r}") from None


def parse_ipv6(text: str) -> ipaddress.IPv6Address:
    try:
        return ipaddress.IPv6Address(text.removeprefix("[").removesuffix("]"))
    except ValueError:
        raise ValueError(f"expected an IPv6 address, got {text!r}") from None


def parse_public_ipv4(text: str) -> ipaddress.IPv4Address:
    ip = parse_ipv4(text)
    if ip.is_unspecified or ip.is_multicast:
        raise ValueError(f"clients cannot reach {text!r}; give the relay's own address")
    return ip


def parse_public_ipv6(text: str) -> ipaddress.IPv6Address:
    ip = parse_ipv6(text)
    if ip.is_unspecified or ip.is_multicast:
        raise ValueError(f"clients cannot reach {text!r}; give the relay's own address")
    return ip


def parse_cidr(text: str) -> IPNetwork:
    try:
        return ipaddress.ip_network(text)
    except ValueError as e:
        raise ValueError(
            f"expected a network such as 10.0.0.0/8 or fd00::/8, got {text!r} ({e})"
        ) from None


def parse_user(text: str) -> tuple[str, str]:
    name, sep, password = text.partition(":")
    if not sep or not name or not password:
        raise ValueError(f"expected NAME:PASSWORD, got {text!r}")
    return name, password


def parse_positive(text: str) -> int:
    if text.strip().isdigit() and int(text) >= 1:
        return int(text)
    raise ValueError(f"expected a whole number >= 1, got {text!r}")


def parse_nonempty(text: str) -> str:
    if not text:
        raise ValueError("must not be empty")
    return text


def parse_secret_file(text: str) -> list[str]:
    try:
        lines = Path(text).read_text().splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"cannot read {text!r}: {e}") from None
    secrets = [s.strip() for s in lines if s.strip() and not s.lstrip().startswith("#")]
    if not secrets:
        raise ValueError(f"{text!r} holds no secret (one per line)")
    return secrets


def _choice(choices: Sequence[str], *, upper: bool = False) -> Callable[[str], str]:
    def parse(text: str) -> str:
        value = text.upper() if upper else text.lower()
        if value not in choices:
            raise ValueError(f"expected one of {', '.join(choices)}, got {text!r}")
        return value

    return parse


def parse_seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0 < value < float("inf"):
        raise ValueError(f"expected seconds > 0 such as 300 or 2.5, got {text!r}")
    return value


def parse_rate(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0 <= value < float("inf"):
        raise ValueError(f"expected a rate per second >= 0 such as 20 (0: no limit), got {text!r}")
    return value


def parse_readable_file(text: str) -> Path:
    path = Path(text)
    try:
        with path.open("rb"):
            pass
    except OSError as e:
        raise ValueError(f"cannot read {text!r}: {e.strerror or e}") from None
    return path


def parse_interface(text: str) -> str:
    if not text or "/" in text or len(text) > 15 or any(c.isspace() for c in text):
        raise ValueError(f"expected a network interface name such as eth0, got {text!r}")
    return text


@dataclass(frozen=True)
class Option:
    """One `serve` option. `name` is the configuration key; flag and variable derive from it."""

    name: str
    metavar: str
    help: str
    parse: Callable[[str], object]
    repeatable: bool = False
    default: tuple[str, ...] = ()
    choices: tuple[str, ...] | None = None  # only for the help text; `parse` enforces them

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")

    @property
    def env(self) -> str:
        return ENV_PREFIX + self.name.upper()


SERVE_OPTIONS: tuple[Option, ...] = (
    Option(
        "listen",
        "ADDR:PORT",
        "UDP address for TURN clients; repeatable. Use [ADDR]:PORT for IPv6",
        parse_listen,
        repeatable=True,
        default=("0.0.0.0:3478", "[::]:3478"),
    ),
    Option(
        "public_ipv4",
        "ADDR",
        "IPv4 address clients are given for their relays (default: the --listen IPv4 address, "
        "if it is a specific one)",
        parse_public_ipv4,
    ),
    Option(
        "public_ipv6",
        "ADDR",
        "IPv6 address clients are given for their relays (default: the --listen IPv6 address, "
        "if it is a specific one)",
        parse_public_ipv6,
    ),
    Option(
        "ports",
        "LOW-HIGH",
        "UDP port range for relays (allocations)",
        parse_port_range,
        default=("49152-65535",),
    ),
    Option(
        "realm", "REALM", "realm for long-term credentials", parse_nonempty, default=("xdpturn",)
    ),
    Option(
        "auth_secret",
        "SECRET",
        "TURN REST API shared secret; repeatable, to rotate secrets",
        parse_nonempty,
        repeatable=True,
    ),
    Option(
        "auth_secret_file",
        "PATH",
        "file with TURN REST API shared secrets, one per line ('#' starts a comment)",
        parse_secret_file,
    ),
    Option("user", "NAME:PASSWORD", "a static user; repeatable", parse_user, repeatable=True),
    Option(
        "allow_peer",
        "CIDR",
        "peer network that relays may reach even though the default policy refuses it "
        "(private, local, special-purpose); the most specific --allow-peer/--deny-peer "
        "prefix decides; repeatable",
        parse_cidr,
        repeatable=True,
    ),
    Option(
        "deny_peer",
        "CIDR",
        "peer network that relays may not reach, on top of the default policy; wins over an "
        "--allow-peer of the same prefix; repeatable",
        parse_cidr,
        repeatable=True,
    ),
    Option(
        "unauthenticated_rate",
        "N",
        "answers per second (burst: twice that) to unauthenticated UDP requests (401/438 "
        "challenges, Binding) per client IP, so forged sources cannot use the relay as a "
        "reflector; beyond it requests are dropped and counted; 0: no limit",
        parse_rate,
        default=("20",),
    ),
    Option("max_allocations_per_user", "N", "allocation quota per username", parse_positive),
    Option("max_allocations_per_ip", "N", "allocation quota per client IP address", parse_positive),
    Option("max_allocations", "N", "allocations in total", parse_positive),
    Option(
        "log_format",
        "FORMAT",
        "json or text (default: text on a terminal, else JSON lines)",
        _choice(("json", "text", "auto")),
        default=("auto",),
        choices=("json", "text"),
    ),
    Option(
        "log_level",
        "LEVEL",
        "minimum level to log: " + ", ".join(LEVELS),
        _choice(LEVELS, upper=True),
        default=("INFO",),
    ),
    Option(
        "fastpath",
        "MODE",
        "XDP fast path: auto (native, else generic), xdp (native), generic, or off",
        _choice(tuple(m.value for m in FastPathMode)),
        default=("off",),
        choices=tuple(m.value for m in FastPathMode),
    ),
    Option(
        "interface",
        "IF[,IF]",
        "interfaces to attach the fast path to; repeatable or comma-separated",
        parse_interface,
        repeatable=True,
    ),
    Option(
        "listen_tcp",
        "ADDR:PORT",
        "TCP address for TURN clients (TURN over TCP); repeatable; off unless given",
        parse_listen,
        repeatable=True,
    ),
    Option(
        "listen_tls",
        "ADDR:PORT",
        "TCP address for TURN over TLS, e.g. 0.0.0.0:443 or 0.0.0.0:5349; repeatable; needs "
        "--tls-cert and --tls-key; SIGHUP reloads them",
        parse_listen,
        repeatable=True,
    ),
    Option("tls_cert", "PATH", "PEM certificate chain for --listen-tls", parse_readable_file),
    Option("tls_key", "PATH", "PEM private key for --listen-tls", parse_readable_file),
    Option(
        "max_stream_connections",
        "N",
        "open TCP and TLS connections in total; further ones are closed at once",
        parse_positive,
        default=("10000",),
    ),
    Option(
        "stream_idle_timeout",
        "SECONDS",
        "close a TCP or TLS connection without an allocation that completes no message for "
        "this long, and any connection stalled this long in the middle of a message",
        parse_seconds,
        default=("30",),
    ),
    Option(
        "metrics",
        "ADDR:PORT",
        "HTTP listener for /metrics (Prometheus), /healthz, /readyz, /status and /drain; "
        "off unless given. Keep it on loopback or a management network",
        parse_listen,
    ),
    Option(
        "alternate_server",
        "ADDR:PORT",
        "while draining, answer Allocate with 300 Try Alternate and this ALTERNATE-SERVER "
        "(default: 508)",
        parse_listen,
    ),
    Option(
        "drain_timeout",
        "SECONDS",
        "after SIGTERM or `xdpturn drain`, exit when allocations are gone or this has passed",
        parse_seconds,
        default=("300",),
    ),
)

RawValue = str | Sequence[str] | None


def _raw_values(
    option: Option,
    given: Mapping[str, RawValue],
    env: Mapping[str, str],
    file: Mapping[str, RawValue],
    file_name: str,
) -> tuple[str, list[str]]:
    """(where the value came from, its text values): given, else variable, else file."""
    value = given.get(option.name)
    file_value = file.get(option.name)
    if value is not None and value != []:
        source, texts = option.flag, [value] if isinstance(value, str) else list(value)
    elif option.env in env:
        source, texts = f"{option.flag} (from {option.env})", [env[option.env]]
        if option.repeatable:
            texts = [t.strip() for t in env[option.env].split(",") if t.strip()]
    elif file_value is not None and file_value != []:
        source = f"{option.name} (in {file_name})"
        texts = [file_value] if isinstance(file_value, str) else list(file_value)
    else:
        return option.flag, list(option.default)
    if option.name == "interface":  # IF[,IF]: commas on the command line too
        texts = [t.strip() for text in texts for t in text.split(",")]
    if len(texts) > 1 and not option.repeatable:
        raise ConfigError(source, "given more than once")
    return source, texts


def load_serve_config(
    given: Mapping[str, RawValue],
    env: Mapping[str, str] | None = None,
    file: Mapping[str, RawValue] | None = None,
    file_name: str = "config file",
) -> ServeConfig:
    """Build a checked ServeConfig from option texts keyed by option name (`given`, e.g. from the
    command line), falling back to XDPTURN_* variables in `env`, then to `file` (a configuration
    file's values, see xdpturn.config_file), then defaults."""
    env = {} if env is None else env
    file = {} if file is None else file
    values: dict[str, list[object]] = {}
    for option in SERVE_OPTIONS:
        source, texts = _raw_values(option, given, env, file, file_name)
        try:
            values[option.name] = [option.parse(t) for t in texts]
        except ValueError as e:
            raise ConfigError(source, str(e)) from None

    def one(name: str) -> object | None:
        return values[name][0] if values[name] else None

    secrets = [cast(str, s) for s in values["auth_secret"]]
    for file_secrets in values["auth_secret_file"]:
        secrets.extend(cast(list[str], file_secrets))
    config = ServeConfig(
        listen=cast(list[TransportAddr], values["listen"]),
        public_ipv4=cast("ipaddress.IPv4Address | None", one("public_ipv4")),
        public_ipv6=cast("ipaddress.IPv6Address | None", one("public_ipv6")),
        ports=cast(PortRange, one("ports")),
        realm=cast(str, one("realm")),
        auth_secrets=secrets,
        users=dict(cast(list[tuple[str, str]], values["user"])),
        allow_peers=cast(list[IPNetwork], values["allow_peer"]),
        deny_peers=cast(list[IPNetwork], values["deny_peer"]),
        unauthenticated_rate=cast(float, one("unauthenticated_rate")),
        max_allocations_per_user=cast("int | None", one("max_allocations_per_user")),
        max_allocations_per_ip=cast("int | None", one("max_allocations_per_ip")),
        max_allocations=cast("int | None", one("max_allocations")),
        log_format=cast(Literal["json", "text", "auto"], one("log_format")),
        log_level=cast(str, one("log_level")),
        fastpath=FastPathMode(cast(str, one("fastpath"))),
        interfaces=cast(list[str], values["interface"]),
        listen_tcp=cast(list[TransportAddr], values["listen_tcp"]),
        listen_tls=cast(list[TransportAddr], values["listen_tls"]),
        tls_cert=cast("Path | None", one("tls_cert")),
        tls_key=cast("Path | None", one("tls_key")),
        max_stream_connections=cast(int, one("max_stream_connections")),
        stream_idle_timeout=cast(float, one("stream_idle_timeout")),
        metrics=cast("TransportAddr | None", one("metrics")),
        alternate_server=cast("TransportAddr | None", one("alternate_server")),
        drain_timeout=cast(float, one("drain_timeout")),
    )
    config.check()
    return config
