"""A relay out of file descriptors: each allocation holds sockets, and a process that reaches its
open-file limit can bind no port at all. The Allocate then gets 508 at once, the relay says why
once, and everyone else keeps being served (before, it tried every port of the range for each
Allocate, logging each, and its loop stopped answering for seconds)."""

from __future__ import annotations

import asyncio
import json

import pytest

from tests.support import Serve, binding
from xdpturn.client import TurnClient
from xdpturn.client.turn import ClientOptions, TurnClientError
from xdpturn.proto.addr import TransportAddr

from .helpers import SECRET, TIMEOUT, rest_credentials, run

FILES = 96  # the relay's whole budget: a few dozen allocations
# Without CAP_SYS_RESOURCE even root cannot raise its hard limit, as for an unprivileged relay.
LIMITED = ["prlimit", f"--nofile={FILES}:{FILES}", "setpriv", "--bounding-set=-sys_resource"]
OPTIONS = ClientOptions(reliable_timeout=TIMEOUT)


@pytest.mark.kernel  # root: setpriv drops a capability from the bounding set
def test_out_of_file_descriptors_is_508_at_once_and_the_relay_keeps_serving() -> None:
    args = ["--listen", "127.0.0.1:0", "--auth-secret", SECRET, "--ports", "20000-29999"]
    args += ["--allow-peer", "127.0.0.0/8", "--log-format", "json", "--unauthenticated-rate", "0"]
    args += ["--stun-rate-per-source", "0"]
    with Serve(args, prefix=LIMITED) as relay:
        warning = relay.wait_for("the open-file limit is lower than the port range needs")
        assert warning["open_files"] == FILES and warning["needed"] == 10000 * 3 + 4096
        listening = relay.wait_for("listening")
        listen = listening["listen"]
        assert isinstance(listen, list)
        server = TransportAddr.parse(str(listen[0]))

        async def main() -> tuple[int, TurnClientError]:
            clients: list[TurnClient] = []
            try:
                for _ in range(FILES):  # each allocation takes 2 descriptors: bounded
                    username, password = rest_credentials()
                    client = await TurnClient.connect(server, username, password, options=OPTIONS)
                    try:
                        await client.allocate()
                    except TurnClientError as e:
                        await client.close()
                        # Those allocated are still served.
                        for c in clients:
                            assert await asyncio.wait_for(c.refresh(), TIMEOUT) > 0
                        return len(clients), e
                    clients.append(client)
                raise AssertionError(f"{FILES} allocations with {FILES} descriptors")
            finally:
                for c in clients:
                    await c.close()

        allocated, refused = run(main())
        assert refused.code == 508 and refused.reason == "Relay out of resources"
        assert 5 <= allocated < FILES // 2
        assert binding(server)  # the loop answers at once: it did not walk the port range
        assert relay.stop() == 0
        records = []
        while (line := relay.lines.get(timeout=TIMEOUT)) is not None:
            records.append(json.loads(line))
        failed_binds = [r for r in records if r["message"] == "cannot bind a relay port"]
        assert len(failed_binds) == 1  # one attempt for the one refused Allocate
