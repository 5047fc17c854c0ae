from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    # Kernel and e2e tests need root; say so plainly instead of failing with EPERM noise.
    if os.geteuid() != 0:
        for item in items:
            if "kernel" in item.path.parts or "e2e" in item.path.parts:
                item.add_marker(pytest.mark.skip(reason="needs root (real BPF): run via .ci/run"))
