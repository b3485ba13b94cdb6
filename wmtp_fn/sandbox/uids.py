"""A pool of unprivileged uids for runs started by root: one uid per concurrent run.

Each run gets ``UID_BASE + slot`` exclusively (a cross-process ``flock`` per slot); uids that
exist in ``/etc/passwd`` are never used; a slot is handed out only once its uid has no process
at all (not even a zombie), so a run can neither meet nor signal another's processes, and
RLIMIT_NPROC counts only its own.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import pwd
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator

# uids 1_900_000_000 + slot: above systemd's container range (524288-1879048191), below the
# 2^31 range systemd marks unusable, far from login users and subuid ranges.
UID_BASE = 1_900_000_000
N_SLOTS = 64
LOCK_DIR = os.path.join(tempfile.gettempdir(), "wmtp_fn_sandbox_locks")


def _uid_processes(uid: int) -> tuple[list[int], list[int]]:
    """``(live, zombies)``: processes whose real uid is ``uid`` (from each ``/proc/PID/status``:
    its ``State:`` and ``Uid:`` lines, found directly; this runs twice per run)."""
    live, zombies = [], []
    wanted = b"\nUid:\t%d\t" % uid
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/status", "rb") as f:
                status = f.read()
        except OSError:
            continue
        if wanted in status:
            state = status[status.find(b"\nState:") + 8:].lstrip()[:1]
            (zombies if state == b"Z" else live).append(int(name))
    return live, zombies


_REAPER = (
    "import os, signal, sys\n"
    "u = int(sys.argv[1])\n"
    "os.setgroups([])\n"
    "os.setresgid(u, u, u)\n"
    "os.setresuid(u, u, u)\n"
    "os.kill(-1, signal.SIGKILL)\n"
)


def reap_uid(uid: int, python: str = sys.executable) -> list[int]:
    """Kill every live process of ``uid`` (root only); returns the zombies left behind.

    ``kill(-1, SIGKILL)`` sent *as* that uid reaches all of its processes in one atomic sweep,
    so a fork bomb cannot outrun it; it is repeated while any survives. Zombies are their new
    parent's to reap (init may take a second); they still count against RLIMIT_NPROC, so
    ``uid_slot`` hands out a slot only once its uid has no process at all.
    """
    for _ in range(1000):
        live, zombies = _uid_processes(uid)
        if not live:
            return zombies
        subprocess.run(
            [python, "-S", "-B", "-c", _REAPER, str(uid)], check=False, env={},
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
    raise RuntimeError(f"sandbox: processes of uid {uid} survive SIGKILL: {_uid_processes(uid)[0]}")


def _mapped(uid: int) -> bool:
    try:
        with open("/proc/self/uid_map") as f:
            ranges = [tuple(map(int, line.split())) for line in f]
    except OSError:
        return True
    return any(inside <= uid < inside + count for inside, _, count in ranges)


def _lock_dir() -> str:
    os.makedirs(LOCK_DIR, mode=0o700, exist_ok=True)
    st = os.lstat(LOCK_DIR)
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != 0 or st.st_mode & 0o077:
        raise RuntimeError(
            f"sandbox: {LOCK_DIR} must be a directory owned by root with mode 0700 "
            f"(got uid {st.st_uid}, mode {oct(st.st_mode)})"
        )
    return LOCK_DIR


@contextlib.contextmanager
def uid_slot(uid_base: int = UID_BASE, n_slots: int = N_SLOTS) -> Iterator[int]:
    """Hold one sandbox uid exclusively (across threads and processes) while the block runs."""
    directory = _lock_dir()
    while True:
        for slot in range(n_slots):
            uid = uid_base + slot
            try:
                pwd.getpwuid(uid)
                continue  # a real account: never run (or mass-kill) as it
            except KeyError:
                pass
            if not _mapped(uid):
                raise RuntimeError(f"sandbox: uid {uid} is not mapped in this user namespace")
            fd = os.open(os.path.join(directory, f"uid-{uid}.lock"), os.O_RDWR | os.O_CREAT, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                continue
            try:
                # Leftovers of an earlier run (its zombies, or a crashed holder's processes)
                # would eat into RLIMIT_NPROC: only a uid with no process at all is handed out.
                if reap_uid(uid):
                    continue
                yield uid
                return
            finally:
                os.close(fd)
        time.sleep(0.05)
