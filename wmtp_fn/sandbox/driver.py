"""The child side of the sandbox: a script the host runs as

    python -S -s -B -c BOOTSTRAP      (stdin: marshal of the modules, the config, the source)

It uses only the standard library and its sibling modules ``kernel``, ``guard``, ``wire`` and
``proxy``, which the host sends along as code (see BOOTSTRAP); ``host.py`` explains the model,
this is how it is carried out. Processes, with ``isolate`` (the host refuses to run without
it unless told otherwise):

- **D** (this process) joins the run's memory cgroup (when the host made one), enters new
  mount, network, IPC, UTS and PID namespaces (and, when not root, a user namespace mapping
  only our uid/gid), forks C, and ends the way the program did (same exit code or signal).
- **C**, pid 1 of the new PID namespace (it dies with D): builds the run's own root file
  system (``kernel.build_root``), lowers its privileges for good (root: the run's uid/gid; not
  root: no capability left; both: empty bounding set, ``no_new_privs``, not dumpable), loads
  the seccomp filter, forks J (proxy mode) and P, and waits. When C ends, the kernel kills
  every process left in the namespace. (The program must not be pid 1: pid 1 ignores signals
  it has no handler for, even its own SIGSEGV or SIGXCPU.)
- **J**, the judge (proxy mode only): reads the tests and its nonce from a pipe nobody else
  reads, runs them with the entry point bound to the proxy (``proxy.judge``) and writes the
  verdict on the control channel. Not dumpable: the program cannot read or write its memory
  or descriptors.
- **P**, the program: closes everything of the sandbox's (control channel, the judge's pipe,
  the report pipe to D) before any of its code runs, sets the resource limits, installs the
  audit-hook guard, then either serves the proxy's calls (``proxy.serve``) or, in-process
  mode, runs the whole program and writes its own verdict (the weaker guarantee).

Without ``isolate`` (``allow_weak_isolation``) D plays C's part without namespaces, mounts or
seccomp: as root it switches to the run's uid; it becomes a child subreaper, so orphaned
grandchildren stay in its tree where they can be found and killed.

Channels (all pipes, made by the host per run, write ends passed down): **control** — only
the sandbox's own code ever holds it: ``unavailable`` when a setup step fails (before the
program exists), the judge's verdict; **verdict** — in-process mode only, held by P. Lines are
``NONCE STATUS HEX(message)``.
"""

import _signal
import builtins
import marshal
import os
import sys

import wmtp_fn.sandbox.guard as guard
import wmtp_fn.sandbox.kernel as kernel
import wmtp_fn.sandbox.proxy as proxy

# What the host runs, ``python -S -s -B -c BOOTSTRAP``, with marshal of ``(modules, config,
# source)`` on stdin: ``modules`` are this module and its siblings as ``(name, code)``, compiled
# once by the host (or their source, for an interpreter of another version), executed here as
# modules without touching the package's files or running wmtp_fn's __init__ (torch).
BOOTSTRAP = """import marshal, sys
modules, config, source = marshal.loads(sys.stdin.buffer.read())
sys.modules["wmtp_fn"], sys.modules["wmtp_fn.sandbox"] = type(sys)("wmtp_fn"), type(sys)("wmtp_fn.sandbox")
for name, code in modules:
    sys.modules[name] = module = type(sys)(name)
    exec(compile(code, name, "exec") if isinstance(code, str) else code, module.__dict__)
sys.modules["wmtp_fn.sandbox.driver"].main(config, source)
"""
MODULES = ("kernel", "guard", "wire", "proxy", "driver")  # in import order


def line(nonce: str, status: str, message: str) -> bytes:
    """One channel line: ``NONCE STATUS HEX`` (hex of the UTF-8 message: no quoting to get
    wrong, and a parser that cannot recurse)."""
    return f"{nonce} {status} {message.encode('utf-8', 'replace').hex()}\n".encode("ascii")


def refuse(config: dict, step: str, exc: BaseException) -> None:
    """Isolation failed: say why on the control channel and end without running the program."""
    os.write(config["control_fd"], line(config["nonce"], "unavailable", f"{step}: {proxy.describe(exc)}"))
    os._exit(0)


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


def _close(*fds) -> None:
    for fd in fds:
        if fd is not None:
            try:
                os.close(fd)
            except OSError:
                pass


# ---------------------------------------------------------------- D


def main(config: dict, source: str) -> None:
    """D (see the module docstring); never returns."""
    del sys.modules["wmtp_fn"], sys.modules["wmtp_fn.sandbox"]  # nothing for the program to import
    devnull = os.open("/dev/null", os.O_RDONLY)
    os.dup2(devnull, 0)
    os.close(devnull)
    sys.path += config["site"]  # site-packages without running their .pth files (-S)
    builtins.exit = builtins.quit = sys.exit  # what site.py would have added (a SystemExit)
    if config["cgroup"]:
        try:
            with open(config["cgroup"], "w") as f:
                f.write(str(os.getpid()))
        except OSError as e:
            refuse(config, "joining the memory cgroup", e)
    if not config["isolate"]:
        supervise(config, source, None)
    try:
        kernel.enter_namespaces(config["user_ns"])
    except OSError as e:
        refuse(config, "isolating", e)
    read_end, write_end = os.pipe()
    init = os.fork()
    if init == 0:
        os.close(read_end)
        _as_child(supervise, config, source, write_end)
    _close(write_end, config["control_fd"], config["verdict_fd"], config["judge_fd"])
    _, status = os.waitpid(init, 0)
    report = os.read(read_end, 64)
    kernel.exit_like(int(report) if report else status)


# ---------------------------------------------------------------- C


def supervise(config: dict, source: str, report_fd) -> None:
    """C (``report_fd``: where P's wait status goes) or, without isolation, D itself: set up,
    fork J and P, wait for the one whose end decides the run. Never returns."""
    isolated = report_fd is not None
    uid = config["uid"]
    step = "isolating"
    try:
        if isolated:
            kernel.die_with_parent()
            kernel.build_root(config["root"], None if uid is None else (uid, uid))
            kernel.set_hostname("sandbox")
        with open("program.py", "w", encoding="utf-8") as f:
            f.write(source)
        if uid is not None:
            os.chown("program.py", uid, uid)
        step = "lowering privileges"
        if uid is not None:
            kernel.drop_privileges(uid, uid)
        elif isolated:
            kernel.drop_capabilities()
        kernel.set_dumpable(False)
        if isolated:
            kernel.install_seccomp(config["cgroup"] is not None)
    except (OSError, RuntimeError) as e:
        refuse(config, step, e)
    if not isolated:
        kernel.become_subreaper()
    control, judge_fd, verdict = config["control_fd"], config["judge_fd"], config["verdict_fd"]
    judged = judge_fd is not None
    requests, replies = (os.pipe(), os.pipe()) if judged else ((None, None), (None, None))
    judge = None
    if judged:
        judge = os.fork()
        if judge == 0:
            _close(report_fd, verdict, requests[0], replies[1])
            _as_child(run_judge, config, requests[1], replies[0])
    program = os.fork()
    if program == 0:
        # Before any of the program's code exists: nothing of the sandbox's stays open.
        _close(report_fd, control, judge_fd, requests[1], replies[0])
        if judged:
            _as_child(run_candidate, config, source, requests[0], replies[1])
        _as_child(run_in_process, config, source, verdict)
    _close(control, judge_fd, verdict, *requests, *replies)
    status = _wait_for_the_end(judge, program)
    if not isolated:
        kernel.kill_descendants(os.getpid())
        kernel.exit_like(status)
    os.write(report_fd, str(status).encode())
    os._exit(0)  # the kernel now kills everything left in the namespace


def _wait_for_the_end(judge, program: int) -> int:
    """Reap (as pid 1 or subreaper, orphans too) until the judge ends (then the program is
    killed) or, without a judge, the program ends; the program's wait status."""
    decisive = judge if judge is not None else program
    statuses = {}
    while decisive not in statuses:
        pid, status = os.waitpid(-1, 0)
        statuses[pid] = status
    if program not in statuses:
        try:
            os.kill(program, _signal.SIGKILL)
        except OSError:
            pass
        _, statuses[program] = os.waitpid(program, 0)
    return statuses[program]


# ---------------------------------------------------------------- J and P


def _judge_limits(config: dict) -> dict:
    return {k: v for k, v in config["limits"].items() if k != "RLIMIT_NPROC"}


def run_judge(config: dict, requests: int, replies: int) -> None:
    """J: the tests, calling the candidate through the proxy; the verdict on the control channel."""
    chunks = []
    while chunk := os.read(config["judge_fd"], 1 << 16):
        chunks.append(chunk)
    os.close(config["judge_fd"])
    job = marshal.loads(b"".join(chunks))
    kernel.set_limits(_judge_limits(config))
    os.chdir("/")  # nothing the program writes is where the judge looks
    status, message = proxy.judge(job["prelude"], job["tests"], job["entry_point"], requests, replies)
    proxy.flush_output()
    os.write(config["control_fd"], line(job["nonce"], status, message))
    os._exit(0)


def _program_setup(config: dict) -> None:
    """P's limits and guard, just before the program's code runs."""
    limits = dict(config["limits"])
    limits["RLIMIT_NPROC"] += config["helpers"]
    kernel.set_limits(limits)
    kernel.set_dumpable(True)  # the program's own process is an ordinary one
    # Past the file-size limit a write should raise OSError (a failure), not kill the process.
    _signal.signal(_signal.SIGXFSZ, _signal.SIG_IGN)
    if config["guard"]:
        guard.install_guard(os.getcwd(), os.getpid())


def run_candidate(config: dict, source: str, requests: int, replies: int) -> None:
    """P, proxy mode: the candidate's source, then its entry point answers the judge's calls."""
    _program_setup(config)
    proxy.serve(source, config["entry_point"], requests, replies)
    os._exit(0)


def run_in_process(config: dict, source: str, verdict_fd: int) -> None:
    """P, in-process mode: run the whole program (tests included) and report whether it ran to
    the end (``passed``) or raised (``failed``, SystemExit and SyntaxError included). The
    program shares this interpreter, so a hostile one can forge this report: the weaker mode."""
    write, exit_, getpid, main_pid = os.write, os._exit, os.getpid, os.getpid()
    verdict_line, nonce = line, config["nonce"]
    stdout, stderr = sys.stdout, sys.stderr
    _program_setup(config)
    namespace = {"__name__": "__main__", "__builtins__": __builtins__}
    try:
        exec(compile(source, "program.py", "exec"), namespace)
        status, message = "passed", ""
    except BaseException as e:  # noqa: BLE001 - SystemExit too: exiting early is not passing
        status, message = "failed", proxy.describe(e)
    if getpid() != main_pid:
        exit_(0)  # a forked child of the program: only the main process reports
    for stream in (stdout, stderr):
        try:
            stream.flush()
        except BaseException:  # noqa: BLE001
            pass
    write(verdict_fd, verdict_line(nonce, status, message))
    exit_(0)
