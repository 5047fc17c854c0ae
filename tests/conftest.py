from __future__ import annotations

import importlib.util
import os
import shutil
import stat
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))


def _bcc_missing() -> str | None:
    """Why the bcc loader cannot run here, or None."""
    if importlib.util.find_spec("bcc") is None:
        return "needs bcc (Debian: python3-bpfcc)"
    if not Path(f"/lib/modules/{os.uname().release}/build").exists():
        return "needs the running kernel's headers (scripts/setup links them)"
    return None


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    # Every kernel and e2e test needs root and real BPF: marked `root` here rather than module by
    # module, so `-m "not root"` selects what runs anywhere. Tests of the bcc loader are marked
    # `bcc` where they are written. Missing either is a skip that says why, not EPERM noise.
    bcc_missing = _bcc_missing()
    for item in items:
        if "kernel" in item.path.parts or "e2e" in item.path.parts:
            item.add_marker(pytest.mark.root)
        if "root" in item.keywords and os.geteuid() != 0:
            item.add_marker(pytest.mark.skip(reason="needs root (real BPF): run via .ci/run"))
        elif "bcc" in item.keywords and bcc_missing:
            item.add_marker(pytest.mark.skip(reason=bcc_missing))


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
