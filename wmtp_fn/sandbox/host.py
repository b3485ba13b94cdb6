"""Running an untrusted Python program in a separate, contained process.

``run_program(source, limits=..., guard=True) -> SandboxResult`` writes ``source`` to
``program.py`` in a fresh temporary directory, runs it with ``driver.py`` (which
describes the processes inside) and removes the directory afterwards.

Isolation model
---------------
**Enforced by the kernel**, as root and as an ordinary user alike:

- *Processes.* The program runs in its own PID namespace, as pid 2 under a namespace init. It
  cannot see, signal (kill, pidfd), re-limit (prlimit) or trace any process outside: they have
  no pid there, and ``/proc`` is a fresh one of the namespace. When the init ends, the kernel
  kills whatever is left inside (fork bombs, ``setsid`` escapes, programs it exec'd).
- *Files.* In its own mount namespace every mount but the working directory is read-only:
  /tmp, /dev/shm, the host user's files; links and renames out of the working directory fail
  across the mount boundary. /dev holds only null, zero, full, random and urandom (a
  read-only mount does not stop writing to a device node).
- *Network.* A network namespace with no interface up, not even loopback. A seccomp filter
  refuses sockets of any family but INET/INET6 (a unix socket file on a read-only mount can
  still be connected to, e.g. a session bus; AF_VSOCK reaches the hypervisor regardless of
  namespaces), datagram socketpairs, io_uring and the keyring calls.
- *Privileges.* No capability (bounding set empty) and ``no_new_privs``. **As root**: each
  concurrent run gets its own unprivileged uid/gid from a pool (``uid_base + slot``,
  cross-process ``flock`` per slot, uids that exist in ``/etc/passwd`` are never used), with
  no supplementary groups; it can read only what any stranger may read. If the interpreter
  lives where others may not go (a Python under ``/root``, mode 0700), that directory is
  covered by an empty tmpfs inside the namespace and only the interpreter's own directories
  are bound back (``exposure_steps``): nothing else of ``/root`` is visible, and no read
  permission is ever granted beyond the files' own. **Not root**: a user namespace that maps
  only the host's uid/gid; after the mounts are set up every capability in it is dropped. The
  program runs as the host user, so it can *read* what that user can read (and print it into
  its result), but write nothing outside its directory.
- *Resources.* rlimits on CPU seconds, address space, file size, processes (RLIMIT_NPROC
  counts the run's own processes: as root those of its uid, not root those of its user
  namespace; the sandbox's one or two helper processes are added to the limit), open files,
  no core dumps. The host waits ``limits.timeout_s`` of wall-clock time, then kills the
  process group; as root a reaper then sends ``kill(-1, SIGKILL)`` as the run's uid until no
  process of it is left (a slot is reused only once its uid has no process, not even a
  zombie); not root, it kills every descendant it finds, the namespace init included.

**Enforced by the audit hook** (``guard=True``, a second layer inside the program's own
interpreter, so Python code that digs out the original functions gets around it): no sockets,
ctypes or running programs (including ``_posixsubprocess.fork_exec``, which raises no audit
event), no signals/pidfds/prlimit to processes outside the run, no writing, deleting,
renaming or linking (either end) outside the working directory, including through
``dir_fd``.

**Where the kernel cannot do this** (no unprivileged user namespaces, e.g.
``kernel.unprivileged_userns_clone=0``; a container without CAP_SYS_ADMIN for root), probed
once per interpreter by ``isolation_problem``: ``run_program`` raises SandboxUnavailable,
saying why and how to allow it. ``allow_weak_isolation=True`` runs anyway (with a
RuntimeWarning) with only the rlimits, the guard and, as root, the separate uid; that is not
safe for hostile code. Isolation that fails at run time is never half-used: the run raises.

**Best effort / not promised**: what a program may *read* follows file permissions (as root:
world-readable files; not root: everything the host user can read). Disk use in the working
directory is bounded per file, not in total. The kernel itself is attack surface (no syscall
filter beyond the one above). The verdict is reported by the same process that runs the
program, tagged with a nonce the program never sees on any channel, so printing or writing a
fake verdict does not work; but code that digs through the driver's own frames can still fake
a pass. The sandbox contains what a program can do to the host; it does not make a
deliberately hostile program's *result* trustworthy.

Other host-side details: the driver runs as ``python -s -B`` with an environment built from
scratch (nothing of ours leaks in, as with ``-I``) that fixes ``PYTHONHASHSEED=0``, so a verdict
cannot depend on set iteration order; in a new session, with stdout/stderr going to host-side
temporary files, so a child that never closes them cannot stall the host.

Statuses: ``passed`` / ``failed`` come from the child's verdict; ``timeout`` when the wall clock
or the CPU limit ran out; ``error`` when the child ended without a verdict (killed by a signal,
``os._exit``, the driver failing to set up).
"""
from __future__ import annotations

import contextlib
import fcntl
import functools
import json
import math
import os
import pwd
import secrets
import select
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Literal

from wmtp_fn.sandbox.driver import kill_descendants

Status = Literal["passed", "failed", "timeout", "error"]

DRIVER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "driver.py")
# uids 1_900_000_000 + slot: above systemd's container range (524288-1879048191), below the
# 2^31 range systemd marks unusable, far from login users and subuid ranges.
UID_BASE = 1_900_000_000
N_SLOTS = 64
LOCK_DIR = os.path.join(tempfile.gettempdir(), "wmtp_fn_sandbox_locks")
_OUTPUT_TAIL = 8192


@dataclass(frozen=True)
class Limits:
    """Per-run limits. ``cpu_s=None`` means ``ceil(timeout_s) + 1`` (the wall clock fires first)."""

    timeout_s: float = 10.0
    cpu_s: int | None = None
    memory_bytes: int = 1024**3
    file_size_bytes: int = 16 * 1024**2
    n_processes: int = 16
    n_files: int = 256

    def rlimits(self) -> dict[str, int]:
        cpu = self.cpu_s if self.cpu_s is not None else math.ceil(self.timeout_s) + 1
        return {
            "RLIMIT_CPU": cpu,
            "RLIMIT_AS": self.memory_bytes,
            "RLIMIT_FSIZE": self.file_size_bytes,
            "RLIMIT_NPROC": self.n_processes,
            "RLIMIT_NOFILE": self.n_files,
            "RLIMIT_CORE": 0,
        }


@dataclass(frozen=True)
class SandboxResult:
    """``status``; ``message`` (the exception for ``failed``, the reason otherwise); wall-clock
    ``seconds``; the last 8 KiB of the program's ``stdout`` and ``stderr``."""

    status: Status
    message: str
    seconds: float
    stdout: str = ""
    stderr: str = ""


class SandboxUnavailable(RuntimeError):
    """The kernel cannot isolate programs here (and weak isolation was not allowed); the message
    says why and how to allow it. Nothing of the program was run."""


def others_can_read(path: str) -> bool:
    """True when a user unrelated to the owners can reach and read ``path`` (and list it, if a
    directory): every ancestor directory has the others-execute bit."""
    path = os.path.realpath(path)
    parts = path.split(os.sep)
    for i in range(1, len(parts)):
        if not os.stat(os.sep.join(parts[:i]) or os.sep).st_mode & stat.S_IXOTH:
            return False
    mode = os.stat(path).st_mode
    need = stat.S_IROTH | (stat.S_IXOTH if stat.S_ISDIR(mode) else 0)
    return mode & need == need


# Run by the interpreter in question (ours included: one way for all, once per interpreter).
_PATHS_SCRIPT = (
    "import json, os, sys, sysconfig\n"
    "p, v = sysconfig.get_paths(), sysconfig.get_config_var\n"
    "paths = [os.path.dirname(os.path.realpath(sys.executable))]\n"
    "paths += [p[k] for k in ('stdlib', 'platstdlib', 'purelib', 'platlib')]\n"
    "paths += [v('LIBDIR')] if v('Py_ENABLE_SHARED') else []\n"
    "print(json.dumps(paths))\n"
)


@functools.cache
def interpreter_paths(python: str = sys.executable) -> tuple[str, ...]:
    """Real paths of what a program run by ``python`` reads: the binary's directory, the
    standard library, site-packages and (when shared) libpython's directory."""
    out = subprocess.run(
        [python, "-I", "-S", "-c", _PATHS_SCRIPT], check=True, env={},
        stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=60,
    )
    paths = json.loads(out.stdout)
    return tuple(sorted({os.path.realpath(p) for p in paths if p and os.path.exists(p)}))


def _closed_ancestors(path: str) -> list[str]:
    """Proper ancestors of ``path`` that users unrelated to their owners may not enter."""
    parts = path.split(os.sep)
    ancestors = [os.sep.join(parts[:i]) or os.sep for i in range(1, len(parts))]
    return [a for a in ancestors if not os.stat(a).st_mode & stat.S_IXOTH]


def exposure_steps(paths: Iterable[str], workdir: str) -> list[list[str]]:
    """How the driver makes ``paths`` (the interpreter's) and ``workdir`` reachable for the
    sandbox uid inside its mount namespace without opening anything else up (root only).

    Every directory on the way that others may not enter (``/root``, mode 0700) is covered by an
    empty tmpfs (``hide``), and each such path is bound back at its own place (``bind``); in
    that order, outer before inner, so nothing but these paths shows through. Paths already
    readable by others need nothing. A path that is itself closed to others cannot be helped
    this way: SandboxUnavailable (granting the sandbox global read access is never an option).
    """
    hide: set[str] = set()
    bind: set[str] = set()
    for path in paths:
        path = os.path.realpath(path)
        if others_can_read(path):
            continue
        closed = _closed_ancestors(path)
        mode = os.stat(path).st_mode
        need = stat.S_IROTH | (stat.S_IXOTH if stat.S_ISDIR(mode) else 0)
        if not closed or mode & need != need:
            raise SandboxUnavailable(
                f"sandbox: {path} (needed by the interpreter) is not readable by other users, so "
                "the sandbox uid cannot use it; make it world-readable (mode o+r, and o+x for "
                "directories) or use an interpreter installed where other users can read it"
            )
        hide.update(closed)
        bind.add(path)
    workdir = os.path.realpath(workdir)
    closed = _closed_ancestors(workdir)
    if closed:
        hide.update(closed)
        bind.add(workdir)
    if os.sep in hide:
        raise SandboxUnavailable("sandbox: / is not traversable by other users")
    steps = [["hide", d] for d in hide] + [["bind", p] for p in bind]
    return sorted(steps, key=lambda s: (s[1].count(os.sep), s[0] != "hide", s[1]))


def _uid_processes(uid: int) -> tuple[list[int], list[int]]:
    """``(live, zombies)``: processes whose real uid is ``uid``."""
    live, zombies = [], []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/status", "rb") as f:
                status = f.read()
        except OSError:
            continue
        fields = dict(line.split(b":", 1) for line in status.splitlines() if b":" in line)
        if int(fields[b"Uid"].split()[0]) == uid:
            zombie = fields[b"State"].strip().startswith(b"Z")
            (zombies if zombie else live).append(int(name))
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


def _tail(f) -> str:
    f.seek(0, os.SEEK_END)
    size = f.tell()
    f.seek(max(0, size - _OUTPUT_TAIL))
    return f.read().decode("utf-8", errors="replace")


def _verdict(f, nonce: str) -> dict | None:
    f.seek(0)
    for line in f.read().splitlines():
        try:
            obj = json.loads(line)
        except ValueError:
            continue
        if isinstance(obj, dict) and obj.get("nonce") == nonce:
            return obj
    return None


def _kill_tree(pid: int) -> None:
    """Non-root cleanup: SIGKILL ``pid``'s live descendants (it is their subreaper) and group."""
    kill_descendants(pid, reap_children=False)
    with contextlib.suppress(OSError):
        os.killpg(pid, signal.SIGKILL)


def _wait(proc: subprocess.Popen, timeout: float) -> bool:
    """Wait until ``proc`` ends or ``timeout`` seconds pass; True when it timed out.

    Woken by a pidfd the moment the process ends: ``Popen.wait(timeout)`` polls with sleeps
    that double up to 50 ms, which would add tens of milliseconds to every short run."""
    try:
        pidfd = os.pidfd_open(proc.pid)
    except (AttributeError, OSError):  # kernel < 5.3
        try:
            proc.wait(timeout=timeout)
            return False
        except subprocess.TimeoutExpired:
            return True
    try:
        poller = select.poll()
        poller.register(pidfd, select.POLLIN)
        ended = poller.poll(timeout * 1000)
    finally:
        os.close(pidfd)
    if not ended:
        return True
    proc.wait()
    return False


def _remove_tree(path: str) -> None:
    def retry(func, p, _exc):
        # A program may chmod its own files to 000; make them removable again.
        with contextlib.suppress(OSError):
            os.chmod(os.path.dirname(p), 0o700)
            os.chmod(p, 0o700)
        with contextlib.suppress(OSError):
            func(p)

    if sys.version_info >= (3, 12):
        shutil.rmtree(path, onexc=retry)
    else:
        shutil.rmtree(path, onerror=retry)


def _no_verdict_message(returncode: int, stderr: str) -> str:
    if returncode < 0:
        try:
            name = signal.Signals(-returncode).name
        except ValueError:
            name = str(-returncode)
        text = f"no verdict: killed by signal {name}"
    else:
        text = f"no verdict: exited with code {returncode}"
    last = [line for line in stderr.splitlines() if line.strip()]
    return f"{text}; stderr: {last[-1]}" if last else text


def classify(
    verdict: dict | None,
    timed_out: bool,
    returncode: int,
    limits: Limits,
    seconds: float,
    stdout: str = "",
    stderr: str = "",
) -> SandboxResult:
    """How a run ended, from what the host observed (pure)."""
    if verdict is not None and verdict.get("status") in ("passed", "failed"):
        return SandboxResult(verdict["status"], str(verdict.get("message", "")), seconds, stdout, stderr)
    if timed_out:
        message = f"timed out after {limits.timeout_s:g} s (wall clock)"
        return SandboxResult("timeout", message, seconds, stdout, stderr)
    if returncode == -signal.SIGXCPU:
        message = f"CPU time limit exceeded ({limits.rlimits()['RLIMIT_CPU']} s)"
        return SandboxResult("timeout", message, seconds, stdout, stderr)
    return SandboxResult("error", _no_verdict_message(returncode, stderr), seconds, stdout, stderr)


def _running_as_root() -> bool:
    return os.geteuid() == 0


def _probe(python: str) -> str | None:
    """Why the kernel cannot isolate a run of ``python`` here; None when it can."""
    user_ns = not _running_as_root()
    if user_ns:
        # Inside a user namespace no capability of ours applies any more: the interpreter must
        # be readable by our uid as such (os.access ignores capabilities for non-root).
        unreadable = [p for p in interpreter_paths(python) if not os.access(p, os.R_OK | os.X_OK)]
        if unreadable:
            return (f"the interpreter's files {unreadable} are not readable by uid "
                    f"{os.getuid()} without capabilities")
    config = json.dumps({"probe": True, "user_ns": user_ns})
    proc = subprocess.run(
        [python, "-s", "-B", DRIVER, config], env={}, cwd="/", stdin=subprocess.DEVNULL,
        capture_output=True, text=True, timeout=60, check=False,
    )
    if proc.returncode == 0:
        return None
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    return lines[-1] if lines else f"the probe failed with exit status {proc.returncode}"


_probe_lock = threading.Lock()
_probe_results: dict[tuple[str, int], str | None] = {}


def isolation_problem(python: str = sys.executable) -> str | None:
    """Why runs of ``python`` cannot be isolated by the kernel here (None: they can). Probed
    once per interpreter and effective uid, by a driver that only enters the namespaces."""
    key = (python, os.geteuid())
    with _probe_lock:
        if key not in _probe_results:
            _probe_results[key] = _probe(python)
        return _probe_results[key]


def _unavailable_message(problem: str) -> str:
    if _running_as_root():
        how = (
            "As root the sandbox needs to create mount, network and PID namespaces "
            "(CAP_SYS_ADMIN), which containers usually withhold: e.g. docker run --cap-add "
            "SYS_ADMIN with a seccomp/AppArmor profile that allows unshare and mount."
        )
    else:
        how = (
            "Not as root the sandbox needs unprivileged user namespaces: "
            "sysctl kernel.unprivileged_userns_clone=1 (Debian/Ubuntu kernels that have it), "
            "user.max_user_namespaces > 0, and on Ubuntu 23.10+ "
            "kernel.apparmor_restrict_unprivileged_userns=0 or an AppArmor profile that allows "
            "userns for this interpreter; in a container, a seccomp profile that allows "
            "unshare/clone with CLONE_NEWUSER. Running as root works too (each run then gets "
            "its own uid)."
        )
    return (
        f"sandbox: cannot isolate untrusted programs: {problem}. {how} "
        "run_program(..., allow_weak_isolation=True) runs them anyway with only resource limits "
        "and the audit-hook guard, which Python code can get around: NOT safe for hostile code."
    )


def _run(
    source: str, limits: Limits, guard: bool, python: str, uid: int | None, isolate: bool
) -> SandboxResult:
    workdir = tempfile.mkdtemp(prefix="wmtp_sandbox_")
    try:
        with open(os.path.join(workdir, "program.py"), "w", encoding="utf-8") as f:
            f.write(source)
        steps = []
        if uid is not None:
            os.chown(workdir, uid, uid)
            os.chown(os.path.join(workdir, "program.py"), uid, uid)
            steps = exposure_steps(interpreter_paths(python), workdir)
            if steps and not isolate:
                raise SandboxUnavailable(
                    f"sandbox: the sandbox uid cannot reach {[p for k, p in steps if k == 'bind']} "
                    "and without a mount namespace they cannot be exposed to it alone"
                )
        nonce = secrets.token_hex(16)
        with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err, \
                tempfile.TemporaryFile() as verdict_file:
            config = {
                "uid": uid, "gid": uid, "guard": guard, "limits": limits.rlimits(),
                "verdict_fd": verdict_file.fileno(), "isolate": isolate,
                "user_ns": uid is None, "expose": steps,
            }
            env = {
                "PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": workdir, "TMPDIR": workdir,
                "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8", "PYTHONHASHSEED": "0",
                "PYTHONSAFEPATH": "1", "PYTHONDONTWRITEBYTECODE": "1",
                "PYTHONIOENCODING": "utf-8",
            }
            start = time.monotonic()
            proc = subprocess.Popen(
                [python, "-s", "-B", DRIVER, json.dumps(config)],
                stdin=subprocess.PIPE, stdout=out, stderr=err, cwd=workdir, env=env,
                pass_fds=(verdict_file.fileno(),), start_new_session=True,
            )
            with contextlib.suppress(BrokenPipeError):
                proc.stdin.write(nonce.encode() + b"\n")
                proc.stdin.close()
            timed_out = _wait(proc, limits.timeout_s)
            seconds = time.monotonic() - start
            if uid is None:
                _kill_tree(proc.pid)
            with contextlib.suppress(OSError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            if uid is not None:
                reap_uid(uid, python)
            stdout, stderr = _tail(out), _tail(err)
            verdict = _verdict(verdict_file, nonce)
        if verdict is not None and verdict.get("status") == "unavailable":
            raise SandboxUnavailable(_unavailable_message(str(verdict.get("message"))))
        return classify(verdict, timed_out, proc.returncode, limits, seconds, stdout, stderr)
    finally:
        _remove_tree(workdir)


def run_program(
    source: str,
    *,
    limits: Limits = Limits(),
    guard: bool = True,
    python: str = sys.executable,
    allow_weak_isolation: bool = False,
) -> SandboxResult:
    """Run ``source`` as a program in the sandbox and report how it ended (see module docstring).

    Raises SandboxUnavailable when the kernel cannot isolate it here, unless
    ``allow_weak_isolation``: then it runs with only resource limits, the audit-hook guard and
    (as root) its own uid, which is not safe for hostile code.
    """
    problem = isolation_problem(python)
    if problem is not None:
        if not allow_weak_isolation:
            raise SandboxUnavailable(_unavailable_message(problem))
        warnings.warn(f"sandbox: weak isolation, not safe for hostile code ({problem})",
                      RuntimeWarning, stacklevel=2)
    if _running_as_root():
        with uid_slot() as uid:
            return _run(source, limits, guard, python, uid, problem is None)
    return _run(source, limits, guard, python, None, problem is None)
