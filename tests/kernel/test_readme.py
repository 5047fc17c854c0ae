"""The README's Router snippet runs as written and routes a real connection to its slot."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path


def test_readme_router_snippet() -> None:
    readme = (Path(__file__).parents[2] / "README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", readme, re.S)
    snippet = next(block for block in blocks if "Router.open" in block)
    proc = subprocess.run([sys.executable, "-c", snippet], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert re.match(r"\('127\.0\.0\.9', \d+\) -> \d Counters\(per_slot=\(", proc.stdout), proc.stdout
    assert "failures=0" in proc.stdout
