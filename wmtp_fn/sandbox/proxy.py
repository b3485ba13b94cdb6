"""The proxy mode: the tests run in a trusted process (the judge) and call the candidate's
entry point, which runs in another, sandboxed process, through a data-only channel.

    judge (trusted)                                   candidate (untrusted)
    exec(prelude); name = proxy; exec(tests)          exec(candidate source)
    proxy(*args, **kwargs) ── ["call", args, kwargs] ──▶ entry_point(*args, **kwargs)
                           ◀── ["return", value] ──────
                           ◀── ["raise", type name, message]

Both messages are :mod:`wire` frames: plain built-in values only. The judge never runs a line
of the candidate's code, and what comes back is the candidate's *output* — a value to compare,
or an exception to re-raise (rebuilt as a fresh subclass of the built-in of that name, or of
``Exception``, carrying only the message) — never the verdict: patching the checker, exiting
early or forging a result line happens in a process whose word nobody takes. A candidate that
dies during a call (``gone``), tests that pass a value the wire cannot carry
(``unsupported``), or an answer that is not a wire value (a failure) stop the channel for good:
every later call raises a BaseException the tests cannot meaningfully catch, and the outcome
is decided by what went wrong, not by whether the tests swallowed it.

Differences from running the tests in the candidate's interpreter (the in-process mode): the
arguments are copies (a candidate that mutates its input is not seen doing so); results of
other types arrive as :class:`wire.Opaque` (equal to nothing); the candidate's exceptions keep
their type's name and message but not their attributes or traceback. Standalone: standard
library only.
"""

import builtins
import sys

import wmtp_fn.sandbox.wire as wire

MAX_REQUEST = 64 << 20
MAX_REPLY = 64 << 20


def describe(exc: BaseException) -> str:
    """``"TypeName: message"`` (just the name when the message is empty), at most 1000 chars."""
    try:
        message = str(exc)
    except BaseException:  # noqa: BLE001 - an exception whose __str__ fails
        message = "<unprintable>"
    text = f"{type(exc).__name__}: {message}" if message else type(exc).__name__
    return text if len(text) <= 1000 else text[:997] + "..."


def flush_output() -> None:
    """Flush ``sys.stdout`` and ``sys.stderr`` (whatever they are now); never raises."""
    for name in ("stdout", "stderr"):
        try:
            getattr(sys, name).flush()
        except BaseException:  # noqa: BLE001 - a closed or replaced stream
            pass


# ---------------------------------------------------------------- the candidate's side


def serve(source: str, entry_point: str, requests: int, replies: int) -> None:
    """Run the candidate's ``source``, then answer calls of ``entry_point`` until the judge
    closes the channel. A ``source`` that raises answers every call with that exception
    (as it would have failed the in-process program). The candidate's output is flushed
    before each answer: the process is killed, not ended, once the judge is done."""
    namespace = {"__name__": "__main__", "__builtins__": builtins}
    load_error = None
    try:
        exec(compile(source, "program.py", "exec"), namespace)
    except BaseException as e:  # noqa: BLE001 - SystemExit too: reported to the tests
        load_error = e
    while True:
        try:
            request = wire.read_frame(requests, MAX_REQUEST)
        except (EOFError, OSError, wire.WireError):
            return
        reply = _answer(request, namespace, entry_point, load_error)
        flush_output()
        try:
            wire.write_frame(replies, reply)
        except OSError:
            return


def _answer(request: bytes, namespace: dict, entry_point: str, load_error) -> bytes:
    if load_error is not None:
        return _raised(load_error)
    try:
        _, args, kwargs = wire.loads(request)
    except (wire.WireError, ValueError):
        return _raised(RuntimeError("sandbox: unreadable request"))
    if entry_point not in namespace:
        return _raised(NameError(f"name {entry_point!r} is not defined"))
    try:
        value = namespace[entry_point](*args, **kwargs)
    except BaseException as e:  # noqa: BLE001 - the candidate's exception is its answer
        return _raised(e)
    try:
        return wire.dumps(["return", value], opaque=True).encode()
    except BaseException as e:  # noqa: BLE001
        return _raised(TypeError(f"sandbox: the result could not be sent ({describe(e)})"))


def _raised(exc: BaseException) -> bytes:
    try:
        name, message = str(type(exc).__name__), describe(exc).partition(": ")[2]
    except BaseException:  # noqa: BLE001
        name, message = "Exception", "<unprintable>"
    return wire.dumps(["raise", name[:100], message]).encode()


# ---------------------------------------------------------------- the judge's side


class ChannelStopped(BaseException):
    """Raised by the proxy once the channel has failed; the judge's outcome is decided by why."""


def rebuild_exception(name: str, message: str) -> BaseException:
    """An exception whose type is called ``name`` (a fresh subclass of the built-in exception
    of that name, else of ``Exception``) and whose ``str`` is ``message``. Built from data
    only: no constructor of the built-in runs with the candidate's arguments."""
    base = getattr(builtins, name, None)
    if not (isinstance(base, type) and issubclass(base, BaseException)):
        base = Exception
    cls = type(name, (base,), {"__str__": lambda self: message, "__module__": "candidate"})
    exc = BaseException.__new__(cls)
    exc.args = (message,)
    return exc


def make_proxy(entry_point: str, requests: int, replies: int, stopped: dict):
    """The function the tests get as ``entry_point``. ``stopped`` receives ``"outcome"``:
    ``(status, message)`` at the first failure of the channel."""

    def stop(status: str, message: str):
        stopped.setdefault("outcome", (status, message))
        return ChannelStopped(stopped["outcome"][1])

    def candidate(*args, **kwargs):
        if "outcome" in stopped:
            raise ChannelStopped(stopped["outcome"][1])
        try:
            request = wire.dumps(["call", list(args), kwargs]).encode()
        except wire.Unencodable as e:
            raise stop("unsupported", f"the tests pass the candidate {e}; the proxy mode "
                       "carries only plain values (the in-process mode runs such tests)") from None
        try:
            wire.write_frame(requests, request)
            reply = wire.loads(wire.read_frame(replies, MAX_REPLY))
        except (EOFError, OSError):
            raise stop("gone", "the candidate's process ended during a call") from None
        except wire.WireError as e:
            raise stop("failed", f"sandbox: the candidate's answer is not a value ({e})") from None
        if type(reply) is list and len(reply) == 2 and reply[0] == "return":
            return reply[1]
        if (type(reply) is list and len(reply) == 3 and reply[0] == "raise"
                and type(reply[1]) is str and reply[1].isidentifier() and len(reply[1]) <= 100
                and type(reply[2]) is str):
            raise rebuild_exception(reply[1], reply[2])
        raise stop("failed", "sandbox: the candidate's answer is not a return or a raise")

    candidate.__name__ = candidate.__qualname__ = entry_point
    return candidate


def judge(prelude: str, tests: str, entry_point: str, requests: int, replies: int) -> tuple:
    """Run ``prelude`` (the benchmark's prompt: imports, helpers the tests use), bind
    ``entry_point`` to the proxy, run ``tests`` (which call it); ``(status, message)``:
    ``passed``, ``failed`` (with the exception), ``gone`` or ``unsupported`` (see above)."""
    stopped: dict = {}
    namespace = {"__name__": "__main__", "__builtins__": builtins}
    try:
        exec(compile(prelude, "prompt.py", "exec"), namespace)
        namespace[entry_point] = make_proxy(entry_point, requests, replies, stopped)
        exec(compile(tests, "tests.py", "exec"), namespace)
        outcome = ("passed", "")
    except BaseException as e:  # noqa: BLE001 - a failing test, SystemExit included
        outcome = ("failed", describe(e))
    return stopped.get("outcome", outcome)
