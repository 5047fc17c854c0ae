"""`ebpf-sticky` command line: parsing only; the work is done by the modules it calls."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence

from . import config, settings
from . import options as uvicorn_options
from ._version import __version__
from .api import serve
from .control import control_dir, find_instance, request, upgrade
from .errors import ConfigError, StickyError
from .hashing import DEFAULT_PREFIX4, DEFAULT_PREFIX6, parse_address
from .kernel.cbpf import MAX_CBPF_SLOTS
from .kernel.loaders import CHOICES, LOADERS
from .options import whole_number
from .settings import ENV_PREFIX, LOG_LEVELS, default_workers, env_twin


def _add_hash_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--hash-key",
        default=env_twin("hash-key"),
        metavar="HEX32",
        help="128-bit key as 32 hex digits (default: random per launch)",
    )
    parser.add_argument(
        "--prefix4",
        type=whole_number,
        default=env_twin("prefix4", str(DEFAULT_PREFIX4)),
        metavar="LENGTH",
        help="IPv4 clients in one prefix of this length share a worker (default 32)",
    )
    parser.add_argument(
        "--prefix6",
        type=whole_number,
        default=env_twin("prefix6", str(DEFAULT_PREFIX6)),
        metavar="LENGTH",
        help="IPv6 clients in one prefix of this length share a worker (default 64)",
    )


def _add_session_options(parser: argparse.ArgumentParser) -> None:
    keys = env_twin("session-key")
    parser.add_argument(
        "--session-key",
        action="append",
        metavar="KEY",
        default=None,
        help="keep a session on its worker by KEY whatever address it comes from: engineio, mcp, "
        "header:NAME, cookie:NAME, query:NAME or forwarded (repeatable; "
        f"{ENV_PREFIX}SESSION_KEY: one per line)",
    )
    parser.set_defaults(_session_key_env=[line.strip() for line in (keys or "").splitlines() if line.strip()])
    parser.add_argument(
        "--proxy-protocol",
        action="store_true",
        default=env_twin("proxy-protocol", "") not in ("", "0"),
        help="every connection starts with a PROXY protocol v1/v2 header, believed only from "
        "--forwarded-allow-ips: route and serve by the client it names",
    )


def _session_keys(args: argparse.Namespace) -> tuple[str, ...]:
    return tuple(args.session_key if args.session_key is not None else args._session_key_env)


def _versions() -> str:
    from importlib.metadata import PackageNotFoundError, version

    def of(name: str) -> str:
        try:
            return version(name)
        except PackageNotFoundError:
            return "not installed"

    return f"ebpf-sticky {__version__} (uvicorn {of('uvicorn')})"


def build_parser() -> argparse.ArgumentParser:
    """The commands and their options. Each launch option's default is its EBPF_STICKY_* twin when
    set: argparse converts (and checks) string defaults with the option's type, so a bad twin is
    reported like a bad flag."""
    parser = argparse.ArgumentParser(
        prog="ebpf-sticky",
        description="Sticky sessions for multi-process servers, routed by the kernel.",
    )
    parser.add_argument("--version", action="version", version=_versions())
    sub = parser.add_subparsers(dest="command", required=True)

    launch = sub.add_parser(
        "launch",
        help="serve TARGET (or -- COMMAND) with sticky workers",
        usage="ebpf-sticky launch TARGET [options] | ebpf-sticky launch [options] -- COMMAND",
    )
    launch.add_argument("target", nargs="?", help="path/app.py, path/app.py:attr or package.module:attr")
    launch.add_argument(
        "-w",
        "--workers",
        type=whole_number,
        default=env_twin("workers", str(default_workers())),
        metavar="N",
        help="worker processes, one per slot (default: CPUs)",
    )
    launch.add_argument(
        "-b",
        "--bind",
        default=env_twin("bind", config.DEFAULT_BIND),
        metavar="HOST:PORT",
        help="HOST:PORT; [::]:PORT is dual-stack (default 127.0.0.1:8000)",
    )
    launch.add_argument(
        "--udp",
        action="store_true",
        default=env_twin("udp", "") not in ("", "0"),
        help="UDP sockets, for -- COMMAND servers",
    )
    launch.add_argument(
        "--loader",
        choices=CHOICES,
        default=env_twin("loader", "auto"),
        help="auto (default): native if the kernel allows eBPF, else cbpf; native: eBPF built in "
        "Python; bcc: compile bpf/select.c; cbpf: classic BPF, no privilege, "
        f"at most {MAX_CBPF_SLOTS} workers",
    )
    launch.add_argument(
        "--factory",
        action="store_true",
        default=env_twin("factory", "") not in ("", "0"),
        help="TARGET is a callable that returns the app",
    )
    launch.add_argument(
        "--graceful-timeout",
        "--timeout-graceful-shutdown",
        dest="graceful_timeout",
        type=float,
        default=env_twin("graceful-timeout", env_twin("timeout-graceful-shutdown", "30")),
        metavar="SECONDS",
        help="seconds workers get to finish on TERM, HUP or TTOU (default 30); "
        "--timeout-graceful-shutdown is uvicorn's name for it",
    )
    launch.add_argument(
        "--user",
        default=env_twin("user"),
        metavar="USER",
        help="workers run as this user (a root master's default: ebpf-sticky if it exists, else nobody; "
        "--user root keeps uid 0)",
    )
    launch.add_argument(
        "--group", default=env_twin("group"), metavar="GROUP", help="workers run as this group"
    )
    launch.add_argument(
        "--pid-file", default=env_twin("pid-file"), metavar="FILE", help="write the master's pid here"
    )
    launch.add_argument(
        "--metrics",
        default=env_twin("metrics"),
        metavar="HOST:PORT",
        help="serve Prometheus metrics at http://HOST:PORT/metrics (default: off)",
    )
    launch.add_argument(
        "--log-level",
        default=env_twin("log-level", "info"),
        choices=LOG_LEVELS,
        help="the master's log level, and uvicorn's in the workers (default info)",
    )
    _add_hash_options(launch)
    _add_session_options(launch)
    uvicorn_options.add_arguments(launch, env_twin)

    route = sub.add_parser("route", help="which worker slot serves each ADDRESS")
    route.add_argument("addresses", nargs="+", metavar="ADDRESS")
    route.add_argument(
        "-w",
        "--workers",
        type=whole_number,
        default=None,
        help="with --hash-key: compute offline for this many workers",
    )
    route.add_argument(
        "--loader",
        choices=list(LOADERS),
        default="native",
        help="with --hash-key: the router the instance runs (its `status` says; default native)",
    )
    route.add_argument("--port", type=whole_number, default=None, help="the running instance on this port")
    _add_hash_options(route)

    status = sub.add_parser("status", help="slots, pids and connections routed of a running instance")
    status.add_argument("--port", type=whole_number, default=None)
    status.add_argument("--json", action="store_true")

    upgrade = sub.add_parser(
        "upgrade",
        help="replace a running master in place with what is installed now (as SIGUSR2 does)",
    )
    upgrade.add_argument("--port", type=whole_number, default=None)

    sub.add_parser("doctor", help="check that this machine can run ebpf-sticky, with fixes")
    return parser


def launch_settings(args: argparse.Namespace, command: Sequence[str]) -> config.Launch:
    return settings.launch_settings(
        target=args.target,
        command=command,
        bind=args.bind,
        workers=args.workers,
        udp=args.udp,
        loader=args.loader,
        factory=args.factory,
        graceful_timeout=args.graceful_timeout,
        user=args.user,
        group=args.group,
        pid_file=args.pid_file,
        metrics=args.metrics,
        log_level=args.log_level,
        hash_key=args.hash_key,
        prefix4=args.prefix4,
        prefix6=args.prefix6,
        uvicorn=uvicorn_options.from_args(args),
        session_keys=_session_keys(args),
        proxy_protocol=args.proxy_protocol,
    )


def cmd_launch(args: argparse.Namespace, command: Sequence[str]) -> int:
    return serve(launch_settings(args, command))


def cmd_route(args: argparse.Namespace) -> int:
    if args.hash_key is not None:
        if args.workers is None:
            raise ConfigError("route with --hash-key needs --workers N (the slot count) too")
        spec = config.hash_spec(config.parse_key(args.hash_key), args.prefix4, args.prefix6)
        loader = LOADERS[args.loader]
        workers = config.check_workers(args.workers, loader.max_slots, args.loader)
        for text in args.addresses:
            try:
                address = parse_address(text)
            except ValueError:
                raise ConfigError(f"{text!r} is not an IP address") from None
            print(f"{text} {loader.slot_of(address, spec, workers)}")
        return 0
    if args.workers is not None:
        raise ConfigError("route --workers needs --hash-key too (the key decides the slots)")
    answer = request(find_instance(control_dir(), args.port), {"cmd": "route", "addresses": args.addresses})
    if "loader" in answer:
        print(f"router: {answer['loader']}")
    for row in answer["routes"]:
        pids = ",".join(map(str, row["pids"])) or "-"
        print(f"{row['address']} {row['slot']} pid={pids}")
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    answer = request(find_instance(control_dir(), args.port), {"cmd": "status"})
    if args.json:
        print(json.dumps(answer, indent=2))
        return 0
    print(
        f"ebpf-sticky pid {answer['pid']}: {answer['protocol']} {answer['bind']}, {answer['loader']} loader, "
        f"{answer['phase']}, up {answer['uptime']:.0f} s, "
        + (
            "no counters (classic BPF)"
            if answer["failures"] is None
            else f"{answer['failures']} routing failures"
        )
    )
    sessions = "source_concentration" in answer
    print("slot  pids          routed" + ("  moved-out  moved-in  unknown-keys" if sessions else ""))
    for row in answer["slots"]:
        pids = ",".join(map(str, row["pids"])) or "-"
        # The cbpf router has no map to count in: no per-slot figures rather than made-up ones.
        routed = "-" if row["routed"] is None else row["routed"]
        line = f"{row['slot']:>4}  {pids:<12}  {routed:<6}"
        if sessions:
            moves = row["sessions"]
            line += f"  {moves['moved_out']:>9}  {moves['moved_in']:>8}  {moves['unknown']:>12}"
        print(line.rstrip())
    for warning in answer.get("warnings", []):
        print(f"warning: {warning}")
    return 0


def cmd_upgrade(args: argparse.Namespace) -> int:
    now = upgrade(find_instance(control_dir(), args.port))
    print(
        f"upgraded: pid {now['pid']} runs ebpf-sticky {now['version']} (generation {now['generation']}); "
        "its workers are renewed slot by slot"
    )
    return 0


def report(exc: StickyError) -> int:
    """The one line every user-facing error becomes; returns the exit status it calls for."""
    print(f"ebpf-sticky: error: {exc}", file=sys.stderr)
    return exc.exit_code


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    command: list[str] = []
    if "--" in argv:
        split = argv.index("--")
        argv, command = argv[:split], argv[split + 1 :]
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        if command and args.command != "launch":
            raise ConfigError("'-- COMMAND' goes with launch only")
        if args.command == "launch":
            return cmd_launch(args, command)
        if args.command == "route":
            return cmd_route(args)
        if args.command == "status":
            return cmd_status(args)
        if args.command == "upgrade":
            return cmd_upgrade(args)
        from .doctor import run_doctor

        return run_doctor()
    except StickyError as exc:
        return report(exc)
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # `ebpf-sticky status | head`: the reader is gone. Point stdout at /dev/null so the
        # interpreter's final flush does not fail again, and say nothing (as cat does).
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 1
