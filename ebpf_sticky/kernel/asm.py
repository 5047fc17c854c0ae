"""eBPF instructions as plain values: build them, assemble them to bytes, print them back.

A program is a list of ``Insn`` and label strings. Jumps name their label; ``assemble`` resolves
the offsets, so a program reads top to bottom like the C it mirrors. ``disassemble`` prints the
result in the kernel's verifier-log style, which is what you compare against when the verifier
rejects something.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import TypeVar

# Instruction classes.
LD, LDX, ST, STX, ALU, JMP, ALU64 = 0x00, 0x01, 0x02, 0x03, 0x04, 0x05, 0x07
# Sizes and modes.
W, H, B, DW = 0x00, 0x08, 0x10, 0x18
IMM, MEM = 0x00, 0x60
# Operand source: immediate or register.
K, X = 0x00, 0x08

ALU_OPS = {
    "add": 0x00,
    "sub": 0x10,
    "mul": 0x20,
    "div": 0x30,
    "or": 0x40,
    "and": 0x50,
    "lsh": 0x60,
    "rsh": 0x70,
    "mod": 0x90,
    "xor": 0xA0,
    "mov": 0xB0,
    "arsh": 0xC0,
}
JMP_OPS = {
    "ja": 0x00,
    "jeq": 0x10,
    "jgt": 0x20,
    "jge": 0x30,
    "jset": 0x40,
    "jne": 0x50,
    "jsgt": 0x60,
    "jsge": 0x70,
    "jlt": 0xA0,
    "jle": 0xB0,
}
CALL, EXIT = 0x80, 0x90
PSEUDO_MAP_FD = 1

R0, R1, R2, R3, R4, R5, R6, R7, R8, R9, R10 = range(11)

_SIZE_NAMES = {W: "u32", H: "u16", B: "u8", DW: "u64"}
_ALU_NAMES = {v: k for k, v in ALU_OPS.items()}
_JMP_NAMES = {v: k for k, v in JMP_OPS.items()}
_JMP_SYMBOLS = {
    "jeq": "==",
    "jgt": ">",
    "jge": ">=",
    "jset": "&",
    "jne": "!=",
    "jsgt": "s>",
    "jsge": "s>=",
    "jlt": "<",
    "jle": "<=",
}


@dataclass(frozen=True)
class Insn:
    code: int
    dst: int = 0
    src: int = 0
    off: int = 0
    imm: int = 0
    target: str | None = None  # label a jump goes to, resolved by ``assemble``

    def encode(self) -> bytes:
        return struct.pack("<BBhi", self.code, (self.src << 4) | self.dst, self.off, self.imm)


Item = Insn | str
T = TypeVar("T")


def _s32(value: int) -> int:
    """An immediate as the signed 32-bit field holds it (the kernel sign-extends for ALU64)."""
    value &= 0xFFFFFFFF
    return value - (1 << 32) if value & 0x80000000 else value


def alu64(op: str, dst: int, imm: int) -> Insn:
    return Insn(ALU64 | K | ALU_OPS[op], dst, imm=_s32(imm))


def alu64r(op: str, dst: int, src: int) -> Insn:
    return Insn(ALU64 | X | ALU_OPS[op], dst, src)


def alu32(op: str, dst: int, imm: int) -> Insn:
    """32-bit ALU: the result is zero-extended, so a mask never drags sign bits into the top."""
    return Insn(ALU | K | ALU_OPS[op], dst, imm=_s32(imm))


def mov(dst: int, imm: int) -> Insn:
    return alu64("mov", dst, imm)


def movr(dst: int, src: int) -> Insn:
    return alu64r("mov", dst, src)


def ld_imm64(dst: int, value: int) -> list[Insn]:
    value &= (1 << 64) - 1
    return [
        Insn(LD | DW | IMM, dst, imm=_s32(value)),
        Insn(0, imm=_s32(value >> 32)),
    ]


def ld_map_fd(dst: int, fd: int) -> list[Insn]:
    return [Insn(LD | DW | IMM, dst, PSEUDO_MAP_FD, imm=fd), Insn(0)]


def ldx(size: int, dst: int, src: int, off: int) -> Insn:
    return Insn(LDX | MEM | size, dst, src, off)


def stx(size: int, dst: int, src: int, off: int) -> Insn:
    return Insn(STX | MEM | size, dst, src, off)


def st(size: int, dst: int, off: int, imm: int) -> Insn:
    return Insn(ST | MEM | size, dst, off=off, imm=_s32(imm))


def jmp(op: str, dst: int, imm: int, target: str) -> Insn:
    return Insn(JMP | K | JMP_OPS[op], dst, imm=_s32(imm), target=target)


def ja(target: str) -> Insn:
    return Insn(JMP | JMP_OPS["ja"], target=target)


def call(helper: int) -> Insn:
    return Insn(JMP | CALL, imm=helper)


def exit_() -> Insn:
    return Insn(JMP | EXIT)


def split_labels(items: Sequence[T | str]) -> tuple[dict[str, int], list[T]]:
    """Labels' positions and the instructions alone (shared with ``casm``)."""
    positions: dict[str, int] = {}
    insns: list[T] = []
    for item in items:
        if isinstance(item, str):
            if item in positions:
                raise ValueError(f"label {item!r} defined twice")
            positions[item] = len(insns)
        else:
            insns.append(item)
    return positions, insns


def assemble(items: Sequence[Item]) -> list[Insn]:
    """Resolve labels into jump offsets; returns the instructions only."""
    positions, insns = split_labels(items)
    resolved = []
    for pc, insn in enumerate(insns):
        if insn.target is not None:
            if insn.target not in positions:
                raise ValueError(f"jump to undefined label {insn.target!r}")
            insn = replace(insn, off=positions[insn.target] - pc - 1, target=None)
        resolved.append(insn)
    return resolved


def encode(insns: Sequence[Insn]) -> bytes:
    return b"".join(insn.encode() for insn in insns)


def _operand(insn: Insn) -> str:
    return f"r{insn.src}" if insn.code & X else str(insn.imm)


def _format(pc: int, insn: Insn, nxt: Insn | None) -> str:
    cls = insn.code & 0x07
    if cls in (ALU, ALU64):
        reg = "r" if cls == ALU64 else "w"
        op = _ALU_NAMES[insn.code & 0xF0]
        if op == "mov":
            return f"{reg}{insn.dst} = {_operand(insn)}"
        symbol = {
            "add": "+",
            "sub": "-",
            "mul": "*",
            "div": "/",
            "or": "|",
            "and": "&",
            "lsh": "<<",
            "rsh": ">>",
            "mod": "%",
            "xor": "^",
            "arsh": "s>>",
        }[op]
        return f"{reg}{insn.dst} {symbol}= {_operand(insn)}"
    if insn.code == LD | DW | IMM and nxt is not None:
        if insn.src == PSEUDO_MAP_FD:
            return f"r{insn.dst} = map_fd({insn.imm})"
        value = (insn.imm & 0xFFFFFFFF) | ((nxt.imm & 0xFFFFFFFF) << 32)
        return f"r{insn.dst} = {value:#x} ll"
    if cls == LDX:
        return f"r{insn.dst} = *({_SIZE_NAMES[insn.code & 0x18]} *)(r{insn.src} {insn.off:+d})"
    if cls == STX:
        return f"*({_SIZE_NAMES[insn.code & 0x18]} *)(r{insn.dst} {insn.off:+d}) = r{insn.src}"
    if cls == ST:
        return f"*({_SIZE_NAMES[insn.code & 0x18]} *)(r{insn.dst} {insn.off:+d}) = {insn.imm}"
    if cls == JMP:
        jop = insn.code & 0xF0
        if jop == CALL:
            return f"call {insn.imm}"
        if jop == EXIT:
            return "exit"
        name = _JMP_NAMES[jop]
        where = f"goto {pc + 1 + insn.off}"
        if name == "ja":
            return where
        return f"if r{insn.dst} {_JMP_SYMBOLS[name]} {_operand(insn)} {where}"
    return f"<code {insn.code:#04x}>"


def disassemble(insns: Sequence[Insn]) -> str:
    lines = []
    skip = False
    for pc, insn in enumerate(insns):
        if skip:
            skip = False
            continue
        nxt = insns[pc + 1] if pc + 1 < len(insns) else None
        skip = insn.code == LD | DW | IMM
        lines.append(f"{pc:4d}: {_format(pc, insn, nxt)}")
    return "\n".join(lines)
