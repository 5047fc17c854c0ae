"""Which slot owns a session id: issued ids, the shared table, the handoff frame, and the table and
channels an upgrade carries. Pure apart from real socketpairs and memfds."""

from __future__ import annotations

import ipaddress
import os
import socket

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ebpf_sticky.activation import SessionFds
from ebpf_sticky.errors import HandoverError
from ebpf_sticky.sessions import handoff
from ebpf_sticky.sessions.keys import MAX_KEY
from ebpf_sticky.sessions.master import (
    CONCENTRATION_MIN,
    CONCENTRATION_TOP,
    MasterSessions,
    check_carried,
    concentration,
)
from ebpf_sticky.sessions.ownership import (
    ENTRIES_AT,
    ENTRY,
    TTL,
    SessionTable,
    carried_mismatch,
    checked_slot,
    issue_id,
    issued_slot,
    table_size,
)
from ebpf_sticky.sessions.settings import SessionSettings

KEY = bytes(range(16))
OTHER_KEY = bytes(range(1, 17))
slots = st.integers(0, 255)
randoms = st.binary(min_size=11, max_size=11)
ids = st.text(st.characters(codec="ascii", exclude_categories=["Cc"]), min_size=1, max_size=64)


def small_table(capacity: int = 64, slots: int = 4) -> SessionTable:
    return SessionTable.create(memoryview(bytearray(table_size(capacity))), KEY, slots)


@given(slots, randoms)
def test_an_issued_id_names_its_slot_and_looks_like_engineio(slot: int, random: bytes) -> None:
    value = issue_id(slot, KEY, random)
    assert len(value) == 20 and value.isascii() and "/" not in value and "+" not in value
    assert issued_slot(value, KEY) == slot


@given(slots, randoms)
def test_an_id_issued_under_another_key_is_unknown(slot: int, random: bytes) -> None:
    # The tag is 24 bits: a chance collision is possible in principle, never in this search.
    assert issued_slot(issue_id(slot, OTHER_KEY, random), KEY) is None


@given(st.text(max_size=40))
def test_anything_else_is_not_an_issued_id(value: str) -> None:
    assert issued_slot(value, KEY) is None


@given(st.lists(st.tuples(slots, randoms, st.booleans(), st.booleans()), max_size=50))
def test_a_remembered_check_answers_as_a_fresh_one(calls: list[tuple[int, bytes, bool, bool]]) -> None:
    # Each id asked under both keys, in either order, genuine or with its tag broken: what the
    # remembered check answers is what the check itself answers.
    for slot, random, broken, other_first in calls:
        value = issue_id(slot, KEY, random)
        if broken:
            value = value[:-1] + ("A" if value[-1] != "A" else "B")
        for key in (OTHER_KEY, KEY) if other_first else (KEY, OTHER_KEY):
            assert issued_slot(value, key) == checked_slot.__wrapped__(value, key)


@given(st.text(max_size=MAX_KEY).filter(lambda value: len(value) != 20))
def test_only_ids_of_an_issued_length_are_remembered(value: str) -> None:
    # A key can be MAX_KEY characters long: remembered, a client's made-up keys would hold
    # thousands of times an issued id's bytes in every worker.
    before = checked_slot.cache_info().currsize
    assert issued_slot(value, KEY) is None
    assert checked_slot.cache_info().currsize == before


@given(st.lists(st.tuples(ids, slots), min_size=1, max_size=200))
def test_a_learnt_id_is_found_at_once_and_the_table_never_grows(learnt: list[tuple[str, int]]) -> None:
    table = small_table()
    size = len(table.buf)
    for value, slot in learnt:
        table.learn(value, slot, now=100)
        assert table.lookup(value, now=100) == slot
    assert len(table.buf) == size


@given(ids, slots)
def test_a_learnt_id_expires(value: str, slot: int) -> None:
    table = small_table()
    table.learn(value, slot, now=100)
    assert table.lookup(value, now=100 + TTL) == slot
    assert table.lookup(value, now=100 + 2 * TTL + 1) is None


@given(st.lists(ids, max_size=50), ids)
def test_lookups_of_unknown_ids_insert_nothing(asked: list[str], learnt: str) -> None:
    table = small_table()
    before = bytes(table.buf[ENTRIES_AT:])
    for value in asked:
        assert table.lookup(value, now=100) is None
    assert bytes(table.buf[ENTRIES_AT:]) == before
    table.learn(learnt, 1, now=100)
    assert sum(1 for i in range(table.capacity) if ENTRY.unpack_from(table.buf, ENTRIES_AT + 16 * i)[0]) == 1


def test_a_torn_entry_reads_as_absent() -> None:
    table = small_table(capacity=8)
    table.learn("abc", 2, now=100)
    for i in range(8):
        h, meta = ENTRY.unpack_from(table.buf, ENTRIES_AT + 16 * i)
        if h:
            ENTRY.pack_into(table.buf, ENTRIES_AT + 16 * i, h, meta ^ 1)  # another slot, old check
    assert table.lookup("abc", now=100) is None


def test_counters_and_slot_count_are_shared_fields() -> None:
    table = small_table()
    table.count(3, "moved_out")
    table.count(3, "moved_out")
    table.set_slots(7)
    view = SessionTable(table.buf, KEY)
    assert view.counters(3)["moved_out"] == 2 and view.slots == 7


clients = st.one_of(
    st.none(),
    st.tuples(st.ip_addresses().map(str), st.integers(0, 65535)),
)


@given(clients, st.binary(max_size=2000))
def test_the_handoff_frame_round_trips(client: tuple[str, int] | None, data: bytes) -> None:
    moved = handoff.decode(9, b"".join(handoff.encode(client, data)))
    assert moved.data == data and moved.fd == 9
    if client is None:
        assert moved.client is None
    else:
        assert moved.client is not None and moved.client[1] == client[1]
        assert moved.client[0] == str(ipaddress.ip_address(client[0]))


def test_a_connection_and_its_bytes_cross_a_socketpair() -> None:
    channels = handoff.Channels()
    channels.ensure(0)
    receive_end, (send_end,) = channels.worker_fds(0)
    left, right = socket.socketpair()
    try:
        sender = socket.socket(fileno=os.dup(send_end))
        receiver = socket.socket(fileno=os.dup(receive_end))
        receiver.setblocking(False)
        buffer = handoff.receive_buffer()
        assert handoff.receive(receiver, buffer) is None
        sender.send(b"no connection in this one: skipped")
        handoff.send(sender, left.fileno(), ("192.0.2.7", 4242), b"GET / HTTP/1.1\r\n\r\n")
        moved = handoff.receive(receiver, buffer)
        assert moved is not None and moved.client == ("192.0.2.7", 4242)
        assert moved.data == b"GET / HTTP/1.1\r\n\r\n"
        with socket.socket(fileno=moved.fd) as adopted:
            adopted.sendall(b"hello")  # the same connection: the other end hears it
            assert right.recv(5) == b"hello"
        sender.close()
        receiver.close()
    finally:
        left.close()
        right.close()
        channels.close()


def full_table(key: bytes, slots: int) -> SessionTable:
    return SessionTable.create(memoryview(bytearray(table_size())), key, slots)


@given(st.integers(1, 64), st.integers(1, 64), st.booleans())
def test_a_carried_table_fits_only_the_same_key_and_slot_count(
    made: int, wanted: int, same_key: bool
) -> None:
    table = full_table(KEY, made)
    why = carried_mismatch(bytes(table.buf[:64]), len(table.buf), KEY if same_key else OTHER_KEY, wanted)
    assert (why == "") == (same_key and made == wanted), why


def test_a_table_of_another_layout_is_refused() -> None:
    table = full_table(KEY, 2)
    assert "bytes" in carried_mismatch(bytes(table.buf[:64]), len(table.buf) - 16, KEY, 2)
    other_magic = bytearray(table.buf[:64])
    other_magic[0] ^= 1
    assert "another version" in carried_mismatch(bytes(other_magic), len(table.buf), KEY, 2)


def test_the_master_adopts_the_table_and_channels_it_carried() -> None:
    """Learnt ids and queued handoffs reach the image after: by fd, as across the exec."""
    settings = SessionSettings(keys=("mcp",), table_key=KEY.hex())
    before = MasterSessions.open(settings, 3)
    before.table.learn("session-1", 2, now=100)
    receive_end, send_ends = before.channels.worker_fds(2)
    left, right = socket.socketpair()
    with socket.socket(fileno=os.dup(send_ends[2])) as sender:
        handoff.send(sender, left.fileno(), None, b"queued")
    carried = before.carried()
    copies = SessionFds(os.dup(carried.table), tuple((os.dup(r), os.dup(s)) for r, s in carried.channels))
    check_carried(settings, copies, 3)
    after = MasterSessions.adopt(settings, copies)
    try:
        before.close()  # the exec closes nothing carried; the copies stand in for the same fds
        assert after.table.lookup("session-1", now=100) == 2
        with socket.socket(fileno=os.dup(after.channels.worker_fds(2)[0])) as receiver:
            receiver.setblocking(False)
            moved = handoff.receive(receiver, handoff.receive_buffer())
        assert moved is not None and moved.data == b"queued"
        os.close(moved.fd)
    finally:
        after.close()
        left.close()
        right.close()


@pytest.mark.parametrize(("key", "slots"), [(OTHER_KEY, 3), (KEY, 4)])
def test_a_table_that_does_not_fit_the_settings_is_refused(key: bytes, slots: int) -> None:
    before = MasterSessions.open(SessionSettings(keys=("mcp",), table_key=KEY.hex()), 3)
    try:
        with pytest.raises(HandoverError, match="restart the group"):
            check_carried(SessionSettings(keys=("mcp",), table_key=key.hex()), before.carried(), slots)
    finally:
        before.close()


@given(st.lists(st.sampled_from([bytes([i]) * 16 for i in range(40)]), max_size=3 * CONCENTRATION_MIN))
def test_the_top_sources_share_of_open_connections(peers: list[bytes]) -> None:
    share = concentration(peers)
    if len(peers) < CONCENTRATION_MIN:
        assert share is None
        return
    assert share is not None and 0 < share <= 1
    distinct = len(set(peers))
    # As many sources as the top counts: all of them; otherwise at least their fair part.
    assert share == 1 if distinct <= CONCENTRATION_TOP else share >= CONCENTRATION_TOP / distinct
