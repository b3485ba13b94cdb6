"""The child side of the sandbox: a standalone script, run as

    python -s -B sandbox_driver.py CONFIG_JSON     (stdin: one line, the verdict nonce)

in a fresh working directory that holds ``program.py``. It imports nothing from this package
(its own directory is kept off ``sys.path``, so the program cannot import our modules).

Steps, in order:
1. When started as root (``uid`` in the config): enter a new network namespace (no interfaces
   up, best effort) and a new mount namespace where every mount but the working directory is
   read-only (so /tmp, /dev/shm and other world-writable places are closed too), then drop to
   the unprivileged ``uid``/``gid`` for good: no supplementary groups, ``no_new_privs``, an
   empty capability bounding set. If the interpreter's own files are not readable by others
   (e.g. a Python under ``/root``), ``CAP_DAC_READ_SEARCH`` is the one capability kept, so
   imports still work; it grants reading, never writing, killing or raising limits. In both
   cases become a child subreaper, so orphaned grandchildren stay in this process's tree where
   they can be found, killed and reaped.
2. Resource limits (CPU seconds, address space, file size, processes, open files, no core).
3. With ``guard``, an audit hook refuses from inside Python: sockets, ctypes, running other
   programs, signalling processes outside this tree, and writing/deleting/renaming/linking
   (either end) files outside the working directory; it also replaces the few functions that
   do this without an audit event (``_posixsubprocess.fork_exec``, pidfds, ``os.open`` with
   ``dir_fd``). This is defence in depth (Python code can get around it); the OS-level limits
   above are what contain a hostile program.
4. Run the program. The verdict goes to an inherited file descriptor as one JSON line tagged
   with the nonce; forked children never write one. Then kill any remaining descendants and
   ``_exit`` (no atexit handlers or threads of the program run after the verdict).

Verdicts: ``passed`` (the program ran to the end) or ``failed`` (it raised, including
``SystemExit`` and ``SyntaxError``). Anything else is decided by the host (timeout, signal,
no verdict).
"""

import json
import os
import resource
import signal
import sys

_PR_SET_KEEPCAPS = 8
_PR_CAPBSET_DROP = 24
_PR_SET_CHILD_SUBREAPER = 36
_PR_SET_NO_NEW_PRIVS = 38
_CLONE_NEWNET = 0x40000000
_CLONE_NEWNS = 0x00020000
_MS_RDONLY, _MS_REMOUNT, _MS_BIND, _MS_REC, _MS_PRIVATE = 1, 32, 4096, 16384, 1 << 18
# statvfs flag → mount flag that a read-only remount must keep (nosuid, nodev, noexec, atime)
_KEEP_FLAGS = ((2, 2), (4, 4), (8, 8), (1024, 1024), (2048, 2048), (4096, 1 << 21))
_CAP_DAC_READ_SEARCH = 2
_LINUX_CAPABILITY_VERSION_3 = 0x20080522


def _libc():
    import ctypes

    return ctypes, ctypes.CDLL(None, use_errno=True)


def isolate_network() -> bool:
    """A fresh, empty network namespace (root only); False when the kernel refuses."""
    _, libc = _libc()
    return libc.unshare(_CLONE_NEWNET) == 0


def _unescape_mountinfo(path: str) -> str:
    # mountinfo writes space, tab, newline and backslash as octal escapes
    for code in ("040", "011", "012", "134"):
        path = path.replace("\\" + code, chr(int(code, 8)))
    return path


def read_only_filesystem(workdir: str) -> list:
    """In a new mount namespace, remount every mount read-only except ``workdir`` (root only).

    World-writable places (/tmp, /var/tmp, /dev/shm, ...) are where an unprivileged uid could
    still write; this closes all of them at once instead of listing them. The host's mounts are
    untouched (the namespace's mounts are private copies). Returns what could not be done
    ([] when everything was): a refused namespace (a container without CAP_SYS_ADMIN) leaves
    file permissions and the guard as the only protection, which the caller reports.
    """
    ctypes, libc = _libc()
    if libc.unshare(_CLONE_NEWNS) != 0:
        return [f"no mount namespace ({os.strerror(ctypes.get_errno())})"]

    def mount(source, target, flags):
        if libc.mount(source, target.encode(), None, ctypes.c_ulong(flags), None) != 0:
            raise OSError(ctypes.get_errno(), f"mount {target}")

    mount(None, "/", _MS_REC | _MS_PRIVATE)
    workdir = os.path.realpath(workdir)
    mount(workdir.encode(), workdir, _MS_BIND)  # its own mount, which stays writable
    with open("/proc/self/mountinfo") as f:
        points = [_unescape_mountinfo(line.split()[4]) for line in f]
    failed = []
    for point in points:
        if point == workdir:
            continue
        try:
            keep = os.statvfs(point).f_flag
            flags = _MS_BIND | _MS_REMOUNT | _MS_RDONLY
            for st_flag, ms_flag in _KEEP_FLAGS:
                if keep & st_flag:
                    flags |= ms_flag
            mount(None, point, flags)
        except OSError:
            failed.append(f"not read-only: {point}")
    os.chdir(workdir)  # the old cwd is the directory under the bind mount, now read-only
    return failed


def drop_privileges(uid: int, gid: int, keep_read: bool) -> None:
    """Become ``uid``/``gid`` irrevocably; keep only CAP_DAC_READ_SEARCH when ``keep_read``."""
    ctypes, libc = _libc()

    def prctl(option, arg):
        if libc.prctl(option, arg, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), f"prctl({option}, {arg}) failed")

    last_cap = int(open("/proc/sys/kernel/cap_last_cap").read())
    for cap in range(last_cap + 1):
        if not (keep_read and cap == _CAP_DAC_READ_SEARCH):
            prctl(_PR_CAPBSET_DROP, cap)
    prctl(_PR_SET_NO_NEW_PRIVS, 1)
    prctl(_PR_SET_KEEPCAPS, 1 if keep_read else 0)
    os.setgroups([])
    os.setresgid(gid, gid, gid)
    os.setresuid(uid, uid, uid)
    if keep_read:

        class Header(ctypes.Structure):
            _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]

        class Data(ctypes.Structure):
            _fields_ = [
                ("effective", ctypes.c_uint32),
                ("permitted", ctypes.c_uint32),
                ("inheritable", ctypes.c_uint32),
            ]

        data = (Data * 2)()
        data[0].effective = data[0].permitted = 1 << _CAP_DAC_READ_SEARCH
        if libc.capset(ctypes.byref(Header(_LINUX_CAPABILITY_VERSION_3, 0)), data) != 0:
            raise OSError(ctypes.get_errno(), "capset failed")
        prctl(_PR_SET_KEEPCAPS, 0)
    if os.getresuid() != (uid, uid, uid) or os.getresgid() != (gid, gid, gid) or os.getgroups():
        raise RuntimeError("sandbox: privileges were not dropped")


def become_subreaper() -> None:
    _, libc = _libc()
    libc.prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)


def set_limits(limits: dict) -> None:
    """Soft and hard limits (hard = soft, except CPU where hard = soft + 1 so SIGXCPU comes first)."""
    for name, value in limits.items():
        which = getattr(resource, name)
        _, hard = resource.getrlimit(which)
        soft = value if hard == resource.RLIM_INFINITY else min(value, hard)
        new_hard = soft + 1 if name == "RLIMIT_CPU" else soft
        if hard != resource.RLIM_INFINITY:
            new_hard = min(new_hard, hard)
        resource.setrlimit(which, (soft, new_hard))


def proc_table() -> dict:
    """``{pid: (ppid, state)}`` of every process visible in /proc."""
    table = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat", "rb") as f:
                stat = f.read()
        except OSError:
            continue
        fields = stat[stat.rfind(b")") + 2:].split()
        table[int(name)] = (int(fields[1]), fields[0].decode())
    return table


def descendants(root: int, table: dict) -> list:
    children: dict = {}
    for pid, (ppid, _) in table.items():
        children.setdefault(ppid, []).append(pid)
    out, stack = [], [root]
    while stack:
        for child in children.get(stack.pop(), []):
            out.append(child)
            stack.append(child)
    return out


def kill_descendants(root: int, reap_children: bool = True) -> None:
    """SIGKILL every live descendant of ``root`` until none is left. ``reap_children``: also
    reap our own exited children (the driver, a subreaper, must; the host must not, as
    ``waitpid(-1)`` would steal the exit statuses of its other children)."""
    for _ in range(100):
        table = proc_table()
        live = [p for p in descendants(root, table) if table[p][1] != "Z"]
        for pid in live:
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
        if reap_children:
            try:
                while os.waitpid(-1, os.WNOHANG)[0] > 0:
                    pass
            except ChildProcessError:
                pass
        if not live:
            return


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
    if hasattr(signal, "pidfd_send_signal"):
        real_send = signal.pidfd_send_signal

        def pidfd_send_signal(pidfd, sig, siginfo=None, flags=0, /):
            pid = _pidfd_target(pidfd)
            if pid is None or pid <= 0 or not ours(pid):
                raise PermissionError(f"sandbox: signalling pid {pid} is not allowed (pidfd)")
            return real_send(pidfd, sig, siginfo, flags)

        signal.pidfd_send_signal = pidfd_send_signal
        sys.modules["_signal"].pidfd_send_signal = pidfd_send_signal


def install_guard(workdir: str, main_pid: int) -> None:
    """The audit hook of step 3 (cannot be removed once added)."""
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


def describe(exc: BaseException) -> str:
    text = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
    return text if len(text) <= 1000 else text[:997] + "..."


def run(source: str) -> tuple:
    namespace = {"__name__": "__main__", "__builtins__": __builtins__}
    try:
        exec(compile(source, "program.py", "exec"), namespace)
    except BaseException as e:  # SystemExit too: a program that exits early did not pass
        return "failed", describe(e)
    return "passed", ""


def main() -> None:
    here = os.path.dirname(os.path.abspath(__file__))
    if sys.path and sys.path[0] in ("", here):
        del sys.path[0]  # Python < 3.11 ignores PYTHONSAFEPATH: the program must not import us
    config = json.loads(sys.argv[1])
    nonce = sys.stdin.readline().strip()
    devnull = os.open("/dev/null", os.O_RDONLY)
    os.dup2(devnull, 0)
    os.close(devnull)
    if config["uid"] is not None:
        problems = [] if isolate_network() else ["no network namespace"]
        problems += read_only_filesystem(os.getcwd())
        if problems:  # weaker isolation is said, not hidden: it shows in the result's stderr
            sys.stderr.write(f"sandbox: isolation incomplete: {problems}\n")
        drop_privileges(config["uid"], config["gid"], config["keep_read"])
    become_subreaper()
    set_limits(config["limits"])
    # Past the file-size limit a write should raise OSError (a failure), not kill the process.
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    with open("program.py", encoding="utf-8") as f:
        source = f.read()
    main_pid = os.getpid()
    # The program shares these modules; keep our own references in case it rebinds them.
    getpid, write, exit_, dumps = os.getpid, os.write, os._exit, json.dumps
    stdout, stderr, verdict_fd = sys.stdout, sys.stderr, config["verdict_fd"]
    if config["guard"]:
        install_guard(os.getcwd(), main_pid)
    status, message = run(source)
    if getpid() != main_pid:
        exit_(0)  # a forked child of the program: only the main process gives the verdict
    for stream in (stdout, stderr):
        try:
            stream.flush()
        except BaseException:
            pass
    line = dumps({"nonce": nonce, "status": status, "message": message}) + "\n"
    write(verdict_fd, line.encode("utf-8"))
    kill_descendants(main_pid)
    exit_(0)


if __name__ == "__main__":
    main()
