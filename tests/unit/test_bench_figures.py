"""The benchmark's Python copy of sticky-session's hash matches the npm package run by node."""

from __future__ import annotations

import ipaddress
import json
import shutil
import subprocess
from pathlib import Path

from bench.seedhash import seed_hash

REPO = Path(__file__).parents[2]

ADDRESSES = ["127.0.0.1", "10.1.2.3", "255.255.255.255", "192.168.7.9", "0.0.0.0", "8.8.4.4"]
SEEDS = [0, 123456789, -987654321, 2147483647, -2147483648]

NODE = """
const Master = require("sticky-session/lib/sticky/master.js");
const ip = require("ip");
const [addresses, seeds] = JSON.parse(process.argv[1]);
const m = Object.create(Master.prototype);
const hash = (s, a) => { m.seed = s; return m.hash(ip.toBuffer(a)); };
console.log(JSON.stringify(seeds.map((s) => addresses.map((a) => hash(s, a)))));
"""


def test_seed_hash_matches_node() -> None:
    node = shutil.which("node")
    assert node, "node is installed by scripts/setup"
    out = subprocess.run(
        [node, "-e", NODE, json.dumps([ADDRESSES, SEEDS])],
        capture_output=True,
        text=True,
        cwd=REPO,
        check=True,
    ).stdout
    expected = json.loads(out)
    got = [[seed_hash(ipaddress.ip_address(a).packed, s) for a in ADDRESSES] for s in SEEDS]
    assert got == expected
