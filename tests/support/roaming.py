"""Clients whose every connection comes from the next of several source addresses.

As a phone between Wi-Fi and mobile data, a browser alternating IPv6 and IPv4 (Happy Eyeballs) or
an agent platform whose egress address rotates: the session is the same, the address is not. The
Socket.IO client is python-socketio's own, over an aiohttp session whose connector binds each new
connection to the next source; ``localhost`` resolves to both loopbacks, so an IPv4 source reaches
127.0.0.1 and an IPv6 source ::1 (a dual-stack ``[::]`` bind serves both).
"""

from __future__ import annotations

import asyncio
import itertools
import socket
from collections.abc import Coroutine
from typing import Any

import aiohappyeyeballs
import aiohttp
import socketio
from aiohttp.abc import AbstractResolver, ResolveResult

from support.sio_clients import round_trips


class BothLoopbacks(AbstractResolver):
    async def resolve(self, host: str, port: int = 0, family: int = socket.AF_UNSPEC) -> list[ResolveResult]:
        return [
            ResolveResult(hostname=host, host=address, port=port, family=fam, proto=0, flags=0)
            for address, fam in (("127.0.0.1", socket.AF_INET), ("::1", socket.AF_INET6))
        ]

    async def close(self) -> None:
        pass


class RoamingConnector(aiohttp.TCPConnector):
    """A new connection per request (that is the point: each one from the next source)."""

    def __init__(self, sources: list[str]) -> None:
        self._sources = itertools.cycle(sources)
        super().__init__(force_close=True, resolver=BothLoopbacks())

    @property
    def _local_addr_infos(self) -> Any:
        return aiohappyeyeballs.addr_to_addr_infos((next(self._sources), 0))

    @_local_addr_infos.setter
    def _local_addr_infos(self, _value: Any) -> None:
        pass


async def roaming_session(url: str, sources: list[str], rounds: int, timeout: float) -> set[str]:
    """One Socket.IO session over polling; the workers that answered its calls."""
    async with aiohttp.ClientSession(connector=RoamingConnector(sources)) as http:
        client = socketio.AsyncClient(http_session=http, reconnection=False, request_timeout=timeout)
        try:
            await asyncio.wait_for(client.connect(url, transports=["polling"], wait_timeout=timeout), timeout)
            answered = set()
            for _ in range(rounds):
                answer = await client.call("whoami", timeout=timeout)
                answered.add(str(answer["worker"]))
            return answered
        finally:
            await client.eio.disconnect(abort=True)


def roaming_swarm(
    url: str, sessions: list[list[str]], rounds: int = 4, timeout: float = 10
) -> tuple[list[set[str]], list[str]]:
    """Every session at once: (workers per kept session, errors of the others)."""
    return gather_sessions([roaming_session(url, s, rounds, timeout) for s in sessions])


class Alternating(AbstractResolver):
    """``host`` resolves to 127.0.0.1 on the next of ``ports``: a client behind a balancer that
    spreads its requests over the replicas of an L7 proxy (each replica its own port here)."""

    def __init__(self, ports: list[int]) -> None:
        self.ports = itertools.cycle(ports)

    async def resolve(self, host: str, port: int = 0, family: int = socket.AF_UNSPEC) -> list[ResolveResult]:
        return [ResolveResult(hostname=host, host="127.0.0.1", port=next(self.ports), family=socket.AF_INET,
                              proto=0, flags=0)]  # fmt: skip

    async def close(self) -> None:
        pass


async def replica_session(
    url: str, ports: list[int], transports: list[str], rounds: int, timeout: float
) -> set[str]:
    """A Socket.IO session whose every connection goes through the next replica."""
    connector = aiohttp.TCPConnector(force_close=True, use_dns_cache=False, resolver=Alternating(ports))
    async with aiohttp.ClientSession(connector=connector) as http:
        client = socketio.AsyncClient(http_session=http, reconnection=False, request_timeout=timeout)
        try:
            answers = await round_trips(client, url, transports, rounds, timeout)
            return {str(answer["worker"]) for answer in answers}
        finally:
            await client.eio.disconnect(abort=True)


def gather_sessions(sessions: list[Coroutine[Any, Any, set[str]]]) -> tuple[list[set[str]], list[str]]:
    """Run session coroutines at once: (workers per kept session, errors of the others)."""

    async def main() -> list[set[str] | BaseException]:
        return await asyncio.gather(*sessions, return_exceptions=True)

    kept: list[set[str]] = []
    errors: list[str] = []
    for outcome in asyncio.run(main()):
        if isinstance(outcome, BaseException):
            errors.append(f"{type(outcome).__name__}: {outcome}")
        else:
            kept.append(outcome)
    return kept, errors
