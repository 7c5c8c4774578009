"""The asyncio runtime around the sans-IO TURN core: sockets, timer, shutdown."""

from xdpturn.server.relay import Core, CoreFactory, RelayServer, StartError, run, serve

__all__ = ["Core", "CoreFactory", "RelayServer", "StartError", "run", "serve"]
