"""Classic BPF instructions as plain values: build them, assemble them to bytes, print them back.

The classic twin of ``asm.py``. A program is a list of ``CInsn`` and label strings; jumps name
their labels and ``assemble`` resolves them. Classic BPF only jumps forward, and a conditional
jump's ``jt``/``jf`` offsets are 8 bits (at most 255 instructions ahead): ``assemble`` refuses a
program that breaks either rule instead of truncating an offset, and long reaches go through
``ja``, whose offset is 32 bits. ``disassemble`` prints the tcpdump/bpf_dbg style.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from dataclasses import dataclass, replace

from . import asm
from .asm import ALU, IMM, JMP, LD, LDX, MEM, ST, B, H, K, W, X, split_labels

# Classic BPF shares eBPF's encoding of classes, sizes, modes, sources and ALU operations;
# RET and MISC are classic only (eBPF reuses those class numbers for JMP32 and ALU64).
RET, MISC = 0x06, 0x07
ABS = 0x20
RET_A = 0x10  # ``ret a`` rather than ``ret #k``
TAX, TXA = 0x00, 0x80
ALU_OPS = {name: op for name, op in asm.ALU_OPS.items() if name not in ("mov", "arsh")}
__all__ = [
    "ABS", "ALU", "ALU_OPS", "B", "H", "IMM", "JMP", "JMP_OPS", "K", "LD", "LDX", "MAXINSNS", "MEM",
    "MEMWORDS", "MISC", "RET", "RET_A", "SKF_AD_OFF", "SKF_AD_PROTOCOL", "SKF_NET_OFF", "ST", "TAX",
    "TXA", "W", "X", "CInsn", "Item", "alu", "alux", "assemble", "disassemble", "encode", "ja", "jmp",
    "ld_abs", "ld_imm", "ld_mem", "ldx_mem", "ret", "st", "tax", "txa",
]  # fmt: skip
JMP_OPS = {"ja": 0x00, "jeq": 0x10, "jgt": 0x20, "jge": 0x30, "jset": 0x40}
MAXINSNS = 4096  # BPF_MAXINSNS: the kernel refuses longer classic programs
MEMWORDS = 16  # BPF_MEMWORDS: scratch words M[0..15]
MAX_COND_JUMP = 255
# Negative offsets of ``ld [k]`` that read outside the packet data (linux/filter.h).
SKF_AD_OFF = -0x1000
SKF_AD_PROTOCOL = 0
SKF_NET_OFF = -0x100000

_ALU_NAMES = {v: k for k, v in ALU_OPS.items()}
_JMP_NAMES = {v: k for k, v in JMP_OPS.items()}
_SIZE_NAMES = {W: "", H: "h", B: "b"}


@dataclass(frozen=True)
class CInsn:
    code: int
    jt: int = 0
    jf: int = 0
    k: int = 0
    # Labels resolved by ``assemble``; None on a conditional jump means "the next instruction".
    target_t: str | None = None
    target_f: str | None = None

    def encode(self) -> bytes:
        return struct.pack("=HBBI", self.code, self.jt, self.jf, self.k & 0xFFFFFFFF)


Item = CInsn | str


def ld_abs(size: int, offset: int) -> CInsn:
    """A = packet word/half/byte at ``offset`` (negative: SKF_NET_OFF/SKF_AD_OFF areas), host order."""
    return CInsn(LD | size | ABS, k=offset & 0xFFFFFFFF)


def ld_imm(value: int) -> CInsn:
    return CInsn(LD | W | IMM, k=value)


def ld_mem(index: int) -> CInsn:
    return CInsn(LD | W | MEM, k=_word(index))


def ldx_mem(index: int) -> CInsn:
    return CInsn(LDX | W | MEM, k=_word(index))


def st(index: int) -> CInsn:
    return CInsn(ST, k=_word(index))


def alu(op: str, value: int) -> CInsn:
    return CInsn(ALU | K | ALU_OPS[op], k=value)


def alux(op: str) -> CInsn:
    return CInsn(ALU | X | ALU_OPS[op])


def tax() -> CInsn:
    return CInsn(MISC | TAX)


def txa() -> CInsn:
    return CInsn(MISC | TXA)


def jmp(op: str, value: int, if_true: str | None, if_false: str | None) -> CInsn:
    return CInsn(JMP | K | JMP_OPS[op], k=value, target_t=if_true, target_f=if_false)


def ja(target: str) -> CInsn:
    return CInsn(JMP | JMP_OPS["ja"], target_t=target)


def ret(value: int) -> CInsn:
    return CInsn(RET | K, k=value)


def _word(index: int) -> int:
    if not 0 <= index < MEMWORDS:
        raise ValueError(f"scratch word M[{index}] does not exist (0..{MEMWORDS - 1})")
    return index


def _is_ja(insn: CInsn) -> bool:
    return insn.code == JMP | JMP_OPS["ja"]


def assemble(items: Sequence[Item]) -> list[CInsn]:
    """Resolve labels into forward offsets; returns the instructions only."""
    positions, insns = split_labels(items)

    def offset(pc: int, label: str | None, limit: int) -> int:
        if label is None:
            return 0
        if label not in positions:
            raise ValueError(f"jump to undefined label {label!r}")
        distance = positions[label] - pc - 1
        if not 0 <= distance <= limit:
            raise ValueError(f"jump at {pc} to {label!r} is {distance} ahead: classic BPF reaches 0..{limit}")
        return distance

    resolved = []
    for pc, insn in enumerate(insns):
        if _is_ja(insn):
            insn = replace(insn, k=offset(pc, insn.target_t, 0xFFFFFFFF), target_t=None)
        elif insn.code & 0x07 == JMP:
            insn = replace(
                insn,
                jt=offset(pc, insn.target_t, MAX_COND_JUMP),
                jf=offset(pc, insn.target_f, MAX_COND_JUMP),
                target_t=None,
                target_f=None,
            )
        resolved.append(insn)
    return resolved


def encode(insns: Sequence[CInsn]) -> bytes:
    return b"".join(insn.encode() for insn in insns)


def _address(k: int) -> str:
    signed = k - (1 << 32) if k & 0x80000000 else k
    if signed == SKF_AD_OFF + SKF_AD_PROTOCOL:
        return "proto"
    if SKF_NET_OFF <= signed < SKF_AD_OFF:
        return f"net+{signed - SKF_NET_OFF}"
    return str(signed)


def _format(pc: int, insn: CInsn) -> str:
    cls, k = insn.code & 0x07, insn.k
    if cls == LD and insn.code & 0xE0 == ABS:
        return f"ld{_SIZE_NAMES[insn.code & 0x18]} [{_address(k)}]"
    if cls == LD and insn.code & 0xE0 == MEM:
        return f"ld M[{k}]"
    if cls == LD:
        return f"ld #{k:#x}"
    if cls == LDX:
        return f"ldx M[{k}]"
    if cls == ST:
        return f"st M[{k}]"
    if cls == ALU:
        name = _ALU_NAMES[insn.code & 0xF0]
        return f"{name} x" if insn.code & X else f"{name} #{k:#x}"
    if cls == JMP:
        name = _JMP_NAMES[insn.code & 0xF0]
        if name == "ja":
            return f"ja {pc + 1 + k}"
        return f"{name} #{k:#x} jt {pc + 1 + insn.jt} jf {pc + 1 + insn.jf}"
    if cls == RET:
        return "ret a" if insn.code & RET_A else f"ret #{k}"
    if cls == MISC:
        return "txa" if insn.code & TXA else "tax"
    return f"<code {insn.code:#06x}>"


def disassemble(insns: Sequence[CInsn]) -> str:
    return "\n".join(f"{pc:4d}: {_format(pc, insn)}" for pc, insn in enumerate(insns))
