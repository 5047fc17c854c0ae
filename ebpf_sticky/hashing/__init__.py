"""Keyed, consistent address → slot mapping: the Python mirrors of the kernel programs.

``spec`` (key, prefixes, addresses) and ``table`` (buckets → slots) are shared; ``native`` mirrors
the eBPF program (SipHash-1-3) and ``cbpf`` the classic-BPF one (HalfSipHash-1-3). The names
re-exported here are the eBPF mirror's, which ``route`` and the tests use by default.

Design rules, shared with ``kernel/program.py`` and ``bpf/select.c``:

* The hashed message is always 16 bytes: an IPv6 address, or an IPv4 address written as
  ``::ffff:a.b.c.d``, masked to its prefix first. One code path for both families is why an IPv4
  client on a dual-stack ``[::]`` socket hashes exactly as on an ``AF_INET`` socket.
* The hash is SipHash-1-3 (the variant CPython and the kernel's hsiphash use for hash tables) with a
  128-bit secret key: clients cannot pick addresses that pile onto one worker without the key.
* The low 12 bits of the hash index a table of ``BUCKETS`` entries, each naming a slot. The table is
  a pure function of the slot count, grown one slot at a time (see ``bucket_table``), so any
  address's slot can be predicted offline from (key, prefixes, slot count). The classic-BPF router
  (``cbpf.py``) uses the very same table, decided there by comparisons on hash ranges.

Nothing here touches the OS.
"""

from .native import (
    ProgramConstants,
    bucket_of,
    buckets_of,
    hash_words,
    message_words,
    program_constants,
    siphash,
    siphash_init,
    slot_of,
)
from .spec import DEFAULT_PREFIX4, DEFAULT_PREFIX6, KEY_BYTES, Address, HashSpec, parse_address
from .table import BUCKETS, MAX_SLOTS, bucket_table, table_runs

__all__ = [
    "BUCKETS",
    "DEFAULT_PREFIX4",
    "DEFAULT_PREFIX6",
    "KEY_BYTES",
    "MAX_SLOTS",
    "Address",
    "HashSpec",
    "ProgramConstants",
    "bucket_of",
    "bucket_table",
    "buckets_of",
    "hash_words",
    "message_words",
    "parse_address",
    "program_constants",
    "siphash",
    "siphash_init",
    "slot_of",
    "table_runs",
]
