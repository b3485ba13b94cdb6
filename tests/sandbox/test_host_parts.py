"""The host's pure pieces: the channel line parser, bounded channel reads, finding the memory
cgroup, and the seccomp filter (run by an independent classic-BPF interpreter)."""

import os
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from wmtp_fn.sandbox import driver, kernel
from wmtp_fn.sandbox.cgroup import own_memory_cgroup
from wmtp_fn.sandbox.host import MAX_LINE, parse_lines, read_channel

NONCE = "0123456789abcdef0123456789abcdef"


def test_parse_lines_golden():
    data = b"".join([
        driver.line(NONCE, "failed", "AssertionError: é"),
        b"junk\n",
        driver.line("f" * 32, "passed", ""),  # another nonce
        NONCE.encode() + b" passed zz\n",  # not hex
        NONCE.encode() + b" passed " + b"ab" * MAX_LINE + b"\n",  # too long
        NONCE.encode() + b" unavailable 61 62\n",  # three fields
        driver.line(NONCE, "passed", ""),
    ])
    assert parse_lines(data, NONCE) == [("failed", "AssertionError: é"), ("passed", "")]


@settings(max_examples=200, deadline=None)
@given(st.lists(st.binary(max_size=40) | st.just(NONCE.encode() + b" "), max_size=8))
def test_parse_lines_never_raises(pieces):
    data = b"".join(pieces) + b"[" * 10_000
    for status, message in parse_lines(data, NONCE):
        assert status.isalpha() and isinstance(message, str)


def test_read_channel_is_bounded():
    r, w = os.pipe()
    try:
        os.write(w, b"x" * 50_000)
        os.write(w, b"y" * 15_536)
        assert read_channel(r) == b"x" * 50_000 + b"y" * 15_536  # 64 KiB
        assert read_channel(r) == b""  # nothing more, and no blocking while the writer lives
    finally:
        os.close(r)
        os.close(w)


_MOUNTINFO = """\
22 27 0:21 / /proc rw,relatime - proc proc rw
35 31 0:32 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory
36 31 0:33 / /sys/fs/cgroup/devices rw,relatime - cgroup cgroup rw,devices
41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw
50 31 0:32 /sub /mnt/partial rw,relatime - cgroup cgroup rw,memory
"""


def test_own_memory_cgroup():
    v1 = "5:devices:/\n4:memory:/jobs/42\n0::/jobs/42\n"
    assert own_memory_cgroup(v1, _MOUNTINFO) == (1, "/sys/fs/cgroup/memory/jobs/42")
    v2_only = "0::/user.slice/run\n"
    assert own_memory_cgroup(v2_only, _MOUNTINFO) == (2, "/sys/fs/cgroup/unified/user.slice/run")
    assert own_memory_cgroup("4:memory:/x\n", "22 27 0:21 / /proc rw - proc proc rw\n") is None
    combined = "4:cpu,memory:/a\n"  # controllers mounted together
    assert own_memory_cgroup(combined, _MOUNTINFO.replace("rw,memory", "rw,cpu,memory")) == (
        1, "/sys/fs/cgroup/memory/a")


# ---------------------------------------------------------------- seccomp, interpreted

_X86_64 = 0xC000003E


def run_bpf(program, nr, args=(0,) * 6, arch=_X86_64):
    """The filter's return value for a syscall, by a classic-BPF interpreter written here
    (struct seccomp_data: nr, arch, instruction pointer, six 64-bit arguments)."""
    data = struct.pack("<iIQ6Q", nr, arch, 0, *args)
    acc, pc = 0, 0
    while True:
        code, jt, jf, k = program[pc]
        pc += 1
        if code == 0x20:  # BPF_LD | BPF_W | BPF_ABS
            acc = struct.unpack_from("<I", data, k)[0]
        elif code == 0x54:  # BPF_ALU | BPF_AND | BPF_K
            acc &= k
        elif code in (0x15, 0x35, 0x45):  # JEQ, JGE, JSET
            taken = {0x15: acc == k, 0x35: acc >= k, 0x45: bool(acc & k)}[code]
            pc += jt if taken else jf
        elif code == 0x06:  # BPF_RET | BPF_K
            return k
        else:
            raise AssertionError(f"unknown instruction {code:#x}")


ALLOW, EACCES, ENOSYS = 0x7FFF0000, 0x00050000 | 13, 0x00050000 | 38


@pytest.mark.parametrize("memory_cgroup", [True, False])
def test_seccomp_decisions(memory_cgroup):
    nr = kernel._SECCOMP_ARCHES["x86_64"][2]
    program = kernel.seccomp_program("x86_64", memory_cgroup)
    assert all(0 <= jt < 256 and 0 <= jf < 256 for _, jt, jf, _ in program)
    socket = lambda family, kind=1: run_bpf(program, nr["socket"], (family, kind, 0, 0, 0, 0))  # noqa: E731
    assert socket(2) == ALLOW and socket(10) == ALLOW  # INET, INET6 (the empty netns confines them)
    assert socket(1) == EACCES and socket(40) == EACCES and socket(16) == EACCES  # unix, vsock, netlink
    pair = lambda kind: run_bpf(program, nr["socketpair"], (1, kind, 0, 0, 0, 0))  # noqa: E731
    assert pair(1) == ALLOW and pair(5) == ALLOW and pair(2) == EACCES  # stream, seqpacket; dgram
    assert pair(1 | 0o2000000) == ALLOW  # SOCK_CLOEXEC is not the type
    clone = lambda flags: run_bpf(program, nr["clone"], (flags, 0, 0, 0, 0, 0))  # noqa: E731
    assert clone(0x01200011) == ALLOW  # what fork() passes
    for flag in (kernel.CLONE_NEWUSER, kernel.CLONE_NEWNS, kernel.CLONE_NEWNET, kernel.CLONE_NEWPID):
        assert clone(0x11 | flag) == EACCES
    assert run_bpf(program, nr["clone3"]) == ENOSYS  # libc falls back to clone
    for name in ("unshare", "setns", "io_uring_setup", "keyctl", "add_key"):
        assert run_bpf(program, nr[name]) == EACCES, name
    for name in ("memfd_create", "shmget", "msgget"):
        assert run_bpf(program, nr[name]) == (ALLOW if memory_cgroup else EACCES), name
    assert run_bpf(program, 0) == ALLOW and run_bpf(program, 59) == ALLOW  # read, execve
    assert run_bpf(program, 0x40000000 + 41) == EACCES  # the x32 ABI's numbers
    assert run_bpf(program, 0, arch=0x40000003) == EACCES  # another architecture (i386)
