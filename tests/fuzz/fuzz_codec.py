"""Coverage-guided fuzzing of the STUN codec with atheris (libFuzzer): only StunDecodeError may
escape, and what decodes re-encodes. See docs/security.md for longer runs:

    .venv/bin/python -m tests.fuzz.fuzz_codec /tmp/codec-corpus tests/fuzz/corpus/codec \\
        -max_total_time=3600
"""

from __future__ import annotations

import sys

import atheris  # type: ignore[import-untyped]

with atheris.instrument_imports(include=["xdpturn"]):
    from tests.fuzz.invariants import exercise_codec


def one_input(data: bytes) -> None:
    exercise_codec(data)


def main() -> None:
    atheris.Setup(sys.argv, one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
