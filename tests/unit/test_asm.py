from __future__ import annotations

import pytest

from ebpf_sticky.hashing import HashSpec, program_constants
from ebpf_sticky.kernel import asm, program


def test_labels_resolve_to_relative_offsets() -> None:
    insns = asm.assemble(
        [asm.jmp("jeq", asm.R1, 0, "out"), *asm.ld_imm64(asm.R0, 1 << 40), "out", asm.exit_()]
    )
    assert insns[0].off == 2  # skips both halves of the 16-byte load
    assert asm.disassemble(insns).splitlines() == [
        "   0: if r1 == 0 goto 3",
        "   1: r0 = 0x10000000000 ll",
        "   3: exit",
    ]


def test_bad_labels() -> None:
    with pytest.raises(ValueError, match="undefined label"):
        asm.assemble([asm.ja("nowhere")])
    with pytest.raises(ValueError, match="defined twice"):
        asm.assemble(["a", "a", asm.exit_()])


def test_program_is_small_and_ends_in_exit() -> None:
    insns = program.build(program_constants(HashSpec(bytes(16))), program.MapFds(3, 4, 5, 6))
    assert len(insns) < 320
    assert insns[-1] == asm.exit_()
    text = asm.disassemble(insns)
    assert "call 68" in text and "call 82" in text and "map_fd(3)" in text
