"""The control socket's schema: whatever the bytes, a request or BadRequest, nothing else."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ebpf_sticky.hashing import parse_address
from ebpf_sticky.supervisor.requests import (
    MAX_ADDRESSES,
    MAX_REQUEST,
    BadRequest,
    Route,
    Status,
    depth,
    parse_request,
)

JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=30,
)
# Shapes close to valid ones, which a plain JSON strategy rarely reaches.
NEAR = st.fixed_dictionaries(
    {"cmd": st.sampled_from(["status", "route", "ROUTE", "", 5])},
    optional={"addresses": JSON | st.lists(JSON, max_size=5), "extra": JSON},
)


def nesting(value: Any) -> int:
    if isinstance(value, list):
        return 1 + max((nesting(v) for v in value), default=0)
    if isinstance(value, dict):
        return 1 + max((nesting(v) for v in value.values()), default=0)
    return 0


def outcome(data: bytes) -> Status | Route | BadRequest:
    try:
        return parse_request(data)
    except BadRequest as exc:
        return exc


@given(st.binary(max_size=300))
def test_any_bytes_give_a_request_or_bad_request(data: bytes) -> None:
    outcome(data)


@given(JSON | NEAR)
def test_any_json_gives_a_request_or_bad_request(value: Any) -> None:
    result = outcome(json.dumps(value).encode())
    if isinstance(result, Route):
        assert value["cmd"] == "route" and len(result.addresses) == len(value["addresses"])


@given(JSON)
def test_depth_counts_nesting_without_parsing(value: Any) -> None:
    assert depth(json.dumps(value).encode()) == nesting(value)


@given(st.lists(st.ip_addresses().map(str), min_size=1, max_size=20))
def test_a_valid_route_request_parses(addresses: list[str]) -> None:
    result = parse_request(json.dumps({"cmd": "route", "addresses": addresses}).encode())
    assert result == Route(tuple((a, parse_address(a)) for a in addresses))


@pytest.mark.parametrize(
    ("data", "why"),
    [
        (b"[]", "a request is a JSON object, not list"),
        (b'{"cmd":"route","addresses":5}', "addresses must be a list of strings, not int"),
        (b"[" * 65536, "request nested deeper than 2 levels"),
        (b'{"cmd":"status","x":{"y":[1]}}', "nested deeper"),
        (b'{"cmd":"status","x":1}', "unexpected field 'x'"),
        (b'{"cmd":"route","addresses":[]}', f"1 to {MAX_ADDRESSES} entries, not 0"),
        (b'{"cmd":"route","addresses":["10.0.0.300"]}', "'10.0.0.300' is not an IP address"),
        (b'{"cmd":"route","addresses":[["10.0.0.1"]]}', "nested deeper"),
        (b'{"cmd":"reboot"}', "unknown request 'reboot': send status or route"),
        (b"\xff\xfe", "not JSON"),
        (b"1" * 5000, "not JSON"),
        (b" " * (MAX_REQUEST + 1), f"longer than {MAX_REQUEST} bytes"),
    ],
)
def test_each_bad_request_says_what_is_wrong(data: bytes, why: str) -> None:
    with pytest.raises(BadRequest, match=why.replace("[", r"\[")):
        parse_request(data)


def test_status_parses() -> None:
    assert parse_request(b'{"cmd": "status"}') == Status()
