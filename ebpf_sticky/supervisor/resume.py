"""The entry point of an upgraded master:
``python -m ebpf_sticky.supervisor.resume [--check] FD -- COMMAND LINE AS LAUNCHED``.

FD is the memfd holding the handover (``upgrade.py``). With ``--check`` it only proves that the
installed code can take over: it imports everything the master runs, reads and validates the
handover, and exits 0, or prints one line saying why not and exits 1. Its imports are inside
``main`` so that a broken install is reported as that one line, not a traceback. State the
installed code would refuse (a session table of another layout or key) exits ``REFUSED``.
"""

from __future__ import annotations

import sys

REFUSED = 3  # --check: the install starts, but refuses what the master would hand over


def main(argv: list[str]) -> int:
    check = argv[:1] == ["--check"]
    state_fd = int(argv[1 if check else 0])  # what follows is only for ps to show
    try:
        from ..errors import HandoverError, StickyError
        from .loop import check_handover, configure_logging, resume
        from .upgrade import read_state

        handover = read_state(state_fd)
    except BaseException as exc:  # anything at all: the old master reports this line
        print(f"{type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    if check:
        try:
            check_handover(handover)
        except HandoverError as exc:
            print(exc, file=sys.stderr)
            return REFUSED
        return 0
    configure_logging(handover.launch.log_level)
    try:
        return resume(handover, state_fd)
    except StickyError as exc:
        print(f"ebpf-sticky: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
