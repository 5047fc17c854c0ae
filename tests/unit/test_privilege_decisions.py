"""The pure decisions behind least privilege: what the master keeps, what an EPERM means, the
filter's shape. The kernel-facing halves are tested end to end in tests/e2e/test_privileges.py."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ebpf_sticky.errors import BpfDeniedError, PrivilegeError
from ebpf_sticky.kernel import capabilities as caps
from ebpf_sticky.kernel import seccomp
from ebpf_sticky.supervisor.privileges import master_needs

BPF, SYS_ADMIN, NET_ADMIN = (
    caps.mask(caps.CAP_BPF),
    caps.mask(caps.CAP_SYS_ADMIN),
    caps.mask(caps.CAP_NET_ADMIN),
)


@pytest.mark.parametrize(
    ("uid", "gid", "port", "expected"),
    [
        (None, None, 8000, 0),
        (65534, None, 8000, caps.mask(caps.CAP_SETUID, caps.CAP_SETGID, caps.CAP_KILL)),
        (None, 65534, 8000, caps.mask(caps.CAP_SETUID, caps.CAP_SETGID)),
        (None, None, 80, caps.mask(caps.CAP_NET_BIND_SERVICE)),
        (None, None, 1024, 0),
    ],
    ids=["plain", "user", "group-only", "low-port", "first-unprivileged-port"],
)
def test_master_keeps_only_what_running_the_group_takes(
    uid: int | None, gid: int | None, port: int, expected: int
) -> None:
    needs = master_needs(worker_uid=uid, worker_gid=gid, port=port, unprivileged_port_start=1024)
    assert needs == expected
    assert not needs & (BPF | SYS_ADMIN | NET_ADMIN)


def test_a_pid_file_where_the_master_cannot_write_keeps_dac_override() -> None:
    needs = master_needs(
        worker_uid=None, worker_gid=None, port=8000, unprivileged_port_start=1024, pid_dir_writable=False
    )
    assert needs == caps.mask(caps.CAP_DAC_OVERRIDE)


def test_missing_cap_bpf_is_named_and_never_says_privileged() -> None:
    error = caps.explain_eperm("creating BPF map 'm'", NET_ADMIN, "0", True)
    assert type(error) is PrivilegeError
    assert "this process lacks CAP_BPF (or CAP_SYS_ADMIN): run as root, or grant CAP_BPF" in str(error)
    assert "--privileged" not in str(error) and error.fix in str(error)


@pytest.mark.parametrize("held", [BPF, SYS_ADMIN, BPF | NET_ADMIN], ids=["bpf", "sys-admin", "bpf-net-admin"])
def test_capability_held_and_eperm_means_a_filter(held: int) -> None:
    error = caps.explain_eperm("loading BPF program 'p'", held, "2", True)
    assert isinstance(error, BpfDeniedError) and isinstance(error, PrivilegeError)
    text = str(error)
    assert "denied by a seccomp filter or an LSM, not for lack of capabilities" in text
    assert "this process runs under a seccomp filter" in text
    assert (
        "seccomp profile that allows bpf(2)" in text and "CAP_SYS_ADMIN" in text and "--loader cbpf" in text
    )


def test_no_seccomp_filter_points_at_an_lsm() -> None:
    assert "so an LSM" in str(caps.explain_eperm("x", BPF, "0", True))


def test_user_namespace_capabilities_are_not_blamed_on_a_filter() -> None:
    error = caps.explain_eperm("x", BPF | NET_ADMIN, "2", False)
    assert not isinstance(error, BpfDeniedError)
    assert "user namespace" in str(error)


def test_status_parsing_and_names() -> None:
    status = (
        "CapInh:\t0\nCapPrm:\t0000008000001000\nCapEff:\t0000008000001000\n"
        "CapBnd:\t1ff\nCapAmb:\t0\nSeccomp:\t2\n"
    )
    found = caps.parse_status(status)
    assert found.permitted == found.effective == BPF | NET_ADMIN
    assert found.holding(caps.ALL) == BPF | NET_ADMIN
    assert caps.names(found.permitted) == "cap_net_admin,cap_bpf"
    assert caps.names(0) == "none"
    assert caps.status_field(status, "Seccomp") == "2"


def decode(program: bytes) -> list[tuple[int, int, int, int]]:
    return [struct.unpack("=HBBI", program[i : i + 8]) for i in range(0, len(program), 8)]


@pytest.mark.parametrize("machine", sorted(seccomp.ARCHES))
@pytest.mark.parametrize("listener", list(seccomp.Listener))
def test_filter_checks_the_arch_first_and_every_jump_lands_on_an_instruction(
    machine: str, listener: seccomp.Listener
) -> None:
    insns = decode(seccomp.filter_program(machine, listener))
    assert insns[0] == (seccomp.LD_W_ABS, 0, 0, seccomp.ARCH)
    code, jt, jf, k = insns[1]
    assert (code, k) == (seccomp.JEQ_K, seccomp.ARCHES[machine].audit)
    assert insns[2 + jf] == (seccomp.RET_K, 0, 0, seccomp.RET_KILL_PROCESS)  # a foreign arch is killed
    for pc, (code, jt, jf, _) in enumerate(insns):
        if code != seccomp.RET_K and code != seccomp.LD_W_ABS:
            assert pc + 1 + max(jt, jf) < len(insns)
    assert {k for code, _, _, k in insns if code == seccomp.RET_K} == {
        seccomp.RET_ALLOW,
        seccomp.RET_ERRNO_EPERM,
        seccomp.RET_KILL_PROCESS,
    }
    x32 = [k for code, _, _, k in insns if code == seccomp.JGE_K]
    assert x32 == ([seccomp.X32_SYSCALL_BIT] if machine == "x86_64" else [])


def run_filter(program: bytes, arch: int, nr: int, args: tuple[int, ...]) -> int:
    """Interpret a seccomp filter as the kernel would, on one struct seccomp_data."""
    data = struct.pack("=II8x6Q", nr, arch, *args)  # nr as the u32 word the filter loads
    insns = decode(program)
    pc, acc = 0, 0
    while True:
        code, jt, jf, k = insns[pc]
        if code == seccomp.RET_K:
            return k
        if code == seccomp.LD_W_ABS:
            acc = struct.unpack_from("=I", data, k)[0]
            pc += 1
        else:
            taken = acc == k if code == seccomp.JEQ_K else acc >= k
            pc += 1 + (jt if taken else jf)


X86 = seccomp.ARCHES["x86_64"]
SETSOCKOPT_LISTENER = {25, 62}  # SO_BINDTODEVICE, SO_BINDTOIFINDEX: refused on fd 3 only
PROGRAM_OPTIONS = {51, 52, 68}  # attach cBPF, attach eBPF, detach: refused on every fd


def expected(listener: seccomp.Listener, nr: int, args: tuple[int, ...]) -> int:
    """The verdict the filter's docstring promises, written independently of its layout."""
    fd, second, third = (a & 0xFFFFFFFF for a in args[:3])
    eperm = seccomp.RET_ERRNO_EPERM
    if nr >= seccomp.X32_SYSCALL_BIT:
        return seccomp.RET_KILL_PROCESS
    if nr in X86.denied:
        return eperm
    if nr in X86.unhash and fd == 3:
        return eperm
    sealed = listener is seccomp.Listener.SEALED
    if sealed and nr in X86.dups and fd == 3:
        return eperm
    if sealed and nr == X86.fcntl and fd == 3 and second in (seccomp.F_DUPFD, seccomp.F_DUPFD_CLOEXEC):
        return eperm
    refused = third in PROGRAM_OPTIONS or (third in SETSOCKOPT_LISTENER and fd == 3)
    if nr == X86.setsockopt and second == seccomp.SOL_SOCKET and refused:
        return eperm
    return seccomp.RET_ALLOW


INTERESTING_NRS = sorted({*X86.denied, *X86.unhash, *X86.dups, X86.fcntl, X86.setsockopt, 0, 1, 50})
INTERESTING_ARGS = [0, 1, 2, 3, 4, 25, 51, 52, 62, 68, 1030, 3 | 1 << 32, 1 << 32, 0xFFFFFFFF]


@given(
    listener=st.sampled_from(list(seccomp.Listener)),
    nr=st.one_of(st.sampled_from(INTERESTING_NRS), st.integers(0, 0xFFFFFFFF)),
    args=st.tuples(*[st.one_of(st.sampled_from(INTERESTING_ARGS), st.integers(0, 2**64 - 1))] * 6),
)
def test_filter_verdicts_match_the_stated_rules(
    listener: seccomp.Listener, nr: int, args: tuple[int, ...]
) -> None:
    program = seccomp.filter_program("x86_64", listener)
    assert run_filter(program, X86.audit, nr, args) == expected(listener, nr, args)


def test_filter_kills_a_foreign_arch() -> None:
    program = seccomp.filter_program("x86_64")
    assert run_filter(program, 0x40000003, 366, (3, 1, 68, 0, 0, 0)) == seccomp.RET_KILL_PROCESS  # i386
