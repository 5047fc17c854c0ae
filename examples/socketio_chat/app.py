"""A small Socket.IO chat with rooms, for `ebpf-sticky launch examples/socketio_chat/app.py -w 4`.

Engine.IO's long-polling handshake spans several HTTP requests that must all reach the worker that
holds the session: ebpf-sticky keeps each client address on one worker. Broadcasts are another
matter: a message must reach clients on every worker, which needs a message queue. With
REDIS_URL set, python-socketio's Redis manager relays them; without it, they stay in one worker.

On stop (TERM, and the old worker of each slot on HUP) the app needs no hook: the worker closes
keep-alive connections and releases the Engine.IO sessions it finds in `app` itself, so clients
reconnect at once (to the slot's new worker on HUP) instead of holding the stop for pingInterval.

GET / serves a page using the official socket.io browser client (npm `socket.io-client`, found in
the repository's node_modules or at $SOCKETIO_CLIENT_JS).
"""

from __future__ import annotations

import logging
import os
import socket
from pathlib import Path
from typing import Any

import socketio

log = logging.getLogger("chat")
WORKER = os.environ.get("EBPF_STICKY_WORKER", "?")
# Which host answered, when several run behind a balancer (Kubernetes sets HOSTNAME to the pod's name).
HOST = os.environ.get("HOSTNAME") or socket.gethostname()
HERE = Path(__file__).resolve().parent
CLIENT_JS = Path(
    os.environ.get(
        "SOCKETIO_CLIENT_JS", HERE.parents[1] / "node_modules/socket.io-client/dist/socket.io.min.js"
    )
)

redis_url = os.environ.get("REDIS_URL")
if redis_url:
    manager: socketio.AsyncManager = socketio.AsyncRedisManager(redis_url)
else:
    manager = socketio.AsyncManager()
    logging.basicConfig(level=logging.INFO)
    log.warning("worker %s: REDIS_URL not set, so broadcasts stay within this worker", WORKER)

sio = socketio.AsyncServer(async_mode="asgi", client_manager=manager, cors_allowed_origins="*")


async def connect(sid: str, environ: dict[str, Any]) -> None:
    await sio.save_session(sid, {"name": sid[:6]})


async def whoami(sid: str) -> dict[str, Any]:
    """Which host and worker hold this session: lets clients and tests see stickiness."""
    return {"worker": WORKER, "host": HOST, "pid": os.getpid(), "sid": sid}


async def join(sid: str, data: dict[str, Any]) -> dict[str, Any]:
    room = str(data.get("room", "lobby"))
    async with sio.session(sid) as session:
        session["name"] = str(data.get("name", session["name"]))
    await sio.enter_room(sid, room)
    return {"room": room, "worker": WORKER}


async def say(sid: str, data: dict[str, Any]) -> dict[str, Any]:
    session = await sio.get_session(sid)
    message = {"room": data["room"], "from": session["name"], "text": data["text"], "worker": WORKER}
    await sio.emit("message", message, room=data["room"])
    return {"ok": True}


for handler in (connect, whoami, join, say):
    sio.on(handler.__name__, handler)


PAGE = """<!doctype html>
<html><head><meta charset="utf-8"><title>ebpf-sticky chat</title></head>
<body>
<h1>ebpf-sticky chat</h1>
<p id="status">connecting…</p>
<form id="form"><input id="room" value="lobby"> <input id="text" placeholder="message">
<button>send</button></form>
<ul id="log"></ul>
<script src="/socket.io.min.js"></script>
<script>
const socket = io({ transports: ["polling", "websocket"] });
const log = (t) => { const li = document.createElement("li"); li.textContent = t;
                     document.getElementById("log").appendChild(li); };
socket.on("connect", async () => {
  const me = await socket.emitWithAck("whoami");
  const room = document.getElementById("room").value;
  await socket.emitWithAck("join", { room, name: "browser" });
  document.getElementById("status").textContent = `joined ${room} on worker ${me.worker}`;
});
socket.on("message", (m) => log(`${m.from}@${m.worker}: ${m.text}`));
document.getElementById("form").onsubmit = (e) => {
  e.preventDefault();
  socket.emit("say", { room: document.getElementById("room").value,
                       text: document.getElementById("text").value });
};
</script>
</body></html>
"""


async def http_app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    if scope["path"] == "/socket.io.min.js" and CLIENT_JS.is_file():
        body, kind = CLIENT_JS.read_bytes(), b"application/javascript"
    elif scope["path"] == "/":
        body, kind = PAGE.encode(), b"text/html; charset=utf-8"
    else:
        await send({"type": "http.response.start", "status": 404, "headers": []})
        await send({"type": "http.response.body", "body": b"not found"})
        return
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", kind)]})
    await send({"type": "http.response.body", "body": body})


app = socketio.ASGIApp(sio, other_asgi_app=http_app)
