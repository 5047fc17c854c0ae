"""The project's errors. Every message names the cause and the fix, on one line."""

from __future__ import annotations


class StickyError(Exception):
    """Base of every error ebpf-sticky raises on purpose; the CLI prints it as one line."""

    exit_code = 2


class ConfigError(StickyError):
    """Bad user input: a flag, an address, a key, a target."""


class KernelError(StickyError):
    """The kernel refused an operation."""

    exit_code = 3

    def __init__(self, message: str, errno: int = 0) -> None:
        super().__init__(message)
        self.errno = errno


class PrivilegeError(KernelError):
    """The kernel said EPERM: a capability is missing, or a filter denies what they would allow.

    ``fix`` is the part of the message that says what to do (``doctor`` prints it on its own line).
    """

    def __init__(self, message: str, errno: int = 0, fix: str = "") -> None:
        super().__init__(message, errno)
        self.fix = fix


class BpfDeniedError(PrivilegeError):
    """CAP_BPF (or CAP_SYS_ADMIN) and CAP_NET_ADMIN are held, yet bpf(2) says EPERM: a seccomp
    filter or an LSM denies it (container runtimes' default profiles do, without CAP_SYS_ADMIN)."""


class LockdownError(KernelError):
    """The workers' privileges cannot be dropped, or their seccomp filter cannot be installed:
    workers are not started rather than started privileged."""


class UnsupportedKernelError(KernelError):
    """The running kernel lacks a feature the router needs."""


class VerifierError(KernelError):
    """The BPF verifier rejected the program; the message carries its log."""

    def __init__(self, message: str, log: str, errno: int = 0) -> None:
        super().__init__(message, errno)
        self.log = log


class AddressInUseError(KernelError):
    """The port is held by a socket that is not part of a SO_REUSEPORT group we can join."""


class LoaderUnavailableError(StickyError):
    """The requested loader (bcc) cannot run here: package or headers missing."""


class ControlError(StickyError):
    """No running instance to talk to, or it refused us."""


class AppLoadError(StickyError):
    """No worker could load or start the app."""

    exit_code = 4


class UpgradeError(StickyError):
    """An in-place upgrade that did not happen; the running master goes on as it was."""


class HandoverError(StickyError):
    """What the running master would hand over does not fit the installed version (the session
    table of another layout or key): the upgrade is refused before the exec."""
