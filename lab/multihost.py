"""The multi-host lab: ebpf-sticky behind an L4 balancer that hashes the client address.

    clients ──▶ lb ──▶ host-a   ebpf-sticky launch examples/socketio_chat/app.py -w 4
    (4096       │  └─▶ host-b   ebpf-sticky launch examples/socketio_chat/app.py -w 4
    addresses)  └───▶ redis     redis-server: python-socketio's Redis manager relays broadcasts

Every box is a network namespace, every arrow a veth pair, every address in 198.18.0.0/15 (the
benchmarking range) or fd00::/8: nothing leaves the namespaces the lab made. `lb` routes between
its links and DNATs the service address with nftables, `jhash ip saddr` (`ip6 saddr`) over a
bucket map: the balancer picks a host from the client's address and keeps that address, so each
host's kernel program picks the worker from it too. Draining a host rewrites its buckets in one
nftables transaction.

The network is described as data (`Topology`, `Service`) and built with pyroute2;
tests/e2e/test_multihost.py and `scripts/lab up|test|down|drain` use this one module. Everything a
lab starts runs inside its namespaces, so `down` (and the test's `finally`) find and stop it by
namespace, then remove the namespaces: a half-built lab cleans up the same way.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import ipaddress
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from ebpf_sticky.control import control_dir, request, socket_name
from ebpf_sticky.errors import ControlError

T = TypeVar("T")
CLONE_NEWNET = 0x40000000
IFA_F_NODAD = 0x02  # no duplicate address detection: an IPv6 address is usable at once
NETNS_DIR = Path("/run/netns")
DEFAULT = {4: "0.0.0.0/0", 6: "::/0"}
ROOT = Path(__file__).resolve().parents[1]
CHAT_APP = ROOT / "examples" / "socketio_chat" / "app.py"
TABLE = "ebpf_sticky_lab"


@dataclass(frozen=True)
class Link:
    """A veth pair: ``a`` is the router side (``.1`` of each subnet), ``b`` the leaf (``.2``)."""

    a: str
    b: str
    subnets: tuple[str, ...]  # one per IP version

    def address(self, node: str, version: int = 4) -> str:
        net = next(n for n in map(ipaddress.ip_network, self.subnets) if n.version == version)
        return str(net[1] if node == self.a else net[2])

    def prefixes(self) -> Iterator[tuple[int, int]]:
        """(IP version, prefix length) of each subnet."""
        for net in map(ipaddress.ip_network, self.subnets):
            yield net.version, net.prefixlen


@dataclass(frozen=True)
class Topology:
    """Namespaces and the veth pairs between them. Leaves route everything through their link's
    router end; a router forwards, and reaches each leaf's ``local_ranges`` through that leaf."""

    nodes: tuple[str, ...]
    links: tuple[Link, ...] = ()
    # Whole prefixes answered by a node's loopback (`ip route add local P dev lo`): a client can
    # bind any address in them, thousands of sources at no cost.
    local_ranges: tuple[tuple[str, str], ...] = ()
    # Extra addresses on a node's loopback, e.g. the balancer's service address.
    loopback: tuple[tuple[str, str], ...] = ()

    def address(self, node: str, version: int = 4) -> str:
        """``node``'s address on its (first) link."""
        return next(link.address(node, version) for link in self.links if node in (link.a, link.b))


@dataclass(frozen=True)
class Service:
    """What runs on the topology: the balancer, the hosts behind it, Redis, the clients."""

    balancer: str = "lb"
    hosts: tuple[str, ...] = ("host-a", "host-b")
    redis: str = "redis"
    clients: str = "clients"
    vip: str = "198.18.0.80"
    vip6: str = "fd00:18::80"
    bind_host: str = "::"  # dual-stack
    port: int = 8000
    redis_port: int = 6379
    buckets: int = 16  # balancer buckets: draining a host moves only its own

    def bind(self) -> str:
        """The hosts' `--bind`."""
        host = f"[{self.bind_host}]" if ":" in self.bind_host else self.bind_host
        return f"{host}:{self.port}"

    def url(self, version: int = 4) -> str:
        """The service as clients reach it, through the balancer."""
        return f"http://{self.vip}:{self.port}" if version == 4 else f"http://[{self.vip6}]:{self.port}"


TOPOLOGY = Topology(
    nodes=("clients", "lb", "host-a", "host-b", "redis"),
    links=(
        Link("lb", "clients", ("198.18.1.0/24", "fd00:18:1::/64")),
        Link("lb", "host-a", ("198.18.2.0/24", "fd00:18:2::/64")),
        Link("lb", "host-b", ("198.18.3.0/24", "fd00:18:3::/64")),
        Link("lb", "redis", ("198.18.4.0/24",)),
    ),
    local_ranges=(("clients", "198.18.128.0/20"), ("clients", "fd00:18:8000::/48")),
    loopback=(("lb", "198.18.0.80"), ("lb", "fd00:18::80")),
)
SERVICE = Service()
CLIENT_RANGE, CLIENT_RANGE6 = (ipaddress.ip_network(prefix) for _, prefix in TOPOLOGY.local_ranges)


def client_sources(count: int, version: int = 4) -> list[str]:
    """``count`` distinct client addresses from the clients' range; IPv6 ones each in a /64 of
    its own, since ebpf-sticky (like most) treats a /64 as one client."""
    if version == 6:
        return [str(CLIENT_RANGE6[(i << 64) + 7]) for i in range(count)]
    hosts = CLIENT_RANGE.hosts()
    return [str(next(hosts)) for _ in range(count)]


# Decisions: pure functions of the description.


def bucket_owners(hosts: Sequence[str], buckets: int) -> list[str]:
    """The balancer's bucket → host table: round robin, so every host gets an equal share."""
    return [hosts[i % len(hosts)] for i in range(buckets)]


def drained(owners: Sequence[str], host: str) -> list[str]:
    """The table without ``host``: its buckets go round robin to the others, nobody else moves."""
    others = sorted(set(owners) - {host})
    if not others:
        raise ValueError(f"cannot drain {host}: it is the only host")
    moved = iter(others * len(owners))
    return [next(moved) if owner == host else owner for owner in owners]


def bucket(family: str, buckets: int, seed: int | None) -> str:
    """The expression that picks a balancer bucket: a keyed hash of the client's address (what an
    L4 balancer must do), or with no seed, a random bucket per connection (what breaks sessions)."""
    if seed is None:
        return f"numgen random mod {buckets}"
    return f"jhash {family} saddr mod {buckets} seed {seed:#x}"


FAMILIES = (("ip", "backends"), ("ip6", "backends6"))  # nftables family, its bucket map


def nft_ruleset(
    service: Service, backends: Sequence[tuple[str, str]], seed: int | None, snat: bool = False
) -> str:
    """The balancer's nftables table; ``backends[i]`` is bucket i's host (IPv4, IPv6 address).

    No ``seed`` (random buckets) and ``snat`` (the client hidden behind the balancer's address)
    are the lab's two ways to break stickiness.
    """
    n = len(backends)
    vips = {"ip": service.vip, "ip6": service.vip6}
    # `typeof numgen`: the plain integer type that jhash and numgen both yield.
    maps = "".join(
        f"  map {name} {{ typeof numgen inc mod {n} : {family} daddr; "
        f"elements = {_elements(backends, family)}; }}\n"
        for family, name in FAMILIES
    )
    dnat = "".join(
        f"    {family} daddr {vips[family]} tcp dport {service.port} "
        f"dnat {family} to {bucket(family, n, seed)} map @{name}\n"
        for family, name in FAMILIES
    )
    masquerade = "  chain post { type nat hook postrouting priority srcnat; ct status dnat masquerade; }\n"
    return (
        f"table inet {TABLE}\n"  # create it if missing, so that the delete cannot fail
        f"delete table inet {TABLE}\n"
        f"table inet {TABLE} {{\n{maps}"
        f"  chain pre {{ type nat hook prerouting priority dstnat;\n{dnat}  }}\n"
        f"{masquerade if snat else ''}}}\n"
    )


def nft_remap(backends: Sequence[tuple[str, str]]) -> str:
    """Replace the bucket maps in one transaction: a new connection sees the old map or the new."""
    return "".join(
        f"flush map inet {TABLE} {name}\nadd element inet {TABLE} {name} {_elements(backends, family)}\n"
        for family, name in FAMILIES
    )


def _elements(backends: Sequence[tuple[str, str]], family: str) -> str:
    column = 0 if family == "ip" else 1
    return "{ " + ", ".join(f"{i} : {pair[column]}" for i, pair in enumerate(backends)) + " }"


# I/O: namespaces, processes, the balancer.


def _setns(path: Path) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    fd = os.open(path, os.O_RDONLY)
    try:
        if libc.setns(fd, CLONE_NEWNET) != 0:
            errno = ctypes.get_errno()
            raise OSError(errno, f"setns({path}): {os.strerror(errno)}")
    finally:
        os.close(fd)


def in_netns(netns: str, fn: Callable[[], T]) -> T:
    """``fn()`` in a thread inside the named namespace (setns is per thread): the sockets it opens
    and the processes it starts live there, while the caller stays where it is."""
    outcome: dict[str, Any] = {}

    def run() -> None:
        try:
            _setns(NETNS_DIR / netns)
            outcome["value"] = fn()
        except BaseException as exc:
            outcome["error"] = exc

    thread = threading.Thread(target=run, name=f"netns-{netns}")
    thread.start()
    thread.join()
    if "error" in outcome:
        raise outcome["error"]
    value: T = outcome["value"]
    return value


def _sysctl(name: str, value: str) -> None:
    Path("/proc/sys", *name.split(".")).write_text(value)


@dataclass
class Lab:
    """One lab, its namespaces named ``<name>-<node>`` so that several can run side by side."""

    name: str
    topology: Topology = TOPOLOGY
    service: Service = SERVICE
    owners: list[str] = field(default_factory=list)
    started: list[subprocess.Popen[bytes]] = field(default_factory=list)  # to reap at `down`
    # nftables would draw a new random seed at every load of the table; a lab keeps one.
    seed: int = field(default_factory=lambda: int.from_bytes(os.urandom(4), "little"))

    def __post_init__(self) -> None:
        self.logs = Path(tempfile.gettempdir()) / f"ebpf-sticky-lab-{self.name}"
        self.owners = self.owners or bucket_owners(self.service.hosts, self.service.buckets)

    def netns(self, node: str) -> str:
        return f"{self.name}-{node}"

    def netns_inode(self, node: str) -> int:
        return os.stat(NETNS_DIR / self.netns(node)).st_ino

    def run_in(self, node: str, fn: Callable[[], T]) -> T:
        return in_netns(self.netns(node), fn)

    def exec_argv(self, node: str, argv: Sequence[str]) -> list[str]:
        return ["ip", "netns", "exec", self.netns(node), *argv]

    # The network.

    def build(self) -> None:
        from pyroute2 import IPRoute, netns

        for node in self.topology.nodes:
            netns.create(self.netns(node))
            with IPRoute(netns=self.netns(node), flags=0) as ipr:
                ipr.link("set", index=ipr.link_lookup(ifname="lo")[0], state="up")
        for link in self.topology.links:
            # Made inside `a` with its peer placed straight into `b`: no interface ever exists in
            # the host's namespace, so labs running side by side cannot collide on names.
            with IPRoute(netns=self.netns(link.a), flags=0) as ipr:
                peer = {"ifname": link.a, "net_ns_fd": self.netns(link.b)}
                ipr.link("add", ifname=link.b, kind="veth", peer=peer)
            for node, ifname in ((link.a, link.b), (link.b, link.a)):
                with IPRoute(netns=self.netns(node), flags=0) as ipr:
                    index = ipr.link_lookup(ifname=ifname)[0]
                    for version, length in link.prefixes():
                        address = link.address(node, version)
                        ipr.addr("add", index=index, address=address, prefixlen=length, flags=IFA_F_NODAD)
                    ipr.link("set", index=index, state="up")
            with IPRoute(netns=self.netns(link.b), flags=0) as ipr:
                for version, _ in link.prefixes():
                    ipr.route("add", dst=DEFAULT[version], gateway=link.address(link.a, version))
            for node, prefix in self.topology.local_ranges:
                version = ipaddress.ip_network(prefix).version
                if node == link.b:
                    with IPRoute(netns=self.netns(link.a), flags=0) as ipr:
                        ipr.route("add", dst=prefix, gateway=link.address(link.b, version))
        for node, prefix in self.topology.local_ranges:
            with IPRoute(netns=self.netns(node), flags=0) as ipr:
                lo = ipr.link_lookup(ifname="lo")[0]
                ipr.route("add", dst=prefix, type="local", oif=lo, table=255, scope=254)
            if ipaddress.ip_network(prefix).version == 6:
                # IPv4 binds any address a local route covers; IPv6 asks for this as well.
                self.run_in(node, lambda: _sysctl("net.ipv6.ip_nonlocal_bind", "1"))
        for node, address in self.topology.loopback:
            with IPRoute(netns=self.netns(node), flags=0) as ipr:
                length = ipaddress.ip_address(address).max_prefixlen
                ipr.addr("add", index=ipr.link_lookup(ifname="lo")[0], address=address, prefixlen=length)
        for node in {link.a for link in self.topology.links}:
            self.run_in(node, lambda: _sysctl("net.ipv4.ip_forward", "1"))
            self.run_in(node, lambda: _sysctl("net.ipv6.conf.all.forwarding", "1"))

    def balance(self, random: bool = False, snat: bool = False) -> None:
        """Load the balancer's table. It hashes the client's address with the lab's own seed, so
        loading it again puts every client back on the same host; ``random`` and ``snat`` break it."""
        self.nft(nft_ruleset(self.service, self.backends(), None if random else self.seed, snat))

    def backends(self) -> list[tuple[str, str]]:
        return [(self.topology.address(host), self.topology.address(host, 6)) for host in self.owners]

    def nft(self, script: str) -> None:
        proc = subprocess.run(
            self.exec_argv(self.service.balancer, ["nft", "-f", "-"]),
            input=script,
            capture_output=True,
            text=True,
        )
        if proc.returncode != 0:
            raise RuntimeError(f"nft refused:\n{script}\n{proc.stderr}")

    # The processes.

    def spawn(
        self, node: str, argv: Sequence[str], env: dict[str, str] | None = None
    ) -> subprocess.Popen[bytes]:
        """Start ``argv`` in ``node``'s namespace, in a session of its own, logging to a file."""
        self.logs.mkdir(exist_ok=True)
        with open(self.logs / f"{node}.log", "ab") as log:
            proc = subprocess.Popen(
                self.exec_argv(node, argv),
                env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=ROOT,
                start_new_session=True,
            )
        self.started.append(proc)
        return proc

    def start_redis(self, timeout: float = 30.0) -> None:
        """redis-server, answering PING before any host starts: the hosts' Redis managers find it at once."""
        redis = self.topology.address(self.service.redis)
        proc = self.spawn(
            self.service.redis,
            [
                "redis-server",
                "--bind",
                redis,
                "--port",
                str(self.service.redis_port),
                "--save",
                "",
                "--appendonly",
                "no",
                "--protected-mode",
                "no",
            ],
        )

        def pong() -> bool:
            with (
                contextlib.suppress(OSError),
                socket.create_connection((redis, self.service.redis_port), 1) as conn,
            ):
                conn.sendall(b"PING\r\n")
                return conn.recv(16).startswith(b"+PONG")
            return False

        end = time.monotonic() + timeout
        while not self.run_in(self.service.redis, pong):
            if proc.poll() is not None or time.monotonic() > end:
                raise RuntimeError(f"redis-server not answering:\n{self.log(self.service.redis)}")
            time.sleep(0.05)

    def start_hosts(self, app: Path = CHAT_APP, workers: int = 4, launch_args: Sequence[str] = ()) -> None:
        """ebpf-sticky on every host, the same address and port on each (`ip netns exec` execs,
        so each Popen is a master)."""
        env = {}
        if self.service.redis in self.topology.nodes:
            env["REDIS_URL"] = (
                f"redis://{self.topology.address(self.service.redis)}:{self.service.redis_port}/0"
            )
        self.masters = {
            host: self.spawn(
                host,
                [
                    sys.executable,
                    "-m",
                    "ebpf_sticky",
                    "launch",
                    str(app),
                    "-w",
                    str(workers),
                    "--bind",
                    self.service.bind(),
                    *launch_args,
                ],
                env={**env, "HOSTNAME": host},
            )
            for host in self.service.hosts
        }

    def control(self, host: str) -> Path:
        """The host's control socket: the same path on every host but for the namespace's inode."""
        return control_dir() / socket_name(self.service.bind_host, self.service.port, self.netns_inode(host))

    def status(self, host: str) -> dict[str, Any]:
        return request(self.control(host), {"cmd": "status"})

    def wait_running(self, timeout: float = 90.0) -> None:
        end = time.monotonic() + timeout
        for host in self.service.hosts:
            while True:
                master = self.masters[host]
                if master.poll() is not None:
                    raise RuntimeError(f"{host}: launch exited with {master.returncode}:\n{self.log(host)}")
                with contextlib.suppress(Exception):
                    if self.status(host)["phase"] == "running":
                        break
                if time.monotonic() > end:
                    raise RuntimeError(f"{host} not serving after {timeout} s:\n{self.log(host)}")
                time.sleep(0.1)

    def log(self, node: str) -> str:
        path = self.logs / f"{node}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def current_owners(self) -> list[str]:
        """The bucket table as the balancer has it now (another process may have drained)."""
        listing = subprocess.run(
            self.exec_argv(self.service.balancer, ["nft", "-j", "list", "map", "inet", TABLE, "backends"]),
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        elements = next(item["map"]["elem"] for item in json.loads(listing)["nftables"] if "map" in item)
        host_of = {self.topology.address(host): host for host in self.service.hosts}
        return [host_of[address] for _, address in sorted(elements)]

    def drain(self, host: str) -> None:
        """Take ``host`` out of the balancer: only its buckets move; its open connections stay."""
        self.owners = drained(self.owners, host)
        self.nft(nft_remap(self.backends()))

    def stop(self, host: str) -> int:
        """TERM the host's master (found through its control socket); returns its pid."""
        pid = int(self.status(host)["pid"])
        os.kill(pid, signal.SIGTERM)
        return pid

    # Teardown.

    def processes(self) -> dict[int, int]:
        """Every process inside one of this lab's namespaces: pid → parent pid."""
        inodes = set()
        for node in self.topology.nodes:
            with contextlib.suppress(FileNotFoundError):
                inodes.add(self.netns_inode(node))
        found = {}
        for entry in os.listdir("/proc"):
            with contextlib.suppress(OSError, ValueError):
                if entry.isdigit() and os.stat(f"/proc/{entry}/ns/net").st_ino in inodes:
                    status = Path(f"/proc/{entry}/status").read_text()
                    found[int(entry)] = int(status.split("PPid:")[1].split()[0])
        return found

    def down(self, timeout: float = 15.0) -> None:
        """Stop what runs in the lab, then remove its namespaces and logs. Only the topmost
        processes get TERM (a master stops its own workers, and removes its control socket);
        whatever is left after ``timeout`` gets KILL."""
        from pyroute2 import netns

        processes = self.processes()
        for pid, parent in processes.items():
            if parent not in processes:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGTERM)
        end = time.monotonic() + timeout
        while self.processes() and time.monotonic() < end:
            time.sleep(0.1)
        for pid in self.processes():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        for proc in self.started:
            proc.wait()
        for node in self.topology.nodes:
            if (NETNS_DIR / self.netns(node)).exists():
                netns.remove(self.netns(node))
        shutil.rmtree(self.logs, ignore_errors=True)

    @classmethod
    @contextlib.contextmanager
    def running(cls, name: str, workers: int = 4, launch_args: Sequence[str] = ()) -> Iterator[Lab]:
        """A built, balanced, serving lab, torn down whatever happens."""
        lab = cls(name)
        try:
            lab.build()
            lab.balance()
            lab.start_redis()
            lab.start_hosts(workers=workers, launch_args=launch_args)
            lab.wait_running()
            yield lab
        finally:
            lab.down()


def fail(message: str, status: int = 2) -> int:
    print(f"scripts/lab: error: {message}", file=sys.stderr)
    return status


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="scripts/lab", description=__doc__.split("\n\n")[0])
    parser.add_argument("--name", default="lab", help="namespace prefix (default: lab)")
    sub = parser.add_subparsers(dest="cmd", required=True)
    up = sub.add_parser("up", help="build the lab and start Redis and both hosts")
    up.add_argument("-w", "--workers", type=int, default=4)
    sub.add_parser("down", help="stop everything in the lab and remove it (also a half-built one)")
    drain = sub.add_parser("drain", help="take a host out of the balancer, then TERM it")
    drain.add_argument("host", choices=SERVICE.hosts)
    args = parser.parse_args(argv)
    if os.geteuid() != 0:
        return fail("the lab needs root (network namespaces, nftables): run it with sudo", 3)
    lab = Lab(args.name)
    exists = (NETNS_DIR / lab.netns(SERVICE.balancer)).exists()
    if args.cmd == "down":
        lab.down()
        return 0
    if args.cmd == "drain" and exists:
        try:
            lab.owners = lab.current_owners()
            lab.drain(args.host)
            print(f"{args.host} drained; its master (pid {lab.stop(args.host)}) was sent TERM")
        except (ValueError, ControlError) as exc:  # the last host, or one already stopped
            return fail(str(exc))
        return 0
    if args.cmd == "drain":
        return fail(f"no lab named {args.name!r}: `scripts/lab up` first")
    if exists:
        return fail(f"a lab named {args.name!r} exists: `scripts/lab down` first")
    try:
        lab.build()
        lab.balance()
        lab.start_redis()
        lab.start_hosts(workers=args.workers, launch_args=["--graceful-timeout", "5"])
        lab.wait_running()
    except BaseException:
        lab.down()
        raise
    cli = Path(sys.executable).with_name("ebpf-sticky")
    print(
        f"lab {args.name!r} is up: clients {CLIENT_RANGE} {CLIENT_RANGE6} → {SERVICE.balancer} "
        f"{SERVICE.vip} {SERVICE.vip6} port {SERVICE.port} "
        f"(nftables jhash of the client address) → {', '.join(SERVICE.hosts)} "
        f"(ebpf-sticky -w {args.workers} on {SERVICE.bind()} each), "
        f"redis {TOPOLOGY.address(SERVICE.redis)}; logs in {lab.logs}\n"
        f"  ip netns exec {lab.netns(SERVICE.clients)} curl --interface {client_sources(7)[-1]} "
        f"'{SERVICE.url()}/socket.io/?EIO=4&transport=polling'\n"
        f"  ip netns exec {lab.netns(SERVICE.clients)} curl -g --interface {client_sources(7, 6)[-1]} "
        f"'{SERVICE.url(6)}/socket.io/?EIO=4&transport=polling'\n"
        f"  ip netns exec {lab.netns('host-a')} {cli} status\n"
        f"  ip netns exec {lab.netns(SERVICE.balancer)} nft list ruleset\n"
        f"  scripts/lab{'' if args.name == 'lab' else f' --name {args.name}'} drain host-a\n"
        f"  scripts/lab{'' if args.name == 'lab' else f' --name {args.name}'} down"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
