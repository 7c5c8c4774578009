"""`xdpturn serve --config PATH`: a TOML file whose keys are the `serve` option names.

    listen = ["0.0.0.0:3478", "[::]:3478"]
    public_ipv4 = "192.0.2.1"
    auth_secret_file = "/etc/xdpturn/secrets"
    drain_timeout = 300

Values are what the option takes on the command line: strings, or numbers where the option is
numeric; a repeatable option takes a list (or one string). Precedence: command line, then
XDPTURN_* variables, then the file, then defaults. A relative `auth_secret_file` is relative to
the file's directory, so a file and its secrets can move together.
"""

from __future__ import annotations

import tomllib
from collections.abc import Mapping
from pathlib import Path

from xdpturn.config import SERVE_OPTIONS, ConfigError, RawValue

CONFIG_FLAG = "--config"


def read_config_file(path: str | Path) -> dict[str, RawValue]:
    """The file's values as option texts keyed by option name, for `load_serve_config(file=)`.

    Raises ConfigError: naming the file when it cannot be read or parsed or has an unknown key,
    naming the key (and file) when a value has the wrong type.
    """
    path = Path(path)
    try:
        with path.open("rb") as f:
            data = tomllib.load(f)
    except OSError as e:
        raise ConfigError(CONFIG_FLAG, f"cannot read {str(path)!r}: {e.strerror or e}") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(CONFIG_FLAG, f"{str(path)!r} is not valid TOML: {e}") from None
    return config_values(data, path)


def config_values(data: Mapping[str, object], path: Path) -> dict[str, RawValue]:
    options = {o.name: o for o in SERVE_OPTIONS}
    out: dict[str, RawValue] = {}
    for key, value in data.items():
        option = options.get(key)
        if option is None:
            hint = f" (did you mean {key.replace('-', '_')!r}?)" if "-" in key else ""
            raise ConfigError(CONFIG_FLAG, f"{str(path)!r}: unknown key {key!r}{hint}")
        where = f"{key} (in {path})"
        if isinstance(value, list):
            if not option.repeatable and len(value) != 1:
                raise ConfigError(where, "expected one value, not a list")
            texts = [_text(where, v) for v in value]
        else:
            texts = [_text(where, value)]
        if option.path:
            texts = [str(path.parent / t) for t in texts]  # absolute texts stay as they are
        out[key] = texts if option.repeatable else texts[0]
    return out


def _text(where: str, value: object) -> str:
    # bool is an int subclass; no option is a switch, so true/false is always a mistake.
    if isinstance(value, bool) or not isinstance(value, str | int | float):
        raise ConfigError(where, f"expected a string or a number, got {type(value).__name__}")
    return str(value)
