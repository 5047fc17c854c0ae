"""uvicorn's own options on `ebpf-sticky launch`: their definitions, validation, and where each goes.

A uvicorn user swaps `uvicorn app:app --workers 4 --ssl-certfile …` for `ebpf-sticky launch app:app
--workers 4 --ssl-certfile …`: every uvicorn option that means something per worker keeps uvicorn's
name, meaning and default (two exceptions: ``ACCESS_LOG``, ``DEFAULT_JITTER_SHARE``). Each goes to one of
three places:

* ``config``: a keyword of each worker's ``uvicorn.Config`` (passed only when given, so the
  installed uvicorn's own default applies otherwise);
* ``worker``: done by our worker around uvicorn (the env file and app dir before the import, the
  request count behind recycling);
* ``master``: done by the master (the listen backlog, the reloader, ``--host``/``--port``).

``LEFT_OUT`` names each uvicorn option deliberately absent, with the reason; a test holds it against
the installed ``uvicorn --help``.

By job: ``table`` (the options as data), ``model`` (the validated ``WorkerOptions`` a worker
receives), ``arguments`` (argparse and ``EBPF_STICKY_*`` twins), ``keywords`` (``run()``'s
keywords, by ``uvicorn.run``'s names), ``validate`` (parsed arguments to ``WorkerOptions``, pure)
and ``files`` (the master's checks of the files named, before any worker).
"""

from __future__ import annotations

from .arguments import add_arguments, bind_text, whole_number
from .files import check_files, check_tls
from .keywords import from_keywords
from .model import Reload, WorkerOptions
from .table import (
    ACCESS_LOG,
    DEFAULT_BACKLOG,
    DEFAULT_JITTER_SHARE,
    DEFAULT_RELOAD_DELAY,
    HTTPS,
    LEFT_OUT,
    LOOPS,
    OPTIONS,
    WSS,
    Option,
)
from .validate import from_args, parse

__all__ = [
    "ACCESS_LOG",
    "DEFAULT_BACKLOG",
    "DEFAULT_JITTER_SHARE",
    "DEFAULT_RELOAD_DELAY",
    "HTTPS",
    "LEFT_OUT",
    "LOOPS",
    "OPTIONS",
    "WSS",
    "Option",
    "Reload",
    "WorkerOptions",
    "add_arguments",
    "bind_text",
    "check_files",
    "check_tls",
    "from_args",
    "from_keywords",
    "parse",
    "whole_number",
]
