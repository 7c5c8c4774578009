"""Sans-IO protocol layer: codecs and the TURN server state machine.

Nothing here touches sockets, asyncio or the clock: bytes, addresses and `now` go in, commands
come out.
"""
