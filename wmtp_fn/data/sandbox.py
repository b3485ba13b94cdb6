"""Running an untrusted Python program in a separate, contained process.

``run_program(source, limits=..., guard=True) -> SandboxResult`` writes ``source`` to
``program.py`` in a fresh temporary directory and runs it with ``sandbox_driver.py`` (see
there for what happens inside the child). The host side:

- starts ``python -s -B sandbox_driver.py`` with an environment built from scratch (so nothing
  of ours leaks in, as with ``-I``) that fixes ``PYTHONHASHSEED=0``: verdicts must not depend on
  set iteration order, or a dataset label could flip between two verifications;
- in a new session (its own process group), with stdout/stderr going to host-side temporary
  files, so a child that never closes them cannot stall the host;
- waits ``limits.timeout_s`` of wall-clock time, then kills the whole process group;
- **as root**: each concurrent run gets its own unprivileged uid/gid from a pool
  (``uid_base + slot``, cross-process ``flock`` per slot, uids that exist in ``/etc/passwd``
  are never used), owns the temporary directory as that uid, and after every run a reaper
  started as root drops to that uid and sends ``kill(-1, SIGKILL)``, which reaches every process
  of the uid, including children that escaped the process group with ``setsid``; it repeats
  until no live process of the uid is left. A slot is handed out only when its uid has no
  process (not even a zombie), so RLIMIT_NPROC counts exactly the run's processes.
- **not root**: no uid switch is possible; the child is a subreaper, the host kills the
  process group and every descendant it can find in /proc. RLIMIT_NPROC then counts all of the
  user's processes (it still stops a fork bomb), and the audit-hook guard is what keeps the
  program from signalling or writing outside its tree and directory (best effort).
- removes the temporary directory afterwards.

Statuses: ``passed`` / ``failed`` come from the child's verdict; ``timeout`` when the wall clock
or the CPU limit ran out; ``error`` when the child ended without a verdict (killed by a signal,
``os._exit``, the driver failing to set up).

What this does not promise: the verdict is reported by the same process that runs the program,
tagged with a nonce the program never sees on any channel, so printing or writing a fake
verdict does not work; but code that digs through the driver's own frames can still fake a
pass. The sandbox contains what a program can do to the host; it does not make a deliberately
hostile program's *result* trustworthy.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import math
import os
import pwd
import secrets
import shutil
import signal
import stat
import subprocess
import sys
import sysconfig
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Literal

from wmtp_fn.data.sandbox_driver import kill_descendants

Status = Literal["passed", "failed", "timeout", "error"]

DRIVER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "sandbox_driver.py")
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


def interpreter_paths(python: str) -> list[str]:
    if python != sys.executable:
        return [python]
    paths = sysconfig.get_paths()
    return [python] + [paths[k] for k in ("stdlib", "platstdlib", "purelib", "platlib")]


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


def _run(source: str, limits: Limits, guard: bool, python: str, uid: int | None) -> SandboxResult:
    workdir = tempfile.mkdtemp(prefix="wmtp_sandbox_")
    try:
        with open(os.path.join(workdir, "program.py"), "w", encoding="utf-8") as f:
            f.write(source)
        if uid is not None:
            os.chown(workdir, uid, uid)
            os.chown(os.path.join(workdir, "program.py"), uid, uid)
        keep_read = uid is not None and not all(
            others_can_read(p) for p in interpreter_paths(python) if os.path.exists(p)
        )
        nonce = secrets.token_hex(16)
        with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err, \
                tempfile.TemporaryFile() as verdict_file:
            config = {
                "uid": uid, "gid": uid, "keep_read": keep_read, "guard": guard,
                "limits": limits.rlimits(), "verdict_fd": verdict_file.fileno(),
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
            timed_out = False
            try:
                proc.wait(timeout=limits.timeout_s)
            except subprocess.TimeoutExpired:
                timed_out = True
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
        return classify(verdict, timed_out, proc.returncode, limits, seconds, stdout, stderr)
    finally:
        _remove_tree(workdir)


def run_program(
    source: str,
    *,
    limits: Limits = Limits(),
    guard: bool = True,
    python: str = sys.executable,
) -> SandboxResult:
    """Run ``source`` as a program in the sandbox and report how it ended (see module docstring)."""
    if os.geteuid() == 0:
        with uid_slot() as uid:
            return _run(source, limits, guard, python, uid)
    return _run(source, limits, guard, python, None)
