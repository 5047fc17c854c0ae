"""The one python-socketio app every router in the Socket.IO workloads puts in front of its clients.

It echoes each "echo" event back to its sender, and answers plain HTTP with app.py's worker id so
the routers' readiness checks (GET /) work as for the HTTP workloads.
"""

from typing import Any

import socketio
from app import app as plain_app

sio = socketio.AsyncServer(async_mode="asgi", logger=False, engineio_logger=False)


@sio.on("echo")  # type: ignore[untyped-decorator,unused-ignore]
async def echo(sid: str, data: Any) -> None:
    await sio.emit("echo", data, to=sid)


app = socketio.ASGIApp(sio, other_asgi_app=plain_app)
