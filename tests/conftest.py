from __future__ import annotations

import os
import shutil
import stat
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    # Kernel and e2e tests need root; say so plainly instead of failing with EPERM noise.
    if os.geteuid() != 0:
        for item in items:
            if "kernel" in item.path.parts or "e2e" in item.path.parts:
                item.add_marker(pytest.mark.skip(reason="needs root (real BPF): run via .ci/run"))


@pytest.fixture
def world_readable_apps() -> Iterator[Path]:
    # pytest's tmp dirs are private to root; a worker dropped to nobody must read the app.
    from support.launcher import APPS

    directory = Path(tempfile.mkdtemp(prefix="ebpf-sticky-apps-"))
    try:
        shutil.copy(APPS / "asgi_app.py", directory)
        directory.chmod(stat.S_IRWXU | stat.S_IRGRP | stat.S_IXGRP | stat.S_IROTH | stat.S_IXOTH)
        yield directory
    finally:
        shutil.rmtree(directory)
