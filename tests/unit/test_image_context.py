"""What the Dockerfile copies from the build context survives .dockerignore: a file the Dockerfile
names but the ignore file leaves out stops every image build at its COPY, and only the podman
tests (rarely run) would see it."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

ROOT = Path(__file__).parents[2]


def pattern_regex(pattern: str) -> re.Pattern[str]:
    """A .dockerignore pattern as a regex over slash-separated paths: `*` and `?` stay within one
    name, `**` spans directories (the builders' patternmatcher rules)."""
    parts = re.split(r"(\*\*/|\*\*|\*|\?)", pattern.strip("/"))
    wildcards = {"**/": "(?:.*/)?", "**": ".*", "*": "[^/]*", "?": "[^/]"}
    return re.compile("".join(wildcards.get(part, re.escape(part)) for part in parts))


def ignored(path: str, rules: list[str]) -> bool:
    """Whether the builder leaves ``path`` out: the last rule matching it or a parent directory
    decides, and a `!` rule brings the path back."""
    prefixes = ["/".join(path.split("/")[:n]) for n in range(1, path.count("/") + 2)]
    excluded = False
    for rule in rules:
        negated = rule.startswith("!")
        regex = pattern_regex(rule.removeprefix("!"))
        if any(regex.fullmatch(prefix) for prefix in prefixes):
            excluded = not negated
    return excluded


def dockerignore_rules() -> list[str]:
    lines = (ROOT / ".dockerignore").read_text().splitlines()
    return [line.strip() for line in lines if line.strip() and not line.startswith("#")]


def context_sources() -> list[str]:
    """The sources of the Dockerfile's COPY instructions that read the build context (not another
    stage's files: those carry --from)."""
    sources: list[str] = []
    for line in (ROOT / "Dockerfile").read_text().replace("\\\n", " ").splitlines():
        if not line.startswith("COPY "):
            continue
        words = shlex.split(line)
        if not any(word.startswith("--from") for word in words):
            sources += [word for word in words[1:-1] if not word.startswith("--")]
    return sources


def files_of(source: str) -> list[str]:
    path = ROOT / source
    found = sorted(path.rglob("*")) if path.is_dir() else [path]
    # Not what a build leaves in the tree (bytecode, a C extension built in place): the image
    # builds its own.
    return [
        str(file.relative_to(ROOT))
        for file in found
        if file.is_file() and "__pycache__" not in file.parts and file.suffix != ".so"
    ]


def test_every_file_the_dockerfile_copies_reaches_the_builder() -> None:
    rules = dockerignore_rules()
    sources = context_sources()
    assert {"pyproject.toml", "setup.py", "LICENSE", "ebpf_sticky"} <= set(sources), sources
    for source in sources:
        files = files_of(source)
        assert files, f"the Dockerfile copies {source}, which is not in the tree"
        left_out = [file for file in files if ignored(file, rules)]
        assert not left_out, f".dockerignore leaves out what the Dockerfile copies: {left_out}"


def test_the_builder_gets_no_more_than_the_image_needs() -> None:
    rules = dockerignore_rules()
    for path in ("tests/e2e/test_container.py", "docs/index.md", "bench", "lab", "node_modules/x.js"):
        assert ignored(path, rules), path
    assert ignored("ebpf_sticky/__pycache__/cli.cpython-311.pyc", rules)
    assert ignored("ebpf_sticky/sessions/_headscan.cpython-311-x86_64-linux-gnu.so", rules)
    assert not ignored("examples/hello/app.py", rules)
