"""ebpf-sticky: sticky sessions for multi-process servers, routed in the kernel by eBPF."""

from ._version import __version__
from .addresses import Bind, parse_bind
from .api import run
from .errors import (
    AddressInUseError,
    AppLoadError,
    BpfDeniedError,
    ConfigError,
    ControlError,
    KernelError,
    LoaderUnavailableError,
    LockdownError,
    PrivilegeError,
    StickyError,
    UnsupportedKernelError,
    VerifierError,
)
from .hashing import HashSpec, parse_address, slot_of
from .kernel.router import Counters, Router
from .stopping import on_stop

__all__ = [
    "__version__",
    "AddressInUseError",
    "AppLoadError",
    "Bind",
    "BpfDeniedError",
    "ConfigError",
    "ControlError",
    "Counters",
    "HashSpec",
    "KernelError",
    "LoaderUnavailableError",
    "LockdownError",
    "PrivilegeError",
    "Router",
    "StickyError",
    "UnsupportedKernelError",
    "VerifierError",
    "parse_address",
    "parse_bind",
    "on_stop",
    "run",
    "slot_of",
]
