"""The master's membership watch: the kernel's view in, the repair out (pure)."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from ebpf_sticky.kernel.router import GroupView
from ebpf_sticky.supervisor.membership import decide


def view(
    listening: tuple[bool, ...] = (True, True, True),
    in_map: tuple[bool, ...] | None = None,
    order: tuple[int, ...] | None = (0, 1, 2),
    strangers: int = 0,
) -> GroupView:
    return GroupView(listening, in_map, order, strangers)


def test_native_refills_an_emptied_sockarray_entry_in_place() -> None:
    repair = decide(view(in_map=(True, False, True), order=(1, 2, 0)), 0)
    assert (repair.relisten, repair.reinsert, repair.rejoin_all) == ((), (1,), False)


def test_native_relistens_and_refills_a_slot_that_left() -> None:
    repair = decide(view(listening=(False, True, True), in_map=(False, True, True)), 0)
    assert (repair.relisten, repair.reinsert, repair.rejoin_all) == ((0,), (0,), False)


def test_cbpf_rejoins_everything_when_the_join_order_moved() -> None:
    repair = decide(view(order=(0, 2, 1)), 0)
    assert repair.rejoin_all and repair.needed
    assert "join order changed" in repair.messages[0]


def test_cbpf_rejoins_everything_when_a_slot_left() -> None:
    repair = decide(view(listening=(True, False, True), order=(0, 2)), 0)
    assert repair.relisten == (1,) and repair.rejoin_all


def test_a_lost_slot_is_never_repaired_again() -> None:
    # Slot 1's socket can never listen again (Router.lost): the others stay as they are.
    cbpf = decide(view(listening=(True, False, True), order=(0, 2)), 0, frozenset({1}))
    assert not cbpf.needed and cbpf.messages == ()
    native = decide(view(listening=(True, False, True), in_map=(True, False, True)), 0, frozenset({1}))
    assert not native.needed and native.messages == ()


def test_strangers_are_reported_once_and_never_repaired() -> None:
    first = decide(view(strangers=1), 0)
    assert not first.needed and "joined the group" in first.messages[0]
    assert decide(view(strangers=1), 1).messages == ()


@given(slots=st.integers(1, 8), data=st.data())
def test_cbpf_accepts_slot_order_and_nothing_else(slots: int, data: st.DataObject) -> None:
    """Whatever order the kernel shows, and whichever slots still listen: the group is left alone
    only when the listening slots joined in slot order, the one order the program is built for."""
    listening = tuple(data.draw(st.lists(st.booleans(), min_size=slots, max_size=slots)))
    order = tuple(data.draw(st.permutations([s for s in range(slots) if listening[s]])))
    repair = decide(view(listening, None, order), 0)
    healthy = all(listening) and order == tuple(range(slots))
    assert repair.needed is not healthy
    assert (repair.messages == ()) is healthy


@given(slots=st.integers(1, 8), data=st.data())
def test_native_ignores_the_join_order(slots: int, data: st.DataObject) -> None:
    order = tuple(data.draw(st.permutations(range(slots))))
    repair = decide(view((True,) * slots, (True,) * slots, order), 0)
    assert not repair.needed and repair.messages == ()
