"""The child side of the sandbox: a standalone script, run as

    python -s -B driver.py CONFIG_JSON     (stdin: one line, the verdict nonce)

in a fresh working directory that holds ``program.py``. It imports nothing from this package
(its own directory is kept off ``sys.path``, so the program cannot import our modules).
``sandbox.py`` explains the isolation model; this is how it is carried out.

With ``isolate`` (the host refuses to run without it unless told otherwise), three processes
take part:

- **D** (this process) enters new namespaces: mount, network (no interface up), PID and, when
  not root (``user_ns``), a user namespace that maps only our own uid/gid. In the new mount
  namespace it carries out ``expose`` (an empty tmpfs over a directory the sandbox uid may not
  enter, e.g. ``/root``, with the interpreter bound back into it), replaces /dev by a minimal
  one, makes the working directory its own mount and remounts every *other* mount read-only.
  Then it forks C and, when C ends, ends the way the program did (same exit code or same
  signal), so the host sees the program's fate.
- **C**, pid 1 of the new PID namespace: mounts a ``/proc`` that shows only the namespace's
  processes, lowers its privileges for good (root: the unprivileged ``uid``/``gid``; not root:
  no capability left in the user namespace; both: empty bounding set, ``no_new_privs``), loads
  a seccomp filter (no unix/vsock/... sockets, io_uring or keyrings), forks P and reaps until
  P ends. When C ends, the kernel kills every process left in the namespace: nothing the
  program started outlives the run. C exists because pid 1 ignores signals it has no handler
  for, even its own SIGSEGV or SIGXCPU, so the program must not be pid 1.
- **P**, the program's process (steps below).

Without ``isolate`` (``allow_weak_isolation`` where the kernel cannot isolate) this process is
P itself: as root it only switches to ``uid``; it becomes a child subreaper, so orphaned
grandchildren stay in its tree where they can be found and killed.

When isolation was asked for but a step fails, the program is not run: the verdict is
``unavailable`` with the reason, and the host raises SandboxUnavailable.

In P, in order:
1. Resource limits (CPU seconds, address space, file size, processes, open files, no core).
2. With ``guard``, an audit hook refuses from inside Python: sockets, ctypes, running other
   programs, signalling processes outside this tree, and writing/deleting/renaming/linking
   files outside the working directory. Python code can get around it; the kernel-level
   isolation above is what contains a hostile program, the guard is a second layer.
3. Run the program. The verdict goes to an inherited file descriptor as one JSON line tagged
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

_PR_CAPBSET_DROP = 24
_PR_SET_CHILD_SUBREAPER = 36
_PR_SET_NO_NEW_PRIVS = 38
_PR_CAP_AMBIENT, _PR_CAP_AMBIENT_CLEAR_ALL = 47, 4
_CLONE_NEWNS = 0x00020000
_CLONE_NEWUSER = 0x10000000
_CLONE_NEWPID = 0x20000000
_CLONE_NEWNET = 0x40000000
_MS_RDONLY, _MS_NOSUID, _MS_NODEV, _MS_NOEXEC = 1, 2, 4, 8
_MS_REMOUNT, _MS_BIND, _MS_REC, _MS_PRIVATE = 32, 4096, 16384, 1 << 18
# statvfs flag → mount flag that a read-only remount must keep (nosuid, nodev, noexec, atime);
# in a user namespace the kernel refuses a remount that would drop any of them.
_KEEP_FLAGS = ((2, 2), (4, 4), (8, 8), (1024, 1024), (2048, 2048), (4096, 1 << 21))
_LINUX_CAPABILITY_VERSION_3 = 0x20080522


def _libc():
    import ctypes

    return ctypes, ctypes.CDLL(None, use_errno=True)


def _call(name: str, *args) -> None:
    """``libc.name(*args)``; OSError with errno and ``name`` when it fails."""
    ctypes, libc = _libc()
    if getattr(libc, name)(*args) != 0:
        errno = ctypes.get_errno()
        shown = ", ".join(hex(a) if isinstance(a, int) else repr(a) for a in args)
        raise OSError(errno, f"{name}({shown}): {os.strerror(errno)}")


def _mount(source, target: str, fstype=None, flags: int = 0, data=None) -> None:
    ctypes, _ = _libc()

    def b(s):
        return s.encode() if isinstance(s, str) else s

    _call("mount", b(source), b(target), b(fstype), ctypes.c_ulong(flags), b(data))


def _prctl(option: int, arg: int, arg2: int = 0) -> None:
    _call("prctl", option, arg, arg2, 0, 0)


# ---------------------------------------------------------------- namespaces (D)


def enter_namespaces(user_ns: bool) -> None:
    """New mount, network and PID namespaces (PID: for our children), plus a user namespace
    mapping only our own uid/gid when not root. Mounts become private copies, so nothing done
    here reaches the host."""
    uid, gid = os.getuid(), os.getgid()
    flags = _CLONE_NEWNS | _CLONE_NEWNET | _CLONE_NEWPID | (_CLONE_NEWUSER if user_ns else 0)
    _call("unshare", flags)
    if user_ns:
        # Identity map: we stay uid `uid` (not root) inside, so exec can never grant
        # capabilities back; "deny" is required before an unprivileged gid_map.
        for name, text in (("setgroups", "deny"), ("uid_map", f"{uid} {uid} 1"),
                           ("gid_map", f"{gid} {gid} 1")):
            with open(f"/proc/self/{name}", "w") as f:
                f.write(text)
    _mount(None, "/", flags=_MS_REC | _MS_PRIVATE)


def expose(steps: list) -> None:
    """Carry out ``steps`` (from ``sandbox.exposure_steps``) in order: ``["hide", DIR]`` covers
    DIR with an empty tmpfs, ``["bind", PATH]`` binds the original PATH back at its own place,
    on directories made traversable (0755) in that tmpfs.

    This is how a sandbox uid reaches an interpreter under ``/root`` (mode 0700) without being
    able to read anything else there: the rest of ``/root`` is simply not in its view.
    """
    # Open every bind source before a tmpfs covers it; a bind from /proc/self/fd/N needs no path.
    fds = {path: os.open(path, os.O_PATH) for kind, path in steps if kind == "bind"}
    for kind, path in steps:
        if kind == "hide":
            if os.path.isdir(path):  # otherwise an outer tmpfs has already replaced it
                _mount("tmpfs", path, "tmpfs", _MS_NOSUID | _MS_NODEV, "mode=0755,size=64k")
            continue
        source = f"/proc/self/fd/{fds[path]}"
        is_dir = os.path.isdir(source)
        _make_traversable(path if is_dir else os.path.dirname(path))
        if not is_dir and not os.path.exists(path):
            os.close(os.open(path, os.O_WRONLY | os.O_CREAT, 0o644))  # a mount point for a file
        _mount(source, path, flags=_MS_BIND | _MS_REC)
    for fd in fds.values():
        os.close(fd)


_DEV_NODES = ("null", "zero", "full", "random", "urandom")


def minimal_dev() -> None:
    """Replace /dev by a tmpfs holding only null, zero, full, random and urandom (bound from
    the real ones) and the fd/stdin/stdout/stderr links. A read-only mount does not stop
    writing to a device node, so the host's terminals, cameras, /dev/kvm, ... must not be
    there at all."""
    fds = {name: os.open(f"/dev/{name}", os.O_PATH) for name in _DEV_NODES}
    _mount("tmpfs", "/dev", "tmpfs", _MS_NOSUID | _MS_NOEXEC, "mode=0755,size=64k")
    for name, fd in fds.items():
        os.close(os.open(f"/dev/{name}", os.O_WRONLY | os.O_CREAT, 0o644))  # a mount point
        _mount(f"/proc/self/fd/{fd}", f"/dev/{name}", flags=_MS_BIND)
        os.close(fd)
    for name, target in (("fd", "/proc/self/fd"), ("stdin", "/proc/self/fd/0"),
                         ("stdout", "/proc/self/fd/1"), ("stderr", "/proc/self/fd/2")):
        os.symlink(target, f"/dev/{name}")


def _make_traversable(directory: str) -> None:
    missing = []
    while not os.path.isdir(directory):
        missing.append(directory)
        directory = os.path.dirname(directory)
    for path in reversed(missing):
        os.mkdir(path)
        os.chmod(path, 0o755)  # not subject to our umask


def _unescape_mountinfo(path: str) -> str:
    # mountinfo writes space, tab, newline and backslash as octal escapes
    for code in ("040", "011", "012", "134"):
        path = path.replace("\\" + code, chr(int(code, 8)))
    return path


def read_only_except(workdir: str) -> None:
    """Make ``workdir`` its own mount and remount every other mount read-only.

    World-writable places (/tmp, /var/tmp, /dev/shm, ...) and the user's own files (when not
    root) are where the program could still write; this closes all of them at once instead of
    listing them. A mount the program cannot even reach (statvfs refused) is left alone;
    any other that stays writable is an error: the run must not go on half-isolated.
    """
    workdir = os.path.realpath(workdir)
    _mount(workdir, workdir, flags=_MS_BIND)  # its own mount, which stays writable
    with open("/proc/self/mountinfo") as f:
        points = [_unescape_mountinfo(line.split()[4]) for line in f]
    for point in points:
        if point == workdir:
            continue
        try:
            keep = os.statvfs(point).f_flag
        except (PermissionError, FileNotFoundError):
            continue  # not reachable by us (by path), hence not by the program either
        flags = _MS_BIND | _MS_REMOUNT | _MS_RDONLY
        for st_flag, ms_flag in _KEEP_FLAGS:
            if keep & st_flag:
                flags |= ms_flag
        _mount(None, point, flags=flags)
    os.chdir(workdir)  # the old cwd is the directory under the bind mount, now read-only


def mount_proc() -> None:
    """A /proc of the new PID namespace (read-only): host processes are neither listed nor
    reachable through it. Must run in the namespace's first process."""
    _mount("proc", "/proc", "proc", _MS_NOSUID | _MS_NODEV | _MS_NOEXEC | _MS_RDONLY)


# ---------------------------------------------------------------- privileges (C, or P when weak)


def _drop_bounding_set() -> None:
    with open("/proc/sys/kernel/cap_last_cap") as f:
        last_cap = int(f.read())
    for cap in range(last_cap + 1):
        _prctl(_PR_CAPBSET_DROP, cap)
    _prctl(_PR_SET_NO_NEW_PRIVS, 1)


def drop_privileges(uid: int, gid: int) -> None:
    """Root → ``uid``/``gid`` irrevocably, no supplementary groups, no capabilities."""
    _drop_bounding_set()
    os.setgroups([])
    os.setresgid(gid, gid, gid)
    os.setresuid(uid, uid, uid)  # from root to non-root: permitted/effective/ambient cleared
    if os.getresuid() != (uid, uid, uid) or os.getresgid() != (gid, gid, gid) or os.getgroups():
        raise RuntimeError("sandbox: privileges were not dropped")
    _check_no_capabilities()


def drop_capabilities() -> None:
    """In our user namespace: give up every capability (mount, remount, ...) for good."""
    ctypes, _ = _libc()

    class Header(ctypes.Structure):
        _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]

    class Data(ctypes.Structure):
        _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32),
                    ("inheritable", ctypes.c_uint32)]

    _drop_bounding_set()
    _prctl(_PR_CAP_AMBIENT, _PR_CAP_AMBIENT_CLEAR_ALL)
    _call("capset", ctypes.byref(Header(_LINUX_CAPABILITY_VERSION_3, 0)), ctypes.byref((Data * 2)()))
    _check_no_capabilities()


def _check_no_capabilities() -> None:
    with open("/proc/self/status") as f:
        caps = {k: v.strip() for k, v in (line.split(":", 1) for line in f if line.startswith("Cap"))}
    if any(int(v, 16) for v in caps.values()):
        raise RuntimeError(f"sandbox: capabilities left after dropping them: {caps}")


# seccomp: audit arch → syscall numbers (x32 flag: x86_64 must also refuse the x32 ABI's aliases)
_SECCOMP_ARCHES = {
    "x86_64": (0xC000003E, True, {"socket": 41, "socketpair": 53, "io_uring_setup": 425,
                                  "add_key": 248, "request_key": 249, "keyctl": 250}),
    "aarch64": (0xC00000B7, False, {"socket": 198, "socketpair": 199, "io_uring_setup": 425,
                                    "add_key": 217, "request_key": 218, "keyctl": 219}),
}
_AF_UNIX, _AF_INET, _AF_INET6 = 1, 2, 10
_SOCK_STREAM, _SOCK_SEQPACKET = 1, 5
_RET_ALLOW, _RET_EACCES = 0x7FFF0000, 0x00050000 | 13
_LD_ABS, _JEQ, _JGE, _AND, _RET = 0x20, 0x15, 0x35, 0x54, 0x06


def _assemble(program: list) -> list:
    """Classic BPF with labels: ``("label", name)`` entries, and jump targets given by name."""
    where, pos = {}, 0
    for ins in program:
        if ins[0] == "label":
            where[ins[1]] = pos
        else:
            pos += 1
    out = []
    for ins in program:
        if ins[0] == "label":
            continue
        code, jt, jf, k = ins
        here = len(out)
        jt = where[jt] - here - 1 if isinstance(jt, str) else jt
        jf = where[jf] - here - 1 if isinstance(jf, str) else jf
        out.append((code, jt, jf, k))
    return out


def seccomp_program(machine: str) -> list:
    """The filter: sockets only of the families the empty network namespace already confines
    (INET, INET6); socketpairs only connected (stream, seqpacket: a datagram one could send to
    any path); no io_uring (it makes sockets too) and no keyrings (the session keyring is the
    host's). A read-only mount does not stop connect() to a unix socket file, and AF_VSOCK is
    not network-namespaced: without this a program could talk to host services."""
    arch, x32, nr = _SECCOMP_ARCHES[machine]
    arg = [16 + 8 * i for i in range(6)]  # low 32 bits of args[i] (little-endian)
    program = [(_LD_ABS, 0, 0, 4), (_JEQ, 0, "deny", arch), (_LD_ABS, 0, 0, 0)]
    if x32:
        program.append((_JGE, "deny", 0, 0x40000000))
    program += [(_JEQ, "socket", 0, nr["socket"]), (_JEQ, "socketpair", 0, nr["socketpair"])]
    program += [(_JEQ, "deny", 0, nr[name]) for name in ("io_uring_setup", "add_key", "request_key", "keyctl")]
    program += [
        (_RET, 0, 0, _RET_ALLOW),
        ("label", "socket"), (_LD_ABS, 0, 0, arg[0]),
        (_JEQ, "allow", 0, _AF_INET), (_JEQ, "allow", "deny", _AF_INET6),
        ("label", "socketpair"), (_LD_ABS, 0, 0, arg[0]), (_JEQ, 0, "deny", _AF_UNIX),
        (_LD_ABS, 0, 0, arg[1]), (_AND, 0, 0, 0xF),
        (_JEQ, "allow", 0, _SOCK_STREAM), (_JEQ, "allow", "deny", _SOCK_SEQPACKET),
        ("label", "allow"), (_RET, 0, 0, _RET_ALLOW),
        ("label", "deny"), (_RET, 0, 0, _RET_EACCES),
    ]
    return _assemble(program)


def install_seccomp() -> None:
    """Load :func:`seccomp_program` for this process and its descendants (needs no_new_privs)."""
    ctypes, _ = _libc()
    machine = os.uname().machine
    if machine not in _SECCOMP_ARCHES:
        raise OSError(0, f"no seccomp filter for the {machine} architecture")

    class Filter(ctypes.Structure):
        _fields_ = [("code", ctypes.c_uint16), ("jt", ctypes.c_uint8), ("jf", ctypes.c_uint8),
                    ("k", ctypes.c_uint32)]

    class Program(ctypes.Structure):
        _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.POINTER(Filter))]

    program = seccomp_program(machine)
    filters = (Filter * len(program))(*[Filter(*ins) for ins in program])
    _PR_SET_SECCOMP, _SECCOMP_MODE_FILTER = 22, 2
    _call("prctl", _PR_SET_SECCOMP, _SECCOMP_MODE_FILTER,
          ctypes.byref(Program(len(program), filters)), 0, 0)


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


# ---------------------------------------------------------------- process trees


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


def _exit_like(status: int) -> None:
    """End this process the way a child with wait status ``status`` ended."""
    if os.WIFSIGNALED(status):
        sig = os.WTERMSIG(status)
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
        try:
            signal.signal(sig, signal.SIG_DFL)
        except (OSError, ValueError):
            pass  # SIGKILL/SIGSTOP: default already
        os.kill(os.getpid(), sig)
        os._exit(128 + sig)  # a signal whose default is to be ignored
    os._exit(os.WEXITSTATUS(status) if os.WIFEXITED(status) else 1)


# ---------------------------------------------------------------- the guard (P)

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


# ---------------------------------------------------------------- the program (P)


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


def _write_verdict(config: dict, nonce: str, status: str, message: str) -> None:
    line = json.dumps({"nonce": nonce, "status": status, "message": message}) + "\n"
    os.write(config["verdict_fd"], line.encode("utf-8"))


def run_program(config: dict, nonce: str, helpers: int) -> None:
    """P: limits, guard, the program, the verdict; never returns. ``helpers``: processes of
    the sandbox itself (D, C) that RLIMIT_NPROC counts besides the program's own."""
    limits = dict(config["limits"])
    limits["RLIMIT_NPROC"] += helpers
    set_limits(limits)
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


# ---------------------------------------------------------------- the three processes


def _as_child(function, *args) -> None:
    """Run ``function`` in a just-forked child; whatever happens, the child never returns into
    its parent's code."""
    try:
        function(*args)
    except BaseException:  # noqa: BLE001 - shown, then the child ends below
        import traceback

        traceback.print_exc()
    finally:
        os._exit(1)


def refuse(config: dict, nonce: str, step: str, exc: BaseException) -> None:
    """Isolation failed: say why on the verdict channel and end without running the program."""
    _write_verdict(config, nonce, "unavailable", f"{step}: {describe(exc)}")
    os._exit(0)


def init_process(config: dict, nonce: str, report_fd: int) -> None:
    """C, pid 1 of the namespace: /proc, privileges, fork P, reap; report P's wait status."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    try:
        mount_proc()
        if config["user_ns"]:
            drop_capabilities()
        else:
            drop_privileges(config["uid"], config["gid"])
        install_seccomp()
    except (OSError, RuntimeError) as e:
        refuse(config, nonce, "lowering privileges", e)
    program = os.fork()
    if program == 0:
        os.close(report_fd)
        _as_child(run_program, config, nonce, 2 if config["user_ns"] else 1)
    while True:  # as pid 1 we also reap whatever the program orphaned
        pid, status = os.waitpid(-1, 0)
        if pid == program:
            break
    os.write(report_fd, str(status).encode())
    os._exit(0)  # the kernel now kills everything left in the namespace


def isolated(config: dict, nonce: str) -> None:
    """D: namespaces and mounts, then C; end like the program did. Never returns."""
    try:
        enter_namespaces(config["user_ns"])
        expose(config["expose"])
        minimal_dev()
        read_only_except(os.getcwd())
    except (OSError, RuntimeError) as e:
        refuse(config, nonce, "isolating", e)
    read_end, write_end = os.pipe()
    init = os.fork()
    if init == 0:
        os.close(read_end)
        _as_child(init_process, config, nonce, write_end)
    os.close(write_end)
    _, status = os.waitpid(init, 0)
    report = os.read(read_end, 64)
    _exit_like(int(report) if report else status)


def weak(config: dict, nonce: str) -> None:
    """No namespaces (``allow_weak_isolation``): root switches uid; rlimits and the guard."""
    if config["uid"] is not None:
        drop_privileges(config["uid"], config["gid"])
    become_subreaper()
    run_program(config, nonce, helpers=0)


def probe(user_ns: bool) -> None:
    """Can this kernel give us the namespaces, a /proc of our own and the seccomp filter? Exit
    0 if so, else 1 with the reason on stderr. Nothing outside this short-lived tree changes."""
    kind = "user, mount, network and PID" if user_ns else "mount, network and PID"
    try:
        enter_namespaces(user_ns)
    except OSError as e:
        sys.stderr.write(f"no {kind} namespaces ({describe(e)})\n")
        os._exit(1)
    pid = os.fork()
    if pid == 0:
        step = "no /proc of a new PID namespace"
        try:
            mount_proc()
            step = "no seccomp filter"
            _prctl(_PR_SET_NO_NEW_PRIVS, 1)
            install_seccomp()
        except OSError as e:
            sys.stderr.write(f"{step} ({describe(e)})\n")
            os._exit(1)
        os._exit(0)
    _, status = os.waitpid(pid, 0)
    os._exit(0 if status == 0 else 1)


def main() -> None:
    here = os.path.dirname(os.path.abspath(__file__))
    if sys.path and sys.path[0] in ("", here):
        del sys.path[0]  # Python < 3.11 ignores PYTHONSAFEPATH: the program must not import us
    config = json.loads(sys.argv[1])
    if config.get("probe"):
        probe(config["user_ns"])
    nonce = sys.stdin.readline().strip()
    devnull = os.open("/dev/null", os.O_RDONLY)
    os.dup2(devnull, 0)
    os.close(devnull)
    if config["isolate"]:
        isolated(config, nonce)
    weak(config, nonce)


if __name__ == "__main__":
    main()
