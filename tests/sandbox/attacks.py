"""Hostile programs for test_sandbox.py, and the checks that they were contained.

Used two ways:

- imported (by path) by test_sandbox.py, whose pytest process is then the host;
- run as a script, ``python attacks.py``, to attack from an *unprivileged* host. Started
  as root (how the suite runs here and in CI), it first sets up a private mount namespace in
  which user ``nobody`` can run our interpreter (which lives under /root, mode 0700) the way a
  user's own Python installation would be readable by that user, then becomes ``nobody`` with
  no capabilities at all and re-executes itself. It prints one JSON object.

Every attack targets the host: a file it owns outside the working directory (``victim``), a
file to be created next to it (``marker``), its pid (signals, limits, /proc), its environment
(``SECRET``), a TCP socket and unix sockets anyone may use (like a session bus). After each run
``Host.breaches`` says what, if anything, got through (a program that gained something the
host cannot observe, such as a vsock socket, says so with a ``BREACH`` line).
"""

import json
import os
import resource
import signal
import socket
import sys
import tempfile
import textwrap
import types

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
SECRET = "wmtp-sandbox-test-secret-6f1d"
SHM_KEY = 0x57AD0000 + os.getpid() % 65536  # the host's private SysV segment
NOBODY = 65534

# {victim}, {victim_dir}, {marker}, {host}, {port} are filled in by attacks().
_ATTACKS = {
    # The reviewer's reproductions: a shell through the unaudited _posixsubprocess (3.11's
    # fork_exec signature), a hard link to an outside file, a pidfd to the parent.
    "fork_exec_shell": """
        import _posixsubprocess, os
        r, w = os.pipe()
        cmd = b'id; echo OWNED > {victim}; touch {marker}; kill -TERM {host}'
        pid = _posixsubprocess.fork_exec(
            [b'/bin/sh', b'-c', cmd], [b'/bin/sh'], True, (), None, None, -1, -1, -1, -1, -1, -1,
            r, w, True, False, 0, None, None, None, -1, None, False)
        print(os.waitpid(pid, 0), flush=True)
    """,
    "hardlink_write": """
        import os
        os.link({victim!r}, 'h')
        open('h', 'w').write('OVERWRITTEN BY SANDBOX')
    """,
    "pidfd_kill_parent": """
        import os, signal
        signal.pidfd_send_signal(os.pidfd_open(os.getppid()), signal.SIGTERM)
    """,
    # Variations on them.
    "pidfd_kill_host": """
        import os, signal
        signal.pidfd_send_signal(os.pidfd_open({host}), signal.SIGTERM)
    """,
    "proc_dir_kill_host": """
        import os, signal
        signal.pidfd_send_signal(os.open('/proc/{host}', os.O_RDONLY | os.O_DIRECTORY), signal.SIGTERM)
    """,
    "kill_host": """
        import os, signal
        os.kill({host}, signal.SIGTERM)
    """,
    "prlimit_host": """
        import resource
        resource.prlimit({host}, resource.RLIMIT_NOFILE, (3, 3))
    """,
    "symlink_write": """
        import os
        os.symlink({victim!r}, 's')
        open('s', 'w').write('OVERWRITTEN BY SANDBOX')
    """,
    "rename_into_workdir": """
        import os
        os.rename({victim!r}, 'stolen')
    """,
    "dir_fd_write": """
        import os
        d = os.open({victim_dir!r}, os.O_RDONLY | os.O_DIRECTORY)
        os.write(os.open('victim.txt', os.O_WRONLY | os.O_TRUNC, dir_fd=d), b'OVERWRITTEN')
    """,
    "write_direct": """
        open({victim!r}, 'w').write('OVERWRITTEN BY SANDBOX')
    """,
    "create_marker": """
        open({marker!r}, 'w').write('x')
    """,
    "read_host_environ": """
        print(open('/proc/{host}/environ').read())
    """,
    "network": """
        import socket
        socket.create_connection(('127.0.0.1', {port}), timeout=2).sendall(b'exfiltrate')
    """,
    "kill_all": """
        import os, signal
        os.kill(-1, signal.SIGKILL)
    """,
    # A read-only mount does not stop connect() to a socket file, nor writing to a device node;
    # AF_VSOCK (to the hypervisor) ignores network namespaces.
    "unix_socket_host": """
        import socket
        s = socket.socket(socket.AF_UNIX)
        s.connect({unix_stream!r})
        s.sendall(b'hello host service')
    """,
    "unix_dgram_host": """
        import socket
        a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
        a.sendto(b'hello host service', {unix_dgram!r})
    """,
    "vsock": """
        import socket
        socket.socket(40, socket.SOCK_STREAM)  # AF_VSOCK
        print('BREACH: made an AF_VSOCK socket')
    """,
    # SysV IPC is not a file: without an IPC namespace of its own a run reaches the host
    # user's segments (and leaves its own behind).
    "sysv_host_segment": """
        import ctypes
        libc = ctypes.CDLL(None, use_errno=True)
        libc.shmat.restype = ctypes.c_void_p
        shm = libc.shmget({shm_key}, 0, 0)
        if shm >= 0:
            print('BREACH: reached the host segment:', ctypes.string_at(libc.shmat(shm, None, 0), 16))
    """,
    "host_devices": """
        import os
        extra = set(os.listdir('/dev')) - {{'null', 'zero', 'full', 'random', 'urandom', 'fd',
                                            'stdin', 'stdout', 'stderr', 'shm'}}
        print('BREACH: host devices visible:', sorted(extra)) if extra else None
    """,
}

# Attacks that only the kernel layer stops: with weak isolation (guard alone) they are the
# documented gaps, or (kill_all without the guard) would kill the test run itself.
KERNEL_ONLY = {"read_host_environ", "host_devices"}


def attacks(victim_dir: str, host: int, port: int, socket_dir: str = "/nonexistent") -> dict:
    """The attack programs, aimed at ``victim_dir`` (holding victim.txt), ``host``, ``port`` and
    the unix sockets in ``socket_dir``."""
    values = {
        "victim": os.path.join(victim_dir, "victim.txt"),
        "victim_dir": victim_dir,
        "marker": os.path.join(victim_dir, "marker"),
        "host": host,
        "port": port,
        "unix_stream": os.path.join(socket_dir, "stream.sock"),
        "shm_key": SHM_KEY,
        "unix_dgram": os.path.join(socket_dir, "dgram.sock"),
    }
    return {name: textwrap.dedent(src).format(**values) for name, src in _ATTACKS.items()}


class Host:
    """The host-side state attacks aim at, and what became of it."""

    def __init__(self, victim_dir: str, socket_dir: str):
        self.victim_dir = victim_dir
        self.victim = os.path.join(victim_dir, "victim.txt")
        self.reset()
        self.listener = socket.socket()
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(1)
        self.port = self.listener.getsockname()[1]
        # host services on unix sockets anyone may connect to (like a session bus)
        self.unix_stream = socket.socket(socket.AF_UNIX)
        self.unix_stream.bind(os.path.join(socket_dir, "stream.sock"))
        self.unix_stream.listen(1)
        self.unix_dgram = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.unix_dgram.bind(os.path.join(socket_dir, "dgram.sock"))
        for sock in (self.listener, self.unix_stream, self.unix_dgram):
            sock.setblocking(False)
        for name in ("stream.sock", "dgram.sock"):
            os.chmod(os.path.join(socket_dir, name), 0o777)
        self.nofile = resource.getrlimit(resource.RLIMIT_NOFILE)
        self.shm = _host_segment(SHM_KEY, SECRET.encode())
        self._old_handler = signal.signal(signal.SIGTERM, lambda sig, frame: self.signals.append(sig))

    def reset(self):
        """A fresh victim (world-writable: as root, only the mounts keep it safe), no signals:
        each attack is judged on its own."""
        for entry in os.listdir(self.victim_dir):
            os.unlink(os.path.join(self.victim_dir, entry))
        with open(self.victim, "w") as f:
            f.write("original")
        os.chmod(self.victim, 0o666)
        self.victim_stat = self._stat()
        self.signals = []

    def _stat(self):
        st = os.stat(self.victim)
        return (st.st_mode, st.st_uid, st.st_mtime_ns, st.st_size, st.st_nlink)

    def close(self):
        import ctypes

        ctypes.CDLL(None).shmctl(self.shm, 0, None)  # IPC_RMID
        signal.signal(signal.SIGTERM, self._old_handler)
        for sock in (self.listener, self.unix_stream, self.unix_dgram):
            sock.close()

    def breaches(self, result) -> list[str]:
        """What got through, judged from the host's side after a run."""
        out = []
        with open(self.victim) as f:
            if f.read() != "original":
                out.append("victim overwritten")
        if self._stat() != self.victim_stat:
            out.append("victim changed (mode, owner, mtime, size or links)")
        if set(os.listdir(self.victim_dir)) != {"victim.txt"}:
            out.append(f"files created next to the victim: {os.listdir(self.victim_dir)}")
        if self.signals:
            out.append(f"host signalled: {self.signals}")
        if resource.getrlimit(resource.RLIMIT_NOFILE) != self.nofile:
            out.append("host limits changed")
        for name, receive in (("TCP", self.listener.accept), ("unix stream", self.unix_stream.accept),
                              ("unix datagram", lambda: self.unix_dgram.recv(100))):
            try:
                receive()
                out.append(f"host's {name} socket was reached")
            except BlockingIOError:
                pass
        out += [line for line in result.stdout.splitlines() if line.startswith("BREACH")]
        if SECRET in result.stdout or SECRET in result.stderr:
            out.append("host environment leaked")
        left = sandbox_processes()
        if left:
            out.append(f"sandbox processes left: {left}")
        return out


def _host_segment(key: int, data: bytes) -> int:
    """A private (0600) SysV shared-memory segment of this process's user, holding ``data``."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    libc.shmat.restype = ctypes.c_void_p
    shm = libc.shmget(key, 4096, 0o1000 | 0o600)
    if shm < 0:
        raise OSError(ctypes.get_errno(), "shmget")
    address = libc.shmat(shm, None, 0)
    ctypes.memmove(address, data, len(data))
    libc.shmdt(ctypes.c_void_p(address))
    return shm


def sandbox_processes() -> list[int]:
    """Live processes of this process's sandbox runs: the driver and its forks, whose command
    line names the host's pid (other programs' sandboxes on the machine do not count). A
    process the program exec'd (a shell) has another command line, but it cannot outlive the
    run's PID namespace, which lives only as long as its init, one of the driver's forks."""
    marker = b"\0host=%d\0" % os.getpid()
    out = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/cmdline", "rb") as f:
                cmd = f.read()
            with open(f"/proc/{name}/stat", "rb") as f:
                state = f.read().rpartition(b")")[2].split()[0]
        except (OSError, IndexError):
            continue
        if b"wmtp_fn.sandbox.driver" in cmd and marker in cmd and state != b"Z":
            out.append(int(name))
    return out


def run_attacks(run_program, limits, guards, names=None, **kwargs) -> dict:
    """Run each attack (or ``names``) once per guard setting against a fresh victim; returns
    ``{"name/guard": {"status", "message", "stdout", "breaches"}}``."""
    results = {}
    victim_dir = tempfile.mkdtemp(prefix="wmtp_sandbox_victim_")
    socket_dir = tempfile.mkdtemp(prefix="wmtp_sandbox_sockets_")
    for directory in (victim_dir, socket_dir):
        os.chmod(directory, 0o777)  # as root: only the mounts, not file permissions, keep it safe
    try:
        host = Host(victim_dir, socket_dir)
        try:
            programs = attacks(victim_dir, os.getpid(), host.port, socket_dir)
            for name in names or programs:
                for guard in guards:
                    r = run_program(programs[name], limits=limits, guard=guard, **kwargs)
                    results[f"{name}/{guard}"] = {
                        "status": r.status, "message": r.message, "stdout": r.stdout,
                        "breaches": host.breaches(r),
                    }
                    host.reset()
        finally:
            host.close()
    finally:
        for directory in (victim_dir, socket_dir):
            for entry in os.listdir(directory):
                os.unlink(os.path.join(directory, entry))
            os.rmdir(directory)
    return results


def concurrent_runs(run_program, limits) -> dict:
    """Run A writes a secret into every place it may write and waits; run B, meanwhile, looks
    for it everywhere it can read. ``{"a": A's stdout, "b": B's (the paths found)}``."""
    import threading

    secret = f"run-a-secret-{os.getpid()}-{os.urandom(4).hex()}"
    writer = textwrap.dedent(f"""
        import time
        for path in ("secret.txt", "/tmp/secret.txt", "/var/tmp/secret.txt", "/dev/shm/secret.txt"):
            open(path, "w").write({secret!r})
        print("written", flush=True)
        time.sleep(5)  # (long enough for the other run to start and look, even on a busy machine)
    """)
    seeker = textwrap.dedent(f"""
        import os, time
        time.sleep(0.7)
        needle, found = {secret[::-1]!r}[::-1], []
        for top in ("/tmp", "/var/tmp", "/dev/shm", {tempfile.gettempdir()!r}, {REPO!r}, "/root", "/home"):
            for root, dirs, files in os.walk(top):
                for name in files:
                    try:
                        if needle in open(os.path.join(root, name), errors="ignore").read(1 << 16):
                            found.append(os.path.join(root, name))
                    except OSError:
                        pass
        print(found)
    """)
    out: dict = {}
    thread = threading.Thread(target=lambda: out.setdefault("a", run_program(writer, limits=limits, guard=False).stdout))
    thread.start()
    b = run_program(seeker, limits=limits, guard=False)
    out["b"] = b.stdout or f"{b.status}: {b.message}"
    thread.join()
    return out


# ---------------------------------------------------------------- the unprivileged host


def import_sandbox():
    """wmtp_fn.sandbox's host and kernel without running wmtp_fn's __init__ (which imports torch)."""
    for name, path in (("wmtp_fn", "wmtp_fn"), ("wmtp_fn.sandbox", "wmtp_fn/sandbox")):
        if name not in sys.modules:
            module = types.ModuleType(name)
            module.__path__ = [os.path.join(REPO, path)]
            sys.modules[name] = module
    from wmtp_fn.sandbox import host, kernel

    return host, kernel


def _closed_ancestors(path: str) -> list[str]:
    parts = path.split(os.sep)
    ancestors = [os.sep.join(parts[:i]) or os.sep for i in range(1, len(parts))]
    return [a for a in ancestors if not os.stat(a).st_mode & 0o001]


def expose(kernel, paths) -> None:
    """In this (private) mount namespace: an empty tmpfs over every directory on the way to
    ``paths`` that others may not enter (``/root``, mode 0700), with ``paths`` bound back at
    their places: another user can then use them, and sees nothing else there."""
    fds = [(path, os.open(path, os.O_PATH)) for path in paths]
    closed = sorted({a for path in paths for a in _closed_ancestors(path)}, key=len)
    for directory in closed:
        if os.path.isdir(directory):  # not already replaced by an outer tmpfs
            kernel.mount("tmpfs", directory, "tmpfs", kernel.MS_NOSUID | kernel.MS_NODEV, "mode=0755")
    for path, fd in fds:
        os.makedirs(path, mode=0o755, exist_ok=True)  # in the tmpfs (umask 022 as root)
        kernel.mount(f"/proc/self/fd/{fd}", path, flags=kernel.MS_BIND | kernel.MS_REC)
        os.close(fd)


def become_nobody() -> None:
    """Root → nobody, with nobody able to run this interpreter (see the module docstring)."""
    host, kernel = import_sandbox()
    kernel.call("unshare", kernel.CLONE_NEWNS)
    kernel.mount(None, "/", flags=kernel.MS_REC | kernel.MS_PRIVATE)
    expose(kernel, [p for p in host.interpreter_layout()["reads"] if not host.others_can_read(p)])
    os.setgroups([])
    os.setresgid(NOBODY, NOBODY, NOBODY)
    os.setresuid(NOBODY, NOBODY, NOBODY)  # root → non-root: every capability is gone
    with open("/proc/self/status") as f:  # an ordinary user: no capability it could use
        caps = [line.split() for line in f if line.startswith(("CapPrm", "CapEff", "CapAmb"))]
    assert len(caps) == 3 and all(int(value, 16) == 0 for _, value in caps), caps


def unprivileged_main() -> dict:
    sandbox, _ = import_sandbox()
    Limits = sandbox.Limits
    quick = Limits(timeout_s=3.0)
    out: dict = {"uid": os.geteuid()}
    # Benign statuses and containment of runaway programs.
    for name, src, limits in (
        ("passed", "print('hi')", quick),
        ("failed", "assert False", quick),
        ("timeout", "while True: pass", Limits(timeout_s=1.5)),
        ("bomb", "import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass",
         Limits(timeout_s=1.5)),
        ("escape", ("import os, time\nif os.fork() == 0:\n    os.setsid()\n    time.sleep(60)\n"
                    "time.sleep(0.2)\nprint('parent done')"), quick),
    ):
        r = sandbox.run_program(src, limits=limits, guard=False)
        out[name] = {"status": r.status, "message": r.message, "stdout": r.stdout,
                     "left": sandbox_processes()}
    out["attacks"] = run_attacks(sandbox.run_program, quick, [True, False])
    out["concurrent"] = concurrent_runs(sandbox.run_program, Limits(timeout_s=20.0))
    # Where namespaces are unavailable: refused, unless weak isolation is asked for; then the
    # guard alone has to catch the same attacks (except KERNEL_ONLY, its documented gaps).
    sandbox.isolation_problem = lambda python=sys.executable: "simulated: user namespaces disabled"
    try:
        sandbox.run_program("print('hi')")
        out["refused"] = None
    except sandbox.SandboxUnavailable as e:
        out["refused"] = str(e)
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        r = sandbox.run_program("print('hi')", allow_weak_isolation=True)
        out["weak_passed"] = [r.status, r.stdout, [str(w.message) for w in caught]]
        names = [n for n in _ATTACKS if n not in KERNEL_ONLY]
        out["weak_attacks"] = run_attacks(sandbox.run_program, quick, [True], names,
                                          allow_weak_isolation=True)
        # Weak runs work in a directory on the host's disk: a tree deeper than rmtree copes with,
        # made unreadable, must still go.
        r = sandbox.run_program(DEEP_TREE, limits=quick, guard=False, allow_weak_isolation=True)
        out["weak_deep"] = [r.status, r.stdout.strip(), os.path.exists(r.stdout.strip())]
    return out


DEEP_TREE = """
import os
fd = os.open(".", os.O_RDONLY)
for i in range(1100):
    os.mkdir("d", dir_fd=fd)
    fd, parent = os.open("d", os.O_RDONLY, dir_fd=fd), fd
    os.close(parent)
os.chmod(".", 0o500)
print(os.getcwd())
"""


if __name__ == "__main__":
    if os.geteuid() == 0:
        become_nobody()
        os.execve(sys.executable, [sys.executable, "-s", __file__],
                  {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "WMTP_SECRET": SECRET})
    print(json.dumps(unprivileged_main()))
