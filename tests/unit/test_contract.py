"""The load-error report a worker sends the master: round trip, and a bound that keeps the cause."""

from __future__ import annotations

from ebpf_sticky.contract import LOAD_ERROR_PREFIX, MAX_REPORT, encode_load_error, parse_load_error


def test_round_trip() -> None:
    text = encode_load_error("slot 0: importing app.py raised X: y", 'Traceback:\n  "quoted"\tλ\nX: y\n')
    assert parse_load_error(text.encode()) == (
        "slot 0: importing app.py raised X: y",
        'Traceback:\n  "quoted"\tλ\nX: y\n',
    )


def test_a_huge_traceback_fits_one_datagram_and_keeps_its_end() -> None:
    detail = (
        "".join(f'  File "m{i}.py", line {i}, in f\n' for i in range(10000)) + "RuntimeError: the cause\n"
    )
    text = encode_load_error("summary", detail)
    assert len(text.encode()) <= MAX_REPORT
    summary, kept = parse_load_error(text.encode()) or ("", "")
    assert summary == "summary" and kept.startswith("...\n") and kept.endswith("RuntimeError: the cause\n")


def test_garbage_is_not_a_report() -> None:
    assert parse_load_error(LOAD_ERROR_PREFIX + b"{not json") is None
    assert parse_load_error(LOAD_ERROR_PREFIX + b'{"summary": 1}') is None
