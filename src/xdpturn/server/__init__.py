"""The asyncio runtime around the sans-IO TURN core: sockets, timer, draining, shutdown."""

from xdpturn.server.lifecycle import run, serve
from xdpturn.server.relay import Core, CoreFactory, RelayServer, StartError

__all__ = ["Core", "CoreFactory", "RelayServer", "StartError", "run", "serve"]
