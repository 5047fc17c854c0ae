"""The master's membership watch: the kernel's view in, the repair out (pure)."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from ebpf_sticky.kernel.router import GroupView
from ebpf_sticky.supervisor.membership import decide, rebaseline


def view(
    listening: tuple[bool, ...] = (True, True, True),
    in_map: tuple[bool, ...] | None = None,
    order: tuple[int, ...] | None = (2, 1, 0),
    strangers: int = 0,
) -> GroupView:
    return GroupView(listening, in_map, order, strangers)


def test_native_refills_an_emptied_sockarray_entry_in_place() -> None:
    repair = decide(view(in_map=(True, False, True), order=(1, 2, 0)), (2, 1, 0), 0)
    assert (repair.relisten, repair.reinsert, repair.rejoin_all) == ((), (1,), False)


def test_native_relistens_and_refills_a_slot_that_left() -> None:
    repair = decide(view(listening=(False, True, True), in_map=(False, True, True)), (2, 1, 0), 0)
    assert (repair.relisten, repair.reinsert, repair.rejoin_all) == ((0,), (0,), False)


def test_cbpf_rejoins_everything_when_the_join_order_moved() -> None:
    repair = decide(view(order=(0, 2, 1)), (2, 1, 0), 0)
    assert repair.rejoin_all and repair.needed
    assert "join order changed" in repair.messages[0]


def test_cbpf_rejoins_everything_when_a_slot_left() -> None:
    repair = decide(view(listening=(True, False, True), order=(2, 0)), (2, 1, 0), 0)
    assert repair.relisten == (1,) and repair.rejoin_all


def test_a_lost_slot_is_never_repaired_again() -> None:
    # Slot 1's socket can never listen again (Router.lost): the others stay as they are.
    cbpf = decide(view(listening=(True, False, True), order=(2, 0)), (2, 0), 0, frozenset({1}))
    assert not cbpf.needed and cbpf.messages == ()
    native = decide(view(listening=(True, False, True), in_map=(True, False, True)), None, 0, frozenset({1}))
    assert not native.needed and native.messages == ()


def test_strangers_are_reported_once_and_never_repaired() -> None:
    first = decide(view(strangers=1), (2, 1, 0), 0)
    assert not first.needed and "joined the group" in first.messages[0]
    assert decide(view(strangers=1), (2, 1, 0), 1).messages == ()


def test_the_masters_own_changes_start_a_new_baseline() -> None:
    assert rebaseline(view(order=(3, 2, 1, 0)), (2, 1, 0), 4) == (3, 2, 1, 0)
    assert rebaseline(view(order=(0, 2, 1)), (2, 1, 0), 3) == (2, 1, 0)  # an attack is no new baseline


@given(slots=st.integers(1, 8), native=st.booleans(), data=st.data())
def test_a_healthy_group_needs_nothing_and_says_nothing(
    slots: int, native: bool, data: st.DataObject
) -> None:
    order = tuple(data.draw(st.permutations(range(slots))))
    healthy = view((True,) * slots, (True,) * slots if native else None, order)
    repair = decide(healthy, order, 0)
    assert not repair.needed and repair.messages == ()
