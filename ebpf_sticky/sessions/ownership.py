"""Which slot owns a session id: ids we issue carry their slot; others are learned into a table.

Design rules:

* **Issued ids** (python-engineio's ``generate_id``, overridden in our worker): 15 bytes, shown as
  20 base64url characters like Engine.IO's own: the slot (1 byte), 11 random bytes, and a 3-byte
  tag, keyed BLAKE2b under the table key of the first 12. A forged id either fails the tag (an
  unknown key, served where it landed) or names a slot whose app then judges it: a forger reaches
  no more than that slot's app.
* **Learned ids** (``Mcp-Session-Id``, cookies, headers): the response that creates a session is
  seen by the worker that serves it, which records (keyed hash of the id → its slot, expiry) in a
  table every worker maps (a memfd the master creates). Only responses insert: a request carrying an
  unknown key inserts nothing, so clients cannot grow the table; it is bounded anyway (a fixed
  number of entries, the oldest entry of a probe window is replaced when all are live).
* **Client-chosen ids** (``query:NAME``: no response creates them) go to the slot their keyed hash
  picks through the routers' bucket table, from the first request on; nothing is stored.
* Entries are written without locks by several processes: each carries a check over its fields,
  and a torn entry reads as absent (that request is then served where it landed).

The table's layout (little-endian): a header ``MAGIC, live slots, capacity, key check``, per-slot counters
(moved out, moved in, unknown keys, connections, connections from the top source), then
``capacity`` entries of ``(hash: u64, meta: u64)`` with meta = slot(16) | expiry(32) | check(16).
Expiry is in whole seconds of CLOCK_MONOTONIC, which every process of the machine shares.
"""

from __future__ import annotations

import base64
import binascii
import functools
import hashlib
import struct
from dataclasses import dataclass, field

from ..hashing import BUCKETS, MAX_SLOTS, bucket_table

MAGIC = 0x5E55_1011
HEADER = struct.Struct("<IIII")
COUNTERS = ("moved_out", "moved_in", "unknown")
COUNTER = struct.Struct("<" + "Q" * len(COUNTERS))
ENTRY = struct.Struct("<QQ")
CAPACITY = 1 << 16  # 1 MiB of entries
PROBES = 8
TTL = 3600  # seconds a learned id stays routable after its last use
ID_BYTES = 15
ID_CHARS = 4 * ID_BYTES // 3  # an issued id's length, in base64url characters
REMEMBERED_IDS = 4096  # ids whose check (``checked_slot``) a process remembers
_TAG_BYTES = 3
_COUNTERS_AT = HEADER.size
ENTRIES_AT = _COUNTERS_AT + COUNTER.size * MAX_SLOTS


TABLE_KEY_LABEL = b"ebpf-sticky session table"


def table_key_of(hash_key: bytes) -> bytes:
    """The table key: a PRF of the launch's hash key (it tells nothing of it), so that ids issued
    before an in-place upgrade or a restart from the fd store stay valid under the same key."""
    return hashlib.blake2b(TABLE_KEY_LABEL, key=hash_key, digest_size=16).digest()


def table_size(capacity: int = CAPACITY) -> int:
    return ENTRIES_AT + ENTRY.size * capacity


def key_check(table_key: bytes) -> int:
    """Names the table key without telling it: a table carried to an image that would hash ids
    under another key would find none of them."""
    digest = hashlib.blake2b(b"", digest_size=4, key=table_key, person=b"table-key").digest()
    return int.from_bytes(digest, "little")


def carried_mismatch(head: bytes, size: int, table_key: bytes, slots: int | None) -> str:
    """Why a table made by a master before cannot go on under these settings, or "": ``head`` is
    its first bytes and ``size`` its length; ``slots`` None takes any slot count."""
    if size != table_size() or len(head) < HEADER.size:
        return f"it has {size} bytes, this version's has {table_size()}"
    magic, live, capacity, check = HEADER.unpack_from(head)
    if magic != MAGIC or capacity != CAPACITY:
        return "its layout is another version's"
    if check != key_check(table_key):
        return "its ids are hashed under another table key"
    if slots is not None and live != slots:
        return f"it routes over {live} slots, the group has {slots}"
    return ""


# Keyed BLAKE2b (hashlib's C code, about a microsecond) rather than the pure-Python SipHash of the
# routing mirror (tens of microseconds): these run on every request that carries a key.
def _tag(table_key: bytes, body: bytes) -> bytes:
    return hashlib.blake2b(body, digest_size=_TAG_BYTES, key=table_key, person=b"issued-id").digest()


def issue_id(slot: int, table_key: bytes, random: bytes) -> str:
    """An id that names ``slot``; ``random`` is 11 fresh bytes from a cryptographic source."""
    body = bytes([slot]) + random
    return base64.urlsafe_b64encode(body + _tag(table_key, body)).decode()


def issued_slot(value: str, table_key: bytes) -> int | None:
    """The slot an id we issued names; None for anything else."""
    if len(value) != ID_CHARS:
        return None  # answered without the memo, which then holds ids of this length only
    return checked_slot(value, table_key)


# Remembered per process: each poll of an Engine.IO session carries the same id, and checking it
# (a base64 decode and a keyed BLAKE2b) costs a serving worker several microseconds, against well
# under one to look it up. Exact (a pure function of its arguments) and bounded, in entries and,
# since every id in it has an issued id's length, in bytes: ids a client makes up can only push
# others out, which are then checked again. Called directly (a C call, no Python frame, when it
# remembers) only with a value of ``ID_CHARS`` characters, as ``issued_slot`` calls it.
@functools.lru_cache(maxsize=REMEMBERED_IDS)
def checked_slot(value: str, table_key: bytes) -> int | None:
    try:
        raw = base64.urlsafe_b64decode(value)
    except (binascii.Error, ValueError):
        return None
    body, tag = raw[:-_TAG_BYTES], raw[-_TAG_BYTES:]
    return body[0] if _tag(table_key, body) == tag else None


def key_hash(value: str, table_key: bytes) -> int:
    """Never 0 (0 marks an empty entry)."""
    digest = hashlib.blake2b(value.encode(), digest_size=8, key=table_key, person=b"learnt-id").digest()
    return int.from_bytes(digest, "little") or 1


def hashed_slot(value: str, table_key: bytes, slots: int) -> int:
    """The slot of an id the client chose: its keyed hash through the routers' bucket table."""
    return bucket_table(slots)[key_hash(value, table_key) & (BUCKETS - 1)]


def _check(h: int, slot: int, expiry: int) -> int:
    x = h ^ (h >> 16) ^ (h >> 32) ^ (h >> 48) ^ slot ^ expiry ^ (expiry >> 16)
    return (x * 0x9E37) & 0xFFFF


def _meta(h: int, slot: int, expiry: int) -> int:
    return slot | (expiry << 16) | (_check(h, slot, expiry) << 48)


def _unpack(h: int, meta: int) -> tuple[int, int] | None:
    slot, expiry, check = meta & 0xFFFF, (meta >> 16) & 0xFFFFFFFF, meta >> 48
    return (slot, expiry) if _check(h, slot, expiry) == check else None


@dataclass
class SessionTable:
    """The shared table over a writable buffer (the mapped memfd; a bytearray in tests)."""

    buf: memoryview
    table_key: bytes
    # Entries, read once from the header: fixed for the table's life, and needed at every probe.
    capacity: int = field(init=False)

    def __post_init__(self) -> None:
        self.capacity = int(HEADER.unpack_from(self.buf, 0)[2])

    @classmethod
    def create(cls, buf: memoryview, table_key: bytes, slots: int) -> SessionTable:
        HEADER.pack_into(buf, 0, MAGIC, slots, (len(buf) - ENTRIES_AT) // ENTRY.size, key_check(table_key))
        return cls(buf, table_key)

    @property
    def slots(self) -> int:
        """The live slot count the kernel routes over (the master updates it)."""
        return int(HEADER.unpack_from(self.buf, 0)[1])

    def set_slots(self, slots: int) -> None:
        struct.pack_into("<I", self.buf, 4, slots)

    def _window(self, h: int) -> range:
        start = h % self.capacity
        return range(start, start + PROBES)

    def _at(self, i: int) -> int:
        return ENTRIES_AT + ENTRY.size * (i % self.capacity)

    def lookup(self, value: str, now: int) -> int | None:
        h = key_hash(value, self.table_key)
        for i in self._window(h):
            eh, meta = ENTRY.unpack_from(self.buf, self._at(i))
            if eh != h:
                continue
            found = _unpack(h, meta)
            if found is None or found[1] < now:
                return None
            if found[1] - now < TTL // 2:  # refresh a session still in use
                ENTRY.pack_into(self.buf, self._at(i), h, _meta(h, found[0], now + TTL))
            return found[0]
        return None

    def learn(self, value: str, slot: int, now: int) -> None:
        h = key_hash(value, self.table_key)
        victim, oldest = None, None
        for i in self._window(h):
            eh, meta = ENTRY.unpack_from(self.buf, self._at(i))
            found = _unpack(eh, meta) if eh else None
            if eh == h or found is None or found[1] < now:
                victim = i
                break
            if oldest is None or found[1] < oldest:
                victim, oldest = i, found[1]
        assert victim is not None
        ENTRY.pack_into(self.buf, self._at(victim), h, _meta(h, slot, now + TTL))

    def count(self, slot: int, name: str, by: int = 1) -> None:
        """Counters have one writer per slot (two during a HUP overlap: a rare lost increment)."""
        at = _COUNTERS_AT + COUNTER.size * slot + 8 * COUNTERS.index(name)
        (value,) = struct.unpack_from("<Q", self.buf, at)
        struct.pack_into("<Q", self.buf, at, value + by)

    def counters(self, slot: int) -> dict[str, int]:
        values = COUNTER.unpack_from(self.buf, _COUNTERS_AT + COUNTER.size * slot)
        return dict(zip(COUNTERS, values, strict=True))
