"""A memory cgroup per run (root only), below the host's own memory cgroup.

RLIMIT_AS bounds each process's address space, but not what a run can hold outside it: tmpfs
files, SysV shared memory, memfd files, the sum over its processes. A cgroup with a memory
limit bounds all of it together; the driver joins it before it forks anything, and what the
run allocated is charged there (and, the hierarchy being nested, to the host's cgroup above).
cgroup v1 (a ``memory`` hierarchy) and v2 (the unified hierarchy, when the host's cgroup may
delegate the memory controller) are both handled; where neither is writable the sandbox has no
cgroup, and the seccomp filter refuses ``memfd_create``, ``shmget`` and ``msgget`` instead.
"""

from __future__ import annotations

import contextlib
import functools
import os
import time
from collections.abc import Iterator

# The sandbox's own processes (driver, init, judge: small interpreters) on top of the
# program's limit; they share most pages through fork.
OVERHEAD_BYTES = 64 * 1024**2


def own_memory_cgroup(proc_self_cgroup: str, mountinfo: str) -> tuple[int, str] | None:
    """``(version, directory)`` of this process's memory cgroup, from the text of
    ``/proc/self/cgroup`` and ``/proc/self/mountinfo``; None when there is none mounted.
    A v1 ``memory`` hierarchy wins over the unified one (that is where the limit applies)."""
    v1_path = v2_path = None
    for entry in proc_self_cgroup.splitlines():
        number, controllers, path = entry.split(":", 2)
        if "memory" in controllers.split(","):
            v1_path = path
        elif number == "0" and controllers == "":
            v2_path = path
    v1_mount = v2_mount = None
    for entry in mountinfo.splitlines():
        fields = entry.split()
        dash = fields.index("-")
        root, point, fstype, options = fields[3], fields[4], fields[dash + 1], fields[dash + 3]
        if root != "/":
            continue  # a bind of part of a hierarchy: paths would not line up
        if fstype == "cgroup" and "memory" in options.split(","):
            v1_mount = point
        elif fstype == "cgroup2":
            v2_mount = point
    if v1_path is not None and v1_mount is not None:
        return 1, os.path.join(v1_mount, v1_path.lstrip("/"))
    if v2_path is not None and v2_mount is not None:
        return 2, os.path.join(v2_mount, v2_path.lstrip("/"))
    return None


def _write(path: str, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)


def _limit(version: int, directory: str, memory_bytes: int) -> None:
    if version == 1:
        _write(os.path.join(directory, "memory.limit_in_bytes"), str(memory_bytes))
        swap = os.path.join(directory, "memory.memsw.limit_in_bytes")  # memory + swap
        if os.path.exists(swap):
            _write(swap, str(memory_bytes))
    else:
        _write(os.path.join(directory, "memory.max"), str(memory_bytes))
        swap = os.path.join(directory, "memory.swap.max")
        if os.path.exists(swap):
            _write(swap, "0")


def _remove(directory: str, wait_s: float = 2.0) -> bool:
    """rmdir ``directory`` once its processes are gone (a killed run's take a moment);
    True when it is gone. Never raises."""
    deadline = time.monotonic() + wait_s
    while True:
        try:
            os.rmdir(directory)
            return True
        except FileNotFoundError:
            return True
        except OSError:
            if time.monotonic() > deadline:
                return False
            time.sleep(0.002)


@functools.cache
def memory_cgroup_parent() -> tuple[int, str] | None:
    """Where per-run cgroups can be made (probed once: a child is made, limited and removed),
    or None: not root, no memory cgroup mounted, or not writable."""
    if os.geteuid() != 0:
        return None
    try:
        with open("/proc/self/cgroup") as f, open("/proc/self/mountinfo") as g:
            found = own_memory_cgroup(f.read(), g.read())
        if found is None:
            return None
        version, directory = found
        if version == 2:
            with open(os.path.join(directory, "cgroup.subtree_control")) as f:
                if "memory" not in f.read().split():
                    _write(os.path.join(directory, "cgroup.subtree_control"), "+memory")
        probe = os.path.join(directory, f"wmtp_sandbox_probe_{os.getpid()}")
        os.mkdir(probe)
        try:
            _limit(version, probe, OVERHEAD_BYTES)
        finally:
            _remove(probe)
        return found
    except (OSError, ValueError):
        return None


@contextlib.contextmanager
def run_cgroup(name: str, memory_bytes: int) -> Iterator[str | None]:
    """A fresh cgroup ``name`` limited to ``memory_bytes + OVERHEAD_BYTES`` while the block
    runs; yields the path of its ``cgroup.procs`` (None where cgroups are unavailable), and
    removes it afterwards (waiting for its processes to be gone, never raising)."""
    parent = memory_cgroup_parent()
    if parent is None:
        yield None
        return
    version, directory = parent
    path = os.path.join(directory, name)
    _remove(path, wait_s=0.0)  # a leftover of a crashed host
    os.mkdir(path)
    try:
        _limit(version, path, memory_bytes + OVERHEAD_BYTES)
        yield os.path.join(path, "cgroup.procs")
    finally:
        _remove(path)
