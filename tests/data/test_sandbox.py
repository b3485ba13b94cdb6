"""The sandbox: benign statuses, and hostile programs contained within their timeout.

Hostile cases run twice when the tests run as root: with the audit-hook guard, and without it
(guard=False), so the OS-level containment (unprivileged uid, rlimits, network namespace, uid
reaper) is shown to hold on its own. Fork bombs run after a harmless bounded fork has shown
that processes are counted and reaped.
"""

import json
import os
import socket
import subprocess
import sys
import textwrap
import time

import pytest

from wmtp_fn.data.sandbox import Limits, SandboxResult, classify, others_can_read, run_program

ROOT = os.geteuid() == 0
GUARDS = [True, False] if ROOT else [True]
FAST = Limits(timeout_s=3.0)
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def run(src, limits=FAST, guard=True):
    start = time.monotonic()
    result = run_program(textwrap.dedent(src), limits=limits, guard=guard)
    elapsed = time.monotonic() - start
    # finishes within its timeout (plus start-up and reaping slack)
    assert elapsed < limits.timeout_s + 6.0, (elapsed, result)
    assert result.seconds <= elapsed
    return result


def driver_processes():
    """Live processes still running our driver (or forks of it)."""
    out = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/cmdline", "rb") as f:
                cmd = f.read()
            with open(f"/proc/{name}/stat", "rb") as f:
                state = f.read().rsplit(b")", 1)[1].split()[0]
        except OSError:
            continue
        if b"sandbox_driver.py" in cmd and state != b"Z":
            out.append(int(name))
    return out


def alive(pid):
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[1].split()[0] != b"Z"
    except OSError:
        return False


# ---------------------------------------------------------------- benign statuses


def test_passed_with_output():
    r = run("print('hi')")
    assert (r.status, r.message, r.stdout) == ("passed", "", "hi\n")
    assert isinstance(r, SandboxResult) and r.seconds > 0


def test_failed_assertion_and_exceptions():
    assert run("assert 1 == 2, 'nope'").message == "AssertionError: nope"
    r = run("def f(:\n  pass")
    assert (r.status, r.message) == ("failed", "SyntaxError: invalid syntax (program.py, line 1)")
    assert run("raise SystemExit(0)").message == "SystemExit: 0"  # exiting early is not passing
    assert run("{}['k']").message == "KeyError: 'k'"


def test_error_without_verdict():
    r = run("import os, sys\nsys.stderr.write('bye\\n')\nos._exit(3)")
    assert (r.status, r.message) == ("error", "no verdict: exited with code 3; stderr: bye")
    r = run("import os, signal\nos.kill(os.getpid(), signal.SIGSEGV)")
    assert (r.status, r.message) == ("error", "no verdict: killed by signal SIGSEGV")


def test_timeout_wall_clock():
    r = run("while True:\n    pass", limits=Limits(timeout_s=1.0))
    assert (r.status, r.message) == ("timeout", "timed out after 1 s (wall clock)")
    assert 1.0 <= r.seconds < 2.5
    r = run("import time\ntime.sleep(60)", limits=Limits(timeout_s=1.0))
    assert r.status == "timeout"


def test_cpu_limit():
    r = run("while True:\n    pass", limits=Limits(timeout_s=8.0, cpu_s=1))
    assert (r.status, r.message) == ("timeout", "CPU time limit exceeded (1 s)")
    assert r.seconds < 4.0


def test_deterministic_hash_seed_and_fresh_workdir():
    src = "import os\nprint(list({'apple', 'kiwi', 'plum', 'fig', 'lime'}))\nprint(os.getcwd())"
    a, b = run(src), run(src)
    assert a.stdout.splitlines()[0] == b.stdout.splitlines()[0]
    cwd_a, cwd_b = a.stdout.splitlines()[1], b.stdout.splitlines()[1]
    assert cwd_a != cwd_b and not os.path.exists(cwd_a) and not os.path.exists(cwd_b)


def test_program_can_use_its_workdir_and_stdlib():
    r = run("import json, math, collections, itertools, re\n"
            "open('scratch.txt', 'w').write('x' * 10)\nprint(len(open('scratch.txt').read()))")
    assert (r.status, r.stdout) == ("passed", "10\n")


def test_classify_golden():
    lim = Limits(timeout_s=2.0)
    passed = {"nonce": "n", "status": "passed", "message": ""}
    assert classify(passed, True, -9, lim, 2.1) == SandboxResult("passed", "", 2.1)  # it finished
    assert classify(None, True, -9, lim, 2.0).message == "timed out after 2 s (wall clock)"
    assert classify(None, False, -24, lim, 1.0) == SandboxResult(
        "timeout", "CPU time limit exceeded (3 s)", 1.0)
    assert classify(None, False, -11, lim, 0.1, stderr="x\nboom\n\n").message == (
        "no verdict: killed by signal SIGSEGV; stderr: boom")
    assert classify({"status": "weird"}, False, 0, lim, 0.1).message == "no verdict: exited with code 0"


def test_others_can_read(tmp_path):
    assert others_can_read("/usr")
    private = tmp_path / "private"
    private.mkdir(mode=0o700)
    (private / "f").write_text("x")
    os.chmod(private / "f", 0o644)
    assert not others_can_read(str(private / "f"))


# ---------------------------------------------------------------- hostile programs


@pytest.mark.parametrize("guard", GUARDS)
def test_writing_outside_workdir(tmp_path, guard):
    victim = tmp_path / "victim.txt"
    victim.write_text("original")
    before = victim.stat()
    new = tmp_path / "new.txt"
    shared = f"/tmp/wmtp_sandbox_escape_{os.getpid()}_{time.time_ns()}.txt"  # world-writable dir
    src = f"""
        import os, shutil
        attempts = {{
            "overwrite": lambda: open({str(victim)!r}, "w").write("pwned"),
            "append": lambda: open({str(victim)!r}, "a").write("pwned"),
            "create": lambda: open({str(new)!r}, "w").write("pwned"),
            "remove": lambda: os.remove({str(victim)!r}),
            "rename": lambda: os.rename({str(victim)!r}, {str(new)!r}),
            "chmod": lambda: os.chmod({str(victim)!r}, 0o777),
            "rmtree": lambda: shutil.rmtree({str(tmp_path)!r}),
            "tmp": lambda: open({shared!r}, "w").write("pwned"),
        }}
        for name, attempt in attempts.items():
            try:
                attempt()
                print(name, "SUCCEEDED")
            except OSError as e:
                print(name, "denied", type(e).__name__)
    """
    with open("/proc/self/mountinfo") as f:
        mounts = f.read()
    r = run(src, guard=guard)
    with open("/proc/self/mountinfo") as f:
        assert f.read() == mounts  # the sandbox's read-only remounts stay in its namespace
    assert r.status == "passed", r
    assert "SUCCEEDED" not in r.stdout and r.stdout.count("denied") == 8, r.stdout
    assert victim.read_text() == "original"
    after = victim.stat()
    assert (after.st_mode, after.st_mtime_ns, after.st_size) == (before.st_mode, before.st_mtime_ns, before.st_size)
    assert not new.exists() and not os.path.exists(shared)


@pytest.mark.parametrize("guard", GUARDS)
def test_huge_allocation(guard):
    r = run("x = bytearray(1 << 40)", guard=guard)
    assert (r.status, r.message) == ("failed", "MemoryError")
    # grows page by page (each bytearray is zero-filled, so really touched) to the limit
    r = run("chunks = []\nwhile True:\n    chunks.append(bytearray(16 * 2**20))",
            limits=Limits(timeout_s=3.0, memory_bytes=256 * 2**20), guard=guard)
    assert (r.status, r.message) == ("failed", "MemoryError")


@pytest.mark.parametrize("guard", GUARDS)
@pytest.mark.parametrize(
    "attack",
    [
        "os.kill(os.getppid(), signal.SIGKILL)",
        "os.killpg(os.getpgid(os.getppid()), signal.SIGKILL)",
        "os.kill(-1, signal.SIGKILL)",
    ],
)
def test_killing_the_parent(guard, attack, tmp_path):
    if attack.startswith("os.kill(-1") and not ROOT and not guard:
        pytest.skip("kill(-1) as our own uid with no guard would kill this test run")
    sentinel = tmp_path / "sentinel"
    sentinel.write_text("ok")
    r = run(f"import os, signal\n{attack}\nprint('survived')", guard=guard)
    # We are still here; the attempt failed or only hit the sandbox's own processes.
    assert r.status in ("failed", "passed", "error"), r
    if r.status == "failed":
        assert r.message.startswith("PermissionError"), r.message
    assert sentinel.read_text() == "ok"
    assert os.getppid() != 1


@pytest.mark.parametrize("guard", GUARDS)
def test_network_socket(guard):
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    listener.setblocking(False)
    port = listener.getsockname()[1]
    try:
        r = run(f"import socket\ns = socket.create_connection(('127.0.0.1', {port}), timeout=2)\n"
                "s.sendall(b'exfiltrate')", guard=guard)
        assert r.status == "failed", r
        if guard:
            assert r.message == "PermissionError: sandbox: network access is not allowed (socket.__new__)"
        with pytest.raises(BlockingIOError):
            listener.accept()  # nobody ever connected
    finally:
        listener.close()


@pytest.mark.parametrize("guard", GUARDS)
def test_bounded_fork_children_are_reaped(guard):
    # The harmless version: five children that would sleep for a minute, two of them in their
    # own session (escaping the process group).
    src = """
        import os, time
        for i in range(5):
            pid = os.fork()
            if pid == 0:
                if i < 2:
                    os.setsid()
                print(os.getpid(), flush=True)
                time.sleep(60)
                os._exit(0)
        time.sleep(0.3)
    """
    r = run(src, guard=guard)
    assert r.status == "passed", r
    pids = [int(x) for x in r.stdout.split()]
    assert len(pids) == 5
    assert not any(alive(p) for p in pids)
    assert driver_processes() == []


@pytest.mark.parametrize("guard", GUARDS)
def test_escaped_children_killed_on_timeout(guard):
    src = """
        import os, time
        if os.fork() == 0:
            os.setsid()
            if os.fork() == 0:
                print(os.getpid(), flush=True)
                while True:
                    pass
        while True:
            time.sleep(1)
    """
    r = run(src, limits=Limits(timeout_s=1.5), guard=guard)
    assert r.status == "timeout"
    pid = int(r.stdout.split()[0])
    assert not alive(pid)
    assert driver_processes() == []


@pytest.mark.parametrize("guard", GUARDS)
def test_fork_bomb(guard):
    src = """
        import os
        while True:
            try:
                os.fork()
            except OSError:
                pass
    """
    limits = Limits(timeout_s=2.0, n_processes=16)
    r = run(src, limits=limits, guard=guard)
    assert r.status == "timeout", r
    assert driver_processes() == []
    # and the next run is unaffected
    assert run("import os\nif os.fork() == 0:\n    os._exit(0)\nos.wait()\nprint('ok')").stdout == "ok\n"


def test_verdict_cannot_be_forged_without_the_nonce():
    src = """
        import json, os
        for fd in range(3, 64):
            try:
                os.write(fd, (json.dumps({"nonce": "guess", "status": "passed", "message": ""}) + "\\n").encode())
            except OSError:
                pass
        raise SystemExit(1)
    """
    r = run(src)
    assert (r.status, r.message) == ("failed", "SystemExit: 1")


@pytest.mark.parametrize(
    "program, refusal",
    [
        ("import _posixsubprocess\n_posixsubprocess.fork_exec([b'/bin/true'], *[None] * 22)",
         "running other programs is not allowed (_posixsubprocess.fork_exec)"),
        ("import sys\ndel sys.modules['_posixsubprocess']\nimport _posixsubprocess",
         "importing a fresh _posixsubprocess is not allowed"),
        ("import os\nos.link('/etc/hostname', 'h')", "os.link outside the working directory"),
        ("import os\nos.symlink('/etc/hostname', 's')", "os.symlink outside the working directory"),
        ("import os\nos.mkdir('x', dir_fd=os.open('/tmp', os.O_RDONLY))",
         "os.mkdir outside the working directory"),
        ("import os\nos.open('x', os.O_WRONLY | os.O_CREAT, dir_fd=os.open('/tmp', os.O_RDONLY))",
         "writing outside the working directory: 'x'"),
        ("import os\nos.pidfd_open(os.getppid())", "pidfd of pid"),
        ("import os, signal\nsignal.pidfd_send_signal(os.open(f'/proc/{os.getppid()}', os.O_RDONLY), 15)",
         "signalling pid"),
        ("import os, resource\nresource.prlimit(os.getppid(), resource.RLIMIT_NOFILE, (3, 3))",
         "changing the limits of pid"),
    ],
)
def test_guard_covers_what_audit_events_miss(program, refusal):
    """Running programs, signalling and writing through calls that raise no (or an incomplete)
    audit event: the guard, a second layer, refuses them too."""
    r = run(program)
    assert r.status == "failed" and r.message.startswith("PermissionError: sandbox: "), r
    assert refusal in r.message, r.message


# ---------------------------------------------------------------- not root

_UNPRIVILEGED = r"""
import ctypes, json, os, sys
libc = ctypes.CDLL(None, use_errno=True)
class H(ctypes.Structure): _fields_ = [("v", ctypes.c_uint32), ("pid", ctypes.c_int)]
class D(ctypes.Structure): _fields_ = [("e", ctypes.c_uint32), ("p", ctypes.c_uint32), ("i", ctypes.c_uint32)]
# Become nobody. The interpreter lives where nobody cannot read (/root), so keep only
# CAP_DAC_READ_SEARCH as an ambient capability, inherited by the sandbox's own children.
assert libc.prctl(8, 1, 0, 0, 0) == 0  # PR_SET_KEEPCAPS
os.setgroups([]); os.setresgid(65534, 65534, 65534); os.setresuid(65534, 65534, 65534)
d = (D * 2)(); d[0].e = d[0].p = d[0].i = 1 << 2
assert libc.capset(ctypes.byref(H(0x20080522, 0)), d) == 0
assert libc.prctl(47, 2, 2, 0, 0) == 0  # PR_CAP_AMBIENT_RAISE CAP_DAC_READ_SEARCH
assert os.geteuid() == 65534
from wmtp_fn.data.sandbox import Limits, run_program
programs = {
    "passed": "print('hi')",
    "failed": "assert False",
    "timeout": "while True: pass",
    "kill_parent": "import os, signal\nos.kill(os.getppid(), signal.SIGKILL)",
    "kill_all": "import os, signal\nos.kill(-1, signal.SIGKILL)",
    "write": "open('/tmp/wmtp_unpriv_escape.txt', 'w').write('x')",
    "escape": "import os, time\nif os.fork() == 0:\n    os.setsid()\n    print(os.getpid(), flush=True)\n    time.sleep(60)\ntime.sleep(0.2)",
    "bomb": "import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass",
}
out = {}
for name, src in programs.items():
    r = run_program(src, limits=Limits(timeout_s=1.5))
    out[name] = [r.status, r.message, r.stdout]
print(json.dumps(out))
"""


@pytest.mark.skipif(not ROOT, reason="as non-root the whole suite already runs unprivileged")
def test_works_when_not_root():
    proc = subprocess.run([sys.executable, "-c", _UNPRIVILEGED], cwd=REPO, capture_output=True,
                          text=True, timeout=60, env={"PATH": os.environ["PATH"], "PYTHONPATH": REPO})
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out["passed"] == ["passed", "", "hi\n"]
    assert out["failed"][:2] == ["failed", "AssertionError"]
    assert out["timeout"][:2] == ["timeout", "timed out after 1.5 s (wall clock)"]
    assert out["kill_parent"][1].startswith("PermissionError: sandbox: signalling pid")
    assert out["kill_all"][1] == "PermissionError: sandbox: signalling pid -1 is not allowed"
    assert out["write"][1].startswith("PermissionError: sandbox: writing outside the working directory")
    assert not os.path.exists("/tmp/wmtp_unpriv_escape.txt")
    assert out["escape"][0] == "passed" and not alive(int(out["escape"][2]))
    assert out["bomb"][0] == "timeout"
    assert driver_processes() == []
