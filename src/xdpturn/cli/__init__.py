"""The `xdpturn` command: serve, credentials, probe (cli.main), status and drain (cli.ops)."""

from xdpturn.cli.main import main

__all__ = ["main"]
