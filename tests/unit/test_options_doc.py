"""docs/reference/launch-options.md is generated from the option tables: it fails here when the
page and the tables drift (run scripts/gen-options-doc), and it names every launch option."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path
from types import ModuleType

from ebpf_sticky.cli import build_parser

SCRIPT = Path(__file__).parents[2] / "scripts" / "gen_options_doc.py"


def generator() -> ModuleType:
    spec = importlib.util.spec_from_file_location("gen_options_doc", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_committed_page_is_what_the_tables_generate() -> None:
    gen = generator()
    assert gen.PAGE.read_text() == gen.render(), (
        "docs/reference/launch-options.md drifted: run scripts/gen-options-doc"
    )


def test_the_page_names_every_launch_option_and_its_twin() -> None:
    page = generator().render()
    launch = build_parser().parse_args(["launch", "app.py"])
    flags = set(re.findall(r"^#{3,4} .*?`(--[a-z0-9-]+)", page, re.M))
    options = {name.replace("_", "-") for name in vars(launch) if not name.startswith("_")}
    assert options - {"command", "target"} <= {flag[2:] for flag in flags}
    assert page.count("Environment: `EBPF_STICKY_") == len(flags)
