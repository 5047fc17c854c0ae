"""The wheel is complete: built from this tree and installed with its dependencies into a fresh
venv without the system's site packages, it runs `ebpf-sticky --version`, carries its license and
its C head search."""

from __future__ import annotations

import shutil
import subprocess
import sys
import venv
import zipfile
from pathlib import Path

import ebpf_sticky

ROOT = Path(__file__).parents[2]


def test_the_wheel_installs_and_runs_in_a_bare_venv(tmp_path: Path) -> None:
    # From a copy of what the wheel is made of, as the Dockerfile does: a stale build/ directory in
    # the tree would otherwise fill in a package that pyproject.toml forgot to list.
    source = tmp_path / "src"
    shutil.copytree(
        ROOT / "ebpf_sticky", source / "ebpf_sticky", ignore=shutil.ignore_patterns("__pycache__")
    )
    for name in ("pyproject.toml", "setup.py", "README.md", "LICENSE"):
        shutil.copy(ROOT / name, source)
    build: list[str | Path] = [
        sys.executable,
        "-m",
        "pip",
        "wheel",
        "-q",
        "--no-deps",
        "--no-build-isolation",
    ]
    subprocess.run([*build, "-w", tmp_path, source], check=True, timeout=300)
    (wheel,) = tmp_path.glob("ebpf_sticky-*.whl")
    # A C extension in it: the wheel is for this Python and platform.
    assert wheel.name.startswith(f"ebpf_sticky-{ebpf_sticky.__version__}-cp3"), wheel.name
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
        metadata = archive.read(f"ebpf_sticky-{ebpf_sticky.__version__}.dist-info/METADATA").decode()
    assert any(name.endswith(".dist-info/LICENSE") for name in names), names
    assert "ebpf_sticky/kernel/select.c" in names and "ebpf_sticky/py.typed" in names
    assert any(name.startswith("ebpf_sticky/sessions/_headscan.") and name.endswith(".so") for name in names)
    assert "License: MIT" in metadata and "Classifier: License :: OSI Approved :: MIT License" in metadata

    env_dir = tmp_path / "venv"
    venv.EnvBuilder(with_pip=True, system_site_packages=False).create(env_dir)
    python = env_dir / "bin" / "python"
    subprocess.run([python, "-m", "pip", "install", "-q", wheel], check=True, timeout=600)
    # Run from elsewhere, so the source tree cannot stand in for the installed package.
    version = subprocess.run(
        [env_dir / "bin" / "ebpf-sticky", "--version"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        check=True,
    ).stdout
    assert version.startswith(f"ebpf-sticky {ebpf_sticky.__version__} (uvicorn "), version
    assert "not installed" not in version
    native = "from ebpf_sticky.sessions import prefilter; print(prefilter.NATIVE)"
    built = subprocess.run([python, "-c", native], capture_output=True, text=True, cwd=tmp_path, check=True)
    assert built.stdout == "True\n"  # the C head search, not its Python stand-in
    site = subprocess.run(
        [python, "-c", "import sys; print(sys.flags.no_site, [p for p in sys.path if 'dist-packages' in p])"],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    assert site.strip() == "0 []"  # the venv sees no system site packages (Debian's bcc lives there)
