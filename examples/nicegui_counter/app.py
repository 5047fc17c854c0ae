"""A NiceGUI page whose state lives in the worker that rendered it, for session affinity.

    ebpf-sticky launch examples/nicegui_counter/app.py -w 4 \
        --session-key engineio:/_nicegui_ws/socket.io/

NiceGUI keeps every open page (its elements, its state, the handlers of its buttons) in the
memory of the process that rendered it: the page's Socket.IO connection carries the page's
``client_id``, and must reach that process, or the browser reloads the page and the state is
lost. The page load and its socket follow each other within a second from the same address, so
address hashing keeps them together; the session key keeps a long-polling fallback (proxies that
refuse WebSockets) on that worker even when the client's address changes.

The page shows the pid of its worker and a counter kept in that worker's memory: clicks that keep
counting from the same pid show the page stayed put.

With ``STORAGE_SECRET`` set, NiceGUI's storage gives each browser a ``session`` cookie with its
first page; ``--session-key cookie:session`` then keeps the browser on the worker that rendered
that page, even when its socket starts from another address:

    STORAGE_SECRET=... ebpf-sticky launch examples/nicegui_counter/app.py -w 4 \
        --session-key engineio:/_nicegui_ws/socket.io/ --session-key cookie:session
"""

from __future__ import annotations

import os

from fastapi import FastAPI
from nicegui import ui

app = FastAPI()


@ui.page("/")
def counter() -> None:
    clicks = 0
    label = ui.label(f"worker pid {os.getpid()}: {clicks} clicks")

    def click() -> None:
        nonlocal clicks
        clicks += 1
        label.text = f"worker pid {os.getpid()}: {clicks} clicks"

    ui.button("Click", on_click=click)


ui.run_with(
    app,
    title="ebpf-sticky counter",
    show_welcome_message=False,
    storage_secret=os.environ.get("STORAGE_SECRET"),  # unset: no storage, no cookie
)
