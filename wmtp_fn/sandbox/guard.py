"""The audit-hook guard: a second layer inside the program's own interpreter.

With ``guard=True`` the driver installs it in the program's process just before the program
runs. It refuses, from inside Python: sockets, ctypes, running other programs (including
``_posixsubprocess.fork_exec``, which raises no audit event), signalling or re-limiting
processes outside the run, and writing, deleting, renaming or linking (either end) files
outside the working directory, including through ``dir_fd``.

A speed bump, not a wall: its policy lives in Python objects of the very interpreter it
guards (closure cells, module attributes), so pure-Python code that digs them out switches it
off. What contains a hostile program is the kernel layer (``kernel.py``); the tests run every
hostile program with the guard off as well. Standalone: standard library only.
"""

import _signal
import os
import sys

from wmtp_fn.sandbox.kernel import proc_table

_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_TRUNC
# audit event → (path, dir_fd) argument positions of every path that a write, delete, rename or
# link touches. Both ends of a link count: a hard link made *to* an outside file in the working
# directory would open that file for writing under an inside name.
_PATH_EVENTS = {
    "os.remove": ((0, 1),), "os.rmdir": ((0, 1),), "os.mkdir": ((0, 2),),
    "os.rename": ((0, 2), (1, 3)), "os.link": ((0, 2), (1, 3)), "os.symlink": ((0, None), (1, 2)),
    "os.chmod": ((0, 2),), "os.chown": ((0, 3),), "os.truncate": ((0, None),),
    "os.utime": ((0, 3),), "shutil.rmtree": ((0, 1),), "os.setxattr": ((0, None),),
    "os.removexattr": ((0, None),), "os.chflags": ((0, None),), "os.lchflags": ((0, None),),
    "os.mkfifo": ((0, 2),), "os.mknod": ((0, 3),),
}
_BLOCKED = {
    "socket.__new__": "network access",
    "socket.connect": "network access",
    "socket.bind": "network access",
    "ctypes.dlopen": "ctypes",
    "ctypes.dlsym": "ctypes",
    "ctypes.cdata": "ctypes",
    "os.exec": "running other programs",
    "os.posix_spawn": "running other programs",
    "os.spawn": "running other programs",
    "os.system": "running other programs",
    "subprocess.Popen": "running other programs",
    "pty.spawn": "running other programs",
}
# Modules whose functions the guard replaces (they raise no audit event): a fresh import of one
# would bring the originals back.
_NO_REIMPORT = ("_posixsubprocess", "posix", "_signal")


def _refuse_fork_exec(*args, **kwargs):
    raise PermissionError("sandbox: running other programs is not allowed (_posixsubprocess.fork_exec)")


def _pidfd_target(fd: int):
    """The pid a pidfd (or an open /proc/PID directory) refers to; None when unknown."""
    try:
        with open(f"/proc/self/fdinfo/{fd}") as f:
            for line in f:
                if line.startswith("Pid:"):
                    return int(line.split()[1])
    except (OSError, ValueError):
        pass
    try:
        link = os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        return None
    return int(link[6:]) if link.startswith("/proc/") and link[6:].isdigit() else None


def _replace_unaudited(ours, inside) -> None:
    """What the audit events do not show: ``_posixsubprocess.fork_exec`` (what ``subprocess``
    uses after its own audited check) runs programs, ``os.pidfd_open`` and
    ``signal.pidfd_send_signal`` signal processes, and ``os.open(..., dir_fd=)`` reports no
    directory. The first is replaced by a refusal, the others by versions that accept only this
    process tree and the working directory. Python code that digs out the originals
    (introspection, a fresh copy of an extension module) gets around this: a second layer."""
    import _posixsubprocess
    import posix

    _posixsubprocess.fork_exec = _refuse_fork_exec
    real_os_open = os.open

    def os_open(path, flags, mode=0o777, *, dir_fd=None):
        if flags & _WRITE_FLAGS and not inside(path, dir_fd):
            raise PermissionError(f"sandbox: writing outside the working directory: {path!r}")
        return real_os_open(path, flags, mode, dir_fd=dir_fd)

    os.open = posix.open = os_open
    if hasattr(os, "pidfd_open"):
        real_open = os.pidfd_open

        def pidfd_open(pid, flags=0, /):
            if pid <= 0 or not ours(pid):
                raise PermissionError(f"sandbox: pidfd of pid {pid} is not allowed")
            return real_open(pid, flags)

        os.pidfd_open = posix.pidfd_open = pidfd_open
    if hasattr(_signal, "pidfd_send_signal"):
        real_send = _signal.pidfd_send_signal

        def pidfd_send_signal(pidfd, sig, siginfo=None, flags=0, /):
            pid = _pidfd_target(pidfd)
            if pid is None or pid <= 0 or not ours(pid):
                raise PermissionError(f"sandbox: signalling pid {pid} is not allowed (pidfd)")
            return real_send(pidfd, sig, siginfo, flags)

        _signal.pidfd_send_signal = pidfd_send_signal  # what `import signal` copies
        if "signal" in sys.modules:
            sys.modules["signal"].pidfd_send_signal = pidfd_send_signal


def install_guard(workdir: str, main_pid: int) -> None:
    """The audit hook of step 2 (cannot be removed once added)."""
    root = os.path.realpath(workdir)
    realpath, fspath, fsdecode, readlink = os.path.realpath, os.fspath, os.fsdecode, os.readlink
    getpgid, getpid, join = os.getpgid, os.getpid, os.path.join

    def inside(path, dir_fd=None) -> bool:
        if isinstance(path, int):
            try:  # an open descriptor (fchmod, ftruncate, ...): where does it point?
                path = readlink(f"/proc/self/fd/{path}")
            except OSError:
                return False
            if not path.startswith("/"):
                return True  # a pipe or socket, not a file
        path = fspath(path)
        path = fsdecode(path) if isinstance(path, bytes) else path
        if isinstance(dir_fd, int) and dir_fd >= 0 and not path.startswith("/"):
            try:  # relative to an open directory, not to the working directory
                path = join(readlink(f"/proc/self/fd/{dir_fd}"), path)
            except OSError:
                return False
        real = realpath(path)
        return real == root or real.startswith(root + "/") or real == "/dev/null"

    def ours(pid: int) -> bool:
        if pid == 0:
            return True  # own process group: only sandbox processes are in it
        if pid < 0:
            return pid != -1 and -pid == getpgid(0)
        if pid == getpid():
            return True
        table = proc_table()
        seen = 0
        while pid in table and seen < 10_000:
            pid = table[pid][0]
            if pid == main_pid:
                return True
            seen += 1
        return False

    def touches_outside(event, args) -> bool:
        for path_at, dir_fd_at in _PATH_EVENTS[event]:
            if path_at < len(args) and args[path_at] is not None:
                dir_fd = args[dir_fd_at] if dir_fd_at is not None and dir_fd_at < len(args) else None
                if not inside(args[path_at], dir_fd):
                    return True
        return False

    def hook(event, args):
        if event == "open":
            path, mode, flags = args
            writing = (isinstance(mode, str) and any(c in mode for c in "wax+")) or (
                isinstance(flags, int) and flags & _WRITE_FLAGS
            )
            if writing and not inside(path):
                raise PermissionError(f"sandbox: writing outside the working directory: {path!r}")
        elif event in _PATH_EVENTS:
            if touches_outside(event, args):
                raise PermissionError(f"sandbox: {event} outside the working directory: {args[:2]!r}")
        elif event in _BLOCKED:
            raise PermissionError(f"sandbox: {_BLOCKED[event]} is not allowed ({event})")
        elif event == "os.kill" and not ours(args[0]):
            raise PermissionError(f"sandbox: signalling pid {args[0]} is not allowed")
        elif event == "os.killpg" and args[0] != getpgid(0):
            raise PermissionError(f"sandbox: signalling process group {args[0]} is not allowed")
        elif event == "resource.prlimit" and args[0] not in (0, getpid()) and args[2] is not None:
            raise PermissionError(f"sandbox: changing the limits of pid {args[0]} is not allowed")
        elif event == "import" and args[0] in _NO_REIMPORT:
            raise PermissionError(f"sandbox: importing a fresh {args[0]} is not allowed")

    _replace_unaudited(ours, inside)
    sys.addaudithook(hook)
