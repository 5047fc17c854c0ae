"""Finding the Engine.IO servers of an ASGI app, however it is wrapped."""

from __future__ import annotations

from typing import Any

import engineio
import socketio

from ebpf_sticky.supervisor.longpoll import engineio_servers


class Wrapper:
    """Middleware as most are written: the wrapped app in ``app``."""

    def __init__(self, app: Any) -> None:
        self.app = app


class Mount:
    def __init__(self, app: Any) -> None:
        self.app = app


class Router:
    """A Starlette-like router: mounted apps in ``routes``."""

    def __init__(self, *apps: Any) -> None:
        self.routes = [Mount(app) for app in apps]


async def plain(scope: Any, receive: Any, send: Any) -> None:
    pass


def test_a_socketio_app_is_found_through_its_server() -> None:
    sio = socketio.AsyncServer(async_mode="asgi")
    assert engineio_servers(socketio.ASGIApp(sio, other_asgi_app=plain)) == [sio.eio]


def test_an_engineio_app_behind_middleware_and_mounts() -> None:
    eio = engineio.AsyncServer(async_mode="asgi")
    sio = socketio.AsyncServer(async_mode="asgi")
    app = Wrapper(Router(plain, Wrapper(engineio.ASGIApp(eio)), socketio.ASGIApp(sio)))
    assert {id(server) for server in engineio_servers(app)} == {id(eio), id(sio.eio)}


def test_the_app_socketio_falls_back_to_is_walked_too() -> None:
    inner = socketio.AsyncServer(async_mode="asgi")
    outer = socketio.AsyncServer(async_mode="asgi")
    app = socketio.ASGIApp(outer, other_asgi_app=Wrapper(socketio.ASGIApp(inner)))
    assert {id(server) for server in engineio_servers(app)} == {id(outer.eio), id(inner.eio)}


def test_no_engineio_server_and_cycles_end() -> None:
    looped = Wrapper(plain)
    looped.app = Wrapper(looped)
    assert engineio_servers(looped) == []
    assert engineio_servers(plain) == []
