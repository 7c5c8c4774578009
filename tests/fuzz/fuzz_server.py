"""Coverage-guided fuzzing of the whole sans-IO TURN server with atheris (libFuzzer): datagrams
from a few clients (UDP and TCP, signed and not), from peers, and timer steps; the invariants of
tests/fuzz/invariants.py are checked after every step. See docs/security.md for longer runs:

    .venv/bin/python -m tests.fuzz.fuzz_server /tmp/server-corpus tests/fuzz/corpus/server \\
        -max_total_time=3600
"""

from __future__ import annotations

import sys

import atheris  # type: ignore[import-untyped]

with atheris.instrument_imports(include=["xdpturn"]):
    from tests.fuzz.invariants import ServerUnderFuzz


def one_input(data: bytes) -> None:
    ServerUnderFuzz().run(data)


def main() -> None:
    atheris.Setup(sys.argv, one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
