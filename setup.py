"""The one thing pyproject.toml cannot say to every setuptools this project builds with: the C
search behind ``--session-key`` (``ebpf_sticky/sessions/_headscan.c``). Optional: where no C
compiler is at hand the install still succeeds, and the same search runs in Python (slower by about
a microsecond a request; ``ebpf-sticky doctor`` says which one a deployment has)."""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension("ebpf_sticky.sessions._headscan", ["ebpf_sticky/sessions/_headscan.c"], optional=True)
    ]
)
