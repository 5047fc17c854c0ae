import os


def application(environ, start_response):  # type: ignore[no-untyped-def]
    start_response("200 OK", [("Content-Type", "text/plain")])
    return [f"{os.environ['EBPF_STICKY_WORKER']} {os.getpid()} {os.getuid()}\n".encode()]


def create_app():  # type: ignore[no-untyped-def]
    return application
