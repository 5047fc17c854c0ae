def handler(environ, start_response):  # type: ignore[no-untyped-def]
    return []


def make_server():  # type: ignore[no-untyped-def]
    return handler
