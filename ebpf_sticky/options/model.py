"""The validated uvicorn options of one launch, as the master hands them to each worker."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any

from .table import DEFAULT_BACKLOG, DEFAULT_RELOAD_DELAY


@dataclass(frozen=True)
class Reload:
    dirs: tuple[str, ...] = ()
    includes: tuple[str, ...] = ()
    excludes: tuple[str, ...] = ()
    delay: float = DEFAULT_RELOAD_DELAY


@dataclass(frozen=True)
class WorkerOptions:
    """The validated uvicorn options of one launch."""

    config: dict[str, Any] = field(default_factory=dict)  # uvicorn.Config keywords, given ones only
    env_file: str | None = None
    app_dir: str | None = None
    interface: str = "auto"
    limit_max_requests: int | None = None
    limit_max_requests_jitter: int = 0
    backlog: int = DEFAULT_BACKLOG
    reload: Reload | None = None

    @property
    def python_only(self) -> bool:
        """Options a `-- COMMAND` worker would silently ignore."""
        given = self.config or self.env_file or self.app_dir or self.limit_max_requests
        return bool(given or self.interface != "auto")

    def files(self) -> list[tuple[str, str]]:
        """(flag, path) of each file a worker reads for these options (TLS, --env-file)."""
        named = {
            f"--{k.replace('_', '-')}": self.config.get(k)
            for k in ("ssl_certfile", "ssl_keyfile", "ssl_ca_certs")
        }
        named["--env-file"] = self.env_file
        return [(flag, str(path)) for flag, path in named.items() if path is not None]

    def to_json(self) -> str:
        """What the master hands each worker (on ``contract.OPTIONS_FD``: the key's password stays
        out of argv and the environment)."""
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> WorkerOptions:
        data = json.loads(text)
        reload = data.pop("reload")
        if reload is not None:
            lists = {name: tuple(reload.pop(name)) for name in ("dirs", "includes", "excludes")}
            reload = Reload(**lists, delay=reload["delay"])
        return cls(**data, reload=reload)
