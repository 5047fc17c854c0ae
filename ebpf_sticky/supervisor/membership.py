"""The master's watch over the group's membership: the kernel's view → what to repair (``decide``:
pure), and the loop's thin side (``Watch``: look once a tick, repair, log).

A worker holds its slot's socket, and a holder can take a listener out of the reuseport group
(``shutdown``, ``connect(AF_UNSPEC)``) and put it back (``listen``) at the end. The seccomp filter
refuses that on fd 3; a duplicate the filter cannot see (passed to itself over a Unix socket) still
can. So every tick the master compares the kernel's view (``Router.view``) with what it built:

* a slot that no longer listens is made to listen again;
* eBPF: a slot whose sockarray entry no longer holds its socket gets it back (position in the
  group does not matter to the eBPF program, so this repairs everything);
* classic BPF: the program returns *positions* in the group, so a socket that left (and maybe
  came back at the end) sent other slots' clients to the wrong worker. The kernel's listening hash
  keeps the join order (``kernel/diag.py``), and the group is right only when its sockets joined in
  slot order, the only order the master makes them join in: when the order is any other, or a
  slot left, every socket but slot 0's is rejoined in slot order (``Router.repair``). That resets
  the queued connections of those slots: the price of putting every client back on its worker.
  The order is compared with slot order, never with one read back from the kernel: a holder that
  moved its socket just before such a read would have its order taken as right.
* a slot whose socket can never listen again (a holder connected it somewhere) is lost: the others
  are put back without it, it is named once, and no later look repairs it (``Router.lost``);
* listeners of the master's uid on the group's address that are not the master's joined the group:
  they cannot be removed from here; the log says so (workers of another uid cannot join).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from ..errors import StickyError
from ..kernel.router import GroupView, Router

log = logging.getLogger("ebpf_sticky")


@dataclass(frozen=True)
class Repair:
    relisten: tuple[int, ...]
    reinsert: tuple[int, ...]
    rejoin_all: bool
    messages: tuple[str, ...]  # one warning each, for the log

    @property
    def needed(self) -> bool:
        return bool(self.relisten or self.reinsert or self.rejoin_all)


def decide(view: GroupView, strangers_known: int, lost: frozenset[int] = frozenset()) -> Repair:
    """What to do about ``view``, given the number of strangers already reported (each change is
    reported once), and the slots whose socket can never listen again (``Router.lost``: reported
    once, when found; repairing them on every tick would only reset the others' queues)."""
    relisten = tuple(
        slot for slot, listening in enumerate(view.listening) if not listening and slot not in lost
    )
    messages = [f"slot {slot}'s socket left the group (no longer listening)" for slot in relisten]
    reinsert: tuple[int, ...] = ()
    rejoin_all = False
    if view.in_map is not None:
        reinsert = tuple(
            slot
            for slot, held in enumerate(view.in_map)
            if (not held or slot in relisten) and slot not in lost
        )
        messages += [f"slot {slot}'s sockarray entry no longer holds its socket" for slot in reinsert]
    else:
        in_slot_order = tuple(slot for slot, listening in enumerate(view.listening) if listening)
        moved = view.order is not None and view.order != in_slot_order
        if moved:
            messages.append(f"the group's join order changed (now {list(view.order or ())})")
        rejoin_all = moved or bool(relisten)
    if view.strangers > strangers_known:
        messages.append(
            f"{view.strangers} listener(s) of the master's uid that are not ours joined the group on its "
            "port: run workers as another --user so the kernel keeps them out"
        )
    return Repair(relisten, reinsert, rejoin_all, tuple(messages))


@dataclass
class Watch:
    """The loop's side: look once a tick, repair, and log what was repaired or could not be."""

    strangers: int = 0

    def look(self, router: Router) -> None:
        try:
            view = router.view()
        except OSError as exc:
            log.error("membership: cannot read the group's state (%s): the group is not watched", exc)
            return
        repair = decide(view, self.strangers, frozenset(router.lost))
        self.strangers = view.strangers
        for message in repair.messages:
            log.warning("membership: %s", message)
        if not repair.needed:
            return
        try:
            router.repair(repair.relisten, repair.reinsert, repair.rejoin_all)
        except (OSError, StickyError) as exc:
            log.error("membership: could not repair the group (%s): clients may reach the wrong worker", exc)
            return
        what = "rejoined every slot after slot 0 in order" if repair.rejoin_all else "restored"
        log.warning(
            "membership: repaired: %s (relisten %s, sockarray %s)",
            what,
            list(repair.relisten),
            list(repair.reinsert),
        )
