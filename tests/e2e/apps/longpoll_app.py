"""A long-poll app that releases what it holds with a stop hook, as a Socket.IO server does by hand.

GET /poll?session=PID waits up to HOLD seconds for news (as an Engine.IO long-poll waits for
pingInterval), then answers the worker's slot and pid; a session another worker made (another pid)
is answered at once, as a new worker answers an Engine.IO session it does not know. The stop hook
answers the polls pending at that moment only: the next poll waits again, so a client that sends
it to the stopping worker holds the stop.
"""

import asyncio
import os

from ebpf_sticky import on_stop

HOLD = 25.0
pending: set[asyncio.Future[None]] = set()


@on_stop
async def answer_pending() -> None:
    for waiter in pending:
        if not waiter.done():
            waiter.set_result(None)


async def app(scope, receive, send):  # type: ignore[no-untyped-def]
    if scope["type"] != "http":
        return
    if scope["path"] == "/poll" and scope["query_string"] == f"session={os.getpid()}".encode():
        waiter = asyncio.get_running_loop().create_future()
        pending.add(waiter)
        try:
            await asyncio.wait_for(waiter, HOLD)
        except asyncio.TimeoutError:
            pass
        finally:
            pending.discard(waiter)
    body = f"{os.environ['EBPF_STICKY_WORKER']} {os.getpid()}\n".encode()
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/plain")]})
    await send({"type": "http.response.body", "body": body})
