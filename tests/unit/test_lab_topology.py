"""The lab's decisions: the balancer's bucket table, draining, and the nftables it loads."""

from __future__ import annotations

from collections import Counter

import pytest

from lab.multihost import (
    SERVICE,
    TOPOLOGY,
    bucket_owners,
    client_sources,
    drained,
    nft_remap,
    nft_ruleset,
)


def test_buckets_are_shared_equally() -> None:
    assert Counter(bucket_owners(["a", "b", "c"], 12)) == {"a": 4, "b": 4, "c": 4}


def test_draining_moves_only_the_drained_host_s_buckets() -> None:
    owners = bucket_owners(["a", "b", "c"], 12)
    after = drained(owners, "b")
    assert "b" not in after
    assert all(new == old for old, new in zip(owners, after, strict=True) if old != "b")
    assert Counter(after) == {"a": 6, "c": 6}
    with pytest.raises(ValueError, match="cannot drain a: it is the only host"):
        drained(["a", "a"], "a")


def test_the_balancer_hashes_the_client_address_into_the_map() -> None:
    hosts = bucket_owners(SERVICE.hosts, 4)
    backends = [(TOPOLOGY.address(host), TOPOLOGY.address(host, 6)) for host in hosts]
    ruleset = nft_ruleset(SERVICE, backends, 0xBEEF)
    assert "elements = { 0 : 198.18.2.2, 1 : 198.18.3.2, 2 : 198.18.2.2, 3 : 198.18.3.2 }" in ruleset
    assert (
        "ip daddr 198.18.0.80 tcp dport 8000 dnat ip to jhash ip saddr mod 4 seed 0xbeef map @backends"
        in ruleset
    )
    assert (
        "ip6 daddr fd00:18::80 tcp dport 8000 dnat ip6 to jhash ip6 saddr mod 4 seed 0xbeef map @backends6"
        in ruleset
    )
    assert "elements = { 0 : fd00:18:2::2, 1 : fd00:18:3::2, 2 : fd00:18:2::2, 3 : fd00:18:3::2 }" in ruleset
    assert "masquerade" not in ruleset
    broken = nft_ruleset(SERVICE, backends, None, snat=True)
    assert "dnat ip to numgen random mod 4 map @backends" in broken and "ct status dnat masquerade" in broken
    remap = nft_remap(backends[:2])
    assert "backends { 0 : 198.18.2.2, 1 : 198.18.3.2 }\n" in remap
    assert remap.endswith("backends6 { 0 : fd00:18:2::2, 1 : fd00:18:3::2 }\n")


def test_addresses_come_from_the_benchmarking_range_and_fd00() -> None:
    assert TOPOLOGY.address("lb") == "198.18.1.1" and TOPOLOGY.address("host-b") == "198.18.3.2"
    assert TOPOLOGY.address("host-b", 6) == "fd00:18:3::2"
    assert client_sources(2) == ["198.18.128.1", "198.18.128.2"]
    # One /64 per IPv6 client: ebpf-sticky hashes the /64.
    assert client_sources(2, 6) == ["fd00:18:8000::7", "fd00:18:8000:1::7"]
    assert SERVICE.bind() == "[::]:8000" and SERVICE.url(6) == "http://[fd00:18::80]:8000"
