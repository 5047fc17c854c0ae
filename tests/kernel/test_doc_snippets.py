"""The Router snippet of the Python API reference runs as written and routes a real connection to
its slot."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

PAGE = Path(__file__).parents[2] / "docs" / "reference" / "python-api.md"


def test_the_router_snippet_routes_a_connection_to_its_slot() -> None:
    blocks = re.findall(r"```python\n(.*?)```", PAGE.read_text(), re.S)
    snippet = next(block for block in blocks if "Router.open" in block)
    proc = subprocess.run([sys.executable, "-c", snippet], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert re.match(r"\('127\.0\.0\.9', \d+\) -> \d Counters\(per_slot=\(", proc.stdout), proc.stdout
    assert "failures=0" in proc.stdout
