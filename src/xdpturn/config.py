"""The `serve` configuration: each option declared once, parsed and checked in one place.

An option is declared by the `ServeConfig` field it sets: its name, value type, default, help and
parser stand there together. Its one name is used three ways: `--ports` on the command line,
`XDPTURN_PORTS` in the environment (repeatable options comma-separated there), and `ports` as a
key of a configuration file. `load_serve_config` turns raw text values into a `ServeConfig`, or
raises `ConfigError` naming the option that is wrong. A `ServeConfig` is checked when it is made,
and what the relay derives from it (the core's settings, the fast path's, where allocation
sockets bind) is computed then too, once: the layers below receive plain values.
"""

from __future__ import annotations

import ipaddress
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, fields
from enum import Enum
from pathlib import Path
from typing import Any, TypeVar, cast

from xdpturn.fastpath import FastPathConfig, FastPathMode, GuardConfig
from xdpturn.fastpath.pinning import BPFFS, pin_dir_for
from xdpturn.log import LEVELS, LogFormat
from xdpturn.proto.addr import Family, IPAddress, TransportAddr
from xdpturn.proto.auth import Authenticator
from xdpturn.proto.ports import PortRange
from xdpturn.proto.server import ServerConfig
from xdpturn.tls import server_context

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
T = TypeVar("T")
K = TypeVar("K")
V = TypeVar("V")
E = TypeVar("E", bound=Enum)
ENV_PREFIX = "XDPTURN_"
DEFAULT_TURN_PORT = 3478
# Worker indexes are 0-65535: a reservation token carries its worker's in two bytes.
MAX_WORKERS = 65536


def available_cpus() -> int:
    """The CPUs this process may run on (its affinity mask, e.g. `taskset` or a cgroup cpuset):
    the default number of workers."""
    return len(os.sched_getaffinity(0))


class ConfigError(ValueError):
    """A bad option value. `str()` is `--option: what is wrong`."""

    def __init__(self, option: str, problem: str) -> None:
        super().__init__(f"{option}: {problem}")
        self.option = option
        self.problem = problem


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


_BIT_RATE_UNITS = {"": 1, "k": 10**3, "m": 10**6, "g": 10**9}


def parse_bit_rate(text: str) -> int:
    """Bits per second: a whole number with an optional k, M or G (powers of 1000)."""
    body = text.strip()
    unit = body[-1:].lower() if body[-1:].isalpha() else ""
    number = body[: len(body) - len(unit)]
    if unit in _BIT_RATE_UNITS and number.isdigit() and int(number) >= 1:
        return int(number) * _BIT_RATE_UNITS[unit]
    raise ValueError(f"expected bits per second >= 1, e.g. 2000000 or 2M, got {text!r}")


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


def _enum(kind: type[E]) -> Callable[[str], E]:
    choose = _choice([member.value for member in kind])
    return lambda text: kind(choose(text))


def parse_log_format(text: str) -> LogFormat:
    return cast(LogFormat, _choice(("json", "text", "auto"))(text))


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


def parse_on_off(text: str) -> bool:
    return _choice(("on", "off"))(text) == "on"


def parse_milliseconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0 < value <= 1000:
        raise ValueError(f"expected milliseconds > 0 and <= 1000 such as 5 or 0.5, got {text!r}")
    return value


def parse_state_dir(text: str) -> Path:
    path = Path(text)
    if not text or (path.exists() and not path.is_dir()):
        raise ValueError(f"expected a directory (made if missing), got {text!r}")
    return path.absolute()


def parse_bpffs(text: str) -> Path:
    if not text:
        raise ValueError("expected a directory, got ''")
    return Path(text).absolute()


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


# Declaring options: each ServeConfig field below states the option (or options) that set it.


@dataclass(frozen=True)
class Option:
    """One `serve` option. `name` is the configuration key; flag and variable derive from it."""

    name: str
    metavar: str
    help: str
    parse: Callable[[str], Any]
    repeatable: bool = False
    commas: bool = False  # comma-separated on the command line and in a file too (IF[,IF])
    spread: bool = False  # one text gives a list of values (a file of secrets)
    path: bool = False  # in a configuration file: relative to the file's directory
    default_text: str = ""  # the default as --help shows it

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")

    @property
    def env(self) -> str:
        return ENV_PREFIX + self.name.upper()


@dataclass(frozen=True)
class _Setting:
    """A field's options, and how their values become the field's (None: the one value)."""

    options: tuple[Option, ...]
    collect: Callable[[list[Any]], Any] | None


def _show(value: object) -> str:
    if isinstance(value, list | tuple):
        return " ".join(_show(v) for v in value)
    if isinstance(value, Enum):
        return str(value.value)
    if isinstance(value, float):
        return f"{value:g}"
    return "" if value is None else str(value)


def _declare(setting: _Setting, default: object) -> Any:
    metadata = {"setting": setting}
    if isinstance(default, list | dict):
        return field(default_factory=lambda: type(default)(default), metadata=metadata)
    return field(default=default, metadata=metadata)


def option(
    metavar: str,
    help: str,
    parse: Callable[[str], T],
    default: T,
    *,
    path: bool = False,
    show_default: bool = True,
) -> T:
    """A single-valued option; not given, it is `default`."""
    text = _show(default) if show_default else ""
    one = Option("", metavar, help, parse, path=path, default_text=text)
    return cast(T, _declare(_Setting((one,), None), default))


def optional(metavar: str, help: str, parse: Callable[[str], T], *, path: bool = False) -> T | None:
    """A single-valued option that is off (None) unless given."""
    return option(metavar, help, parse, None, path=path)


def repeatable(
    metavar: str,
    help: str,
    parse: Callable[[str], T],
    default: Sequence[T] = (),
    *,
    name: str = "",
    commas: bool = False,
    also: tuple[Option, ...] = (),
) -> list[T]:
    """An option given any number of times; `also` are further options adding to the list."""
    text = _show(default)
    many = Option(name, metavar, help, parse, repeatable=True, commas=commas, default_text=text)
    return cast(list[T], _declare(_Setting((many, *also), list), list(default)))


def pairs(metavar: str, help: str, parse: Callable[[str], tuple[K, V]], *, name: str) -> dict[K, V]:
    """A repeatable option of KEY:VALUE pairs, kept as a mapping (a later key wins)."""
    many = Option(name, metavar, help, parse, repeatable=True)
    return cast(dict[K, V], _declare(_Setting((many,), dict), {}))


@dataclass(frozen=True, kw_only=True)
class ServeConfig:
    """Everything `xdpturn serve` needs, checked, with what the relay derives from it."""

    listen: list[TransportAddr] = repeatable(
        "ADDR:PORT",
        "UDP address for TURN clients; repeatable. Use [ADDR]:PORT for IPv6",
        parse_listen,
        [
            TransportAddr(ipaddress.IPv4Address("0.0.0.0"), DEFAULT_TURN_PORT),
            TransportAddr(ipaddress.IPv6Address("::"), DEFAULT_TURN_PORT),
        ],
    )
    public_ipv4: ipaddress.IPv4Address | None = optional(
        "ADDR",
        "IPv4 address clients are given for their relays (default: the --listen IPv4 address, "
        "if it is a specific one)",
        parse_public_ipv4,
    )
    public_ipv6: ipaddress.IPv6Address | None = optional(
        "ADDR",
        "IPv6 address clients are given for their relays (default: the --listen IPv6 address, "
        "if it is a specific one)",
        parse_public_ipv6,
    )
    ports: PortRange = option(
        "LOW-HIGH",
        "UDP port range for relays (allocations)",
        parse_port_range,
        PortRange(49152, 65535),
    )
    realm: str = option("REALM", "realm for long-term credentials", parse_nonempty, "xdpturn")
    auth_secrets: list[str] = repeatable(
        "SECRET",
        "TURN REST API shared secret; repeatable, to rotate secrets",
        parse_nonempty,
        name="auth_secret",
        also=(
            Option(
                "auth_secret_file",
                "PATH",
                "file with TURN REST API shared secrets, one per line ('#' starts a comment)",
                parse_secret_file,
                spread=True,
                path=True,
            ),
        ),
    )
    users: dict[str, str] = pairs(
        "NAME:PASSWORD", "a static user; repeatable", parse_user, name="user"
    )
    allow_peers: list[IPNetwork] = repeatable(
        "CIDR",
        "peer network that relays may reach even though the default policy refuses it "
        "(private, local, special-purpose); the most specific --allow-peer/--deny-peer "
        "prefix decides; repeatable",
        parse_cidr,
        name="allow_peer",
    )
    deny_peers: list[IPNetwork] = repeatable(
        "CIDR",
        "peer network that relays may not reach, on top of the default policy; wins over an "
        "--allow-peer of the same prefix; repeatable",
        parse_cidr,
        name="deny_peer",
    )
    unauthenticated_rate: float = option(
        "N",
        "answers per second (burst: twice that) to unauthenticated UDP requests (401/438 "
        "challenges, Binding) per client IP, so forged sources cannot use the relay as a "
        "reflector; beyond it requests are dropped and counted; 0: no limit",
        parse_rate,
        20.0,
    )
    max_allocations_per_user: int | None = optional(
        "N", "allocation quota per username", parse_positive
    )
    max_allocations_per_ip: int | None = optional(
        "N", "allocation quota per client IP address", parse_positive
    )
    max_allocations: int | None = optional("N", "allocations in total", parse_positive)
    max_bps_per_allocation: int | None = optional(
        "BITS",
        "bits of payload per second each allocation may relay in each direction (k, M, G "
        "suffixes), in bursts of a quarter second's worth; beyond it datagrams are dropped and "
        "counted, in the kernel and in Python alike",
        parse_bit_rate,
    )
    max_bps: int | None = optional(
        "BITS",
        "bits of payload per second the whole relay may carry (k, M, G suffixes): while its "
        "measured rate is at this, new allocations are refused with 508",
        parse_bit_rate,
    )
    log_format: LogFormat = option(
        "FORMAT",
        "json or text (default: text on a terminal, else JSON lines)",
        parse_log_format,
        "auto",
        show_default=False,
    )
    log_level: str = option(
        "LEVEL", "minimum level to log: " + ", ".join(LEVELS), _choice(LEVELS, upper=True), "INFO"
    )
    fastpath: FastPathMode = option(
        "MODE",
        "XDP fast path: auto (native, else generic), xdp (native), generic, or off",
        _enum(FastPathMode),
        FastPathMode.OFF,
    )
    interfaces: list[str] = repeatable(
        "IF[,IF]",
        "interfaces to attach the fast path to; repeatable or comma-separated",
        parse_interface,
        name="interface",
        commas=True,
    )
    # What the XDP program drops, and what both paths read from sources without an allocation
    # (docs/security.md).
    fastpath_guard: bool = option(
        "on|off",
        "let the XDP program drop what can never be valid (junk on the TURN port, ChannelData "
        "from addresses without an allocation, peers without a permission) and rate-limit STUN "
        "(default: on)",
        parse_on_off,
        True,
        show_default=False,
    )
    stun_rate_per_source: float = option(
        "N",
        "datagrams per second the relay reads from one source address (an IPv6 /64) without an "
        "allocation: STUN on the TURN port past XDP, or on the listening sockets in Python; "
        "0: no limit",
        parse_rate,
        GuardConfig.stun_rate_per_source,
    )
    stun_rate_total: float = option(
        "N",
        "the same from all sources without an allocation together; 0: no limit",
        parse_rate,
        GuardConfig.stun_rate_total,
    )
    listen_tcp: list[TransportAddr] = repeatable(
        "ADDR:PORT",
        "TCP address for TURN clients (TURN over TCP); repeatable; off unless given",
        parse_listen,
    )
    listen_tls: list[TransportAddr] = repeatable(
        "ADDR:PORT",
        "TCP address for TURN over TLS, e.g. 0.0.0.0:443 or 0.0.0.0:5349; repeatable; needs "
        "--tls-cert and --tls-key; SIGHUP reloads them",
        parse_listen,
    )
    tls_cert: Path | None = optional(
        "PATH", "PEM certificate chain for --listen-tls", parse_readable_file, path=True
    )
    tls_key: Path | None = optional(
        "PATH", "PEM private key for --listen-tls", parse_readable_file, path=True
    )
    # Bounds on TCP/TLS connections, so silent or stalled ones cannot hold sockets forever.
    max_stream_connections: int = option(
        "N",
        "open TCP and TLS connections in total; further ones are closed at once",
        parse_positive,
        10000,
    )
    stream_idle_timeout: float = option(
        "SECONDS",
        "close a TCP or TLS connection without an allocation that completes no message for "
        "this long, and any connection stalled this long in the middle of a message",
        parse_seconds,
        30.0,
    )
    # Receive queues sized by time, not bytes (server/sockets.py: receive_buffer_for).
    receive_queue_delay: float = option(
        "MS",
        "how long a datagram may wait in a UDP socket's receive queue: each queue holds this "
        "much of what one worker relays, the kernel drops (and counts) the rest, so an "
        "overloaded relay drops instead of delaying media",
        parse_milliseconds,
        5.0,
    )
    metrics: TransportAddr | None = optional(
        "ADDR:PORT",
        "HTTP listener for /metrics (Prometheus), /healthz, /readyz, /status and /drain; "
        "off unless given. Keep it on loopback or a management network",
        parse_listen,
    )
    alternate_server: TransportAddr | None = optional(
        "ADDR:PORT",
        "while draining, answer Allocate with 300 Try Alternate and this ALTERNATE-SERVER "
        "(default: 508)",
        parse_listen,
    )
    drain_timeout: float = option(
        "SECONDS",
        "after SIGTERM or `xdpturn drain`, exit when allocations are gone or this has passed",
        parse_seconds,
        300.0,
    )
    workers: int = option(
        "N",
        "relay processes sharing the listening sockets (SO_REUSEPORT), one per core (default: "
        "the CPUs this process may run on)",
        parse_positive,
        available_cpus(),
        show_default=False,
    )
    # With a state directory, SIGINT stops for a restart: the kernel path stays, the state is
    # saved there, and the next `serve` with the same directory carries on (xdpturn.server.restart).
    state_dir: Path | None = optional(
        "DIR",
        "restart without loss: SIGINT keeps the XDP program attached and its maps pinned and "
        "saves the allocations here; the next serve with the same DIR carries on "
        "(`xdpturn detach` stops for good)",
        parse_state_dir,
        path=True,
    )
    bpffs: Path = option(
        "DIR",
        "the bpffs where --state-dir pins the XDP program and maps (mounted if absent); it "
        "must outlive the process: the host's, not one of a private mount namespace",
        parse_bpffs,
        BPFFS,
        path=True,
    )
    bpf_object: Path | None = optional(
        "PATH",
        "the XDP object to load (default: the one installed with xdpturn)",
        parse_readable_file,
        path=True,
    )

    # Derived once, when the configuration is made (see __post_init__).
    relay_addresses: dict[Family, IPAddress] = field(init=False, repr=False, compare=False)
    relay_binds: dict[Family, IPAddress] = field(init=False, repr=False, compare=False)
    server: ServerConfig = field(init=False, repr=False, compare=False)
    guard: GuardConfig = field(init=False, repr=False, compare=False)
    fastpath_settings: FastPathConfig = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        self._check()
        # What clients are told for relays of a family: --public-*, else the first specific
        # (not wildcard) --listen address of that family; a family with neither has no relays.
        relay_addresses: dict[Family, IPAddress] = {}
        # Where allocation sockets bind: the first --listen address of the family (so a relay
        # told to listen on loopback stays on loopback), else the wildcard.
        relay_binds: dict[Family, IPAddress] = {}
        for family, public in ((Family.IPV4, self.public_ipv4), (Family.IPV6, self.public_ipv6)):
            listening = [a.ip for a in self.listen if a.family is family]
            address = public or next((ip for ip in listening if not ip.is_unspecified), None)
            if address is None:
                continue
            relay_addresses[family] = address
            wildcard = ipaddress.ip_address("0.0.0.0" if family is Family.IPV4 else "::")
            relay_binds[family] = listening[0] if listening else wildcard
        v4, v6 = relay_addresses.get(Family.IPV4), relay_addresses.get(Family.IPV6)
        public_v4 = v4 if isinstance(v4, ipaddress.IPv4Address) else None
        public_v6 = v6 if isinstance(v6, ipaddress.IPv6Address) else None
        server = ServerConfig(
            realm=self.realm,
            public_ipv4=public_v4,
            public_ipv6=public_v6,
            auth=Authenticator(secrets=list(self.auth_secrets), users=dict(self.users)),
            allow_peers=list(self.allow_peers),
            deny_peers=list(self.deny_peers),
            unauthenticated_rate=self.unauthenticated_rate,
            # Two seconds' worth at once: room for a few clients behind one NAT starting together.
            unauthenticated_burst=max(1, int(2 * self.unauthenticated_rate)),
            max_allocations=self.max_allocations,
            max_allocations_per_user=self.max_allocations_per_user,
            max_allocations_per_ip=self.max_allocations_per_ip,
            max_bps_per_allocation=self.max_bps_per_allocation,
            # Each worker measures and caps what it relays: its share of the relay's cap
            # (clients spread evenly over the workers' SO_REUSEPORT listeners).
            max_bps=None if self.max_bps is None else max(1, self.max_bps // self.workers),
        )
        guard = GuardConfig(
            enabled=self.fastpath_guard,
            stun_rate_per_source=self.stun_rate_per_source,
            stun_rate_total=self.stun_rate_total,
        )
        local_v4 = relay_binds.get(Family.IPV4)
        local_v6 = relay_binds.get(Family.IPV6)
        fastpath = FastPathConfig(
            mode=self.fastpath,
            interfaces=list(self.interfaces),
            turn_port=DEFAULT_TURN_PORT,  # the runtime puts in the port its listener got
            public_ipv4=public_v4,
            public_ipv6=public_v6,
            local_ipv4=local_v4 if isinstance(local_v4, ipaddress.IPv4Address) else None,
            local_ipv6=local_v6 if isinstance(local_v6, ipaddress.IPv6Address) else None,
            guard=guard,
            pin_dir=None if self.state_dir is None else pin_dir_for(self.state_dir, self.bpffs),
            object_path=self.bpf_object,
            allocation_rate_bps=server.max_bps_per_allocation,
            allocation_burst=server.allocation_burst,
        )
        for name, value in (
            ("relay_addresses", relay_addresses),
            ("relay_binds", relay_binds),
            ("server", server),
            ("guard", guard),
            ("fastpath_settings", fastpath),
        ):
            object.__setattr__(self, name, value)

    def _check(self) -> None:
        """Raise ConfigError for combinations no single value shows to be wrong."""
        if not self.listen:
            raise ConfigError("--listen", "at least one address is needed")
        if self.workers > MAX_WORKERS:
            raise ConfigError(
                "--workers",
                f"at most {MAX_WORKERS}: a reservation token names its worker in two bytes",
            )
        fixed = [a for a in self.listen if a.port != 0]  # port 0: the kernel picks, never equal
        if len(set(fixed)) != len(fixed):
            raise ConfigError("--listen", "the same address is given twice")
        specific = [a for a in self.listen if not a.ip.is_unspecified]
        if self.public_ipv4 is None and self.public_ipv6 is None and not specific:
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


def _settings() -> dict[str, tuple[_Setting, tuple[Option, ...]]]:
    """{field name: (its setting, its options named)}; an option's name defaults to its field's."""
    out = {}
    for f in fields(ServeConfig):
        setting = f.metadata.get("setting")
        if isinstance(setting, _Setting):
            named = tuple(
                o if o.name else Option(**{**o.__dict__, "name": f.name}) for o in setting.options
            )
            out[f.name] = (setting, named)
    return out


_SETTINGS = _settings()
SERVE_OPTIONS: tuple[Option, ...] = tuple(o for _, named in _SETTINGS.values() for o in named)

RawValue = str | Sequence[str] | None


def _raw_values(
    option: Option,
    given: Mapping[str, RawValue],
    env: Mapping[str, str],
    file: Mapping[str, RawValue],
    file_name: str,
) -> tuple[str, list[str]]:
    """(where the value came from, its text values): given, else variable, else file; no texts
    when it is set nowhere."""
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
        return option.flag, []
    if option.commas:
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
    values: dict[str, Any] = {}
    for field_name, (setting, options) in _SETTINGS.items():
        collected: list[Any] = []
        given_anywhere = False
        for option in options:
            source, texts = _raw_values(option, given, env, file, file_name)
            try:
                parsed = [option.parse(t) for t in texts]
            except ValueError as e:
                raise ConfigError(source, str(e)) from None
            given_anywhere = given_anywhere or bool(texts)
            for value in parsed:
                collected.extend(value if option.spread else [value])
        if not given_anywhere:
            continue  # the field's default
        values[field_name] = collected[0] if setting.collect is None else setting.collect(collected)
    return ServeConfig(**values)
