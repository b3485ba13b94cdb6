"""The proxy protocol on its own, in this process: the judge's side against the real
candidate side (``serve`` in a thread, on trusted test code) or against a fake one."""

import builtins
import os
import threading

import pytest

from wmtp_fn.sandbox import proxy, wire


def converse(candidate: str, tests: str, prelude: str = "", entry_point: str = "f"):
    """``proxy.judge``'s outcome with ``candidate`` served by ``proxy.serve`` in a thread."""
    requests, replies = os.pipe(), os.pipe()
    server = threading.Thread(target=proxy.serve, args=(candidate, entry_point, requests[0], replies[1]))
    server.start()
    try:
        return proxy.judge(prelude, tests, entry_point, requests[1], replies[0])
    finally:
        os.close(requests[1])  # the candidate's side sees the end of the calls
        server.join()
        for fd in (requests[0], replies[0], replies[1]):
            os.close(fd)


def against(fake_server, tests: str):
    """``proxy.judge``'s outcome against ``fake_server(requests_fd, replies_fd)`` in a thread."""
    requests, replies = os.pipe(), os.pipe()
    server = threading.Thread(target=fake_server, args=(requests[0], replies[1]))
    server.start()
    try:
        return proxy.judge("", tests, "f", requests[1], replies[0])
    finally:
        for fd in (requests[1], requests[0], replies[0]):
            os.close(fd)
        server.join()


def test_calls_return_values_and_tests_decide():
    candidate = "def f(x, *, scale=1):\n    return [x * scale, (x,), {x: 'v'}]\n"
    assert converse(candidate, "assert f(2, scale=3) == [6, (2,), {2: 'v'}]\n") == ("passed", "")
    assert converse(candidate, "assert f(2) == [3, (2,), {2: 'v'}], 'wrong'\n") == ("failed", "AssertionError: wrong")


def test_the_prelude_gives_the_tests_their_helpers_not_the_candidates():
    # the candidate redefines the helper; the tests use the prelude's
    prelude = "def helper(s):\n    return s[::-1]\n\ndef f(s):\n    '''stub'''\n"
    candidate = prelude + "    return helper(s)\n\ndef helper(s):\n    return 'cheat'\n"
    assert converse(candidate, "assert f(helper('ab')) == 'cheat'\n", prelude) == ("passed", "")
    assert converse(candidate, "assert helper('ab') == 'ba'\n", prelude) == ("passed", "")


@pytest.mark.parametrize("raises, expected", [
    ("raise KeyError('k')", "KeyError: 'k'"),
    ("raise ValueError", "ValueError"),
    ("return 1 / 0", "ZeroDivisionError: division by zero"),
    ("raise Custom('mine')", "Custom: mine"),
    ("raise SystemExit(3)", "SystemExit: 3"),
])
def test_exceptions_keep_their_name_and_message(raises, expected):
    candidate = f"class Custom(Exception):\n    pass\n\ndef f():\n    {raises}\n"
    assert converse(candidate, "f()\n") == ("failed", expected)


def test_tests_can_catch_the_candidates_exceptions_by_builtin_type():
    candidate = "def f(x):\n    if x < 0:\n        raise ValueError('negative')\n    return x\n"
    tests = "try:\n    f(-1)\n    raise AssertionError('no raise')\nexcept ValueError as e:\n    assert str(e) == 'negative'\n"
    assert converse(candidate, tests) == ("passed", "")


def test_a_candidate_failing_to_load_fails_every_call():
    assert converse("x = 1 / 0\ndef f():\n    return 1\n", "f()\n") == ("failed", "ZeroDivisionError: division by zero")
    assert converse("def g():\n    return 1\n", "f()\n") == ("failed", "NameError: name 'f' is not defined")


def test_arguments_are_copies():
    candidate = "def f(xs):\n    xs.append(99)\n    return len(xs)\n"
    assert converse(candidate, "xs = [1]\nassert f(xs) == 2\nassert xs == [1]\n") == ("passed", "")


def test_results_of_other_types_are_opaque():
    candidate = "def f():\n    return (i for i in range(2))\n"
    status, message = converse(candidate, "assert f() == [0, 1]\n")
    assert (status, message) == ("failed", "AssertionError")


def test_unsupported_arguments():
    status, message = converse("def f(g):\n    return g(1)\n", "assert f(lambda x: x) == 1\n")
    assert status == "unsupported" and "function" in message, message


def test_gone_and_broken_stop_the_channel_for_good():
    def dies(requests, replies):
        wire.read_frame(requests, 1 << 20)
        os.close(replies)  # the candidate's process ends during the call

    tests = "for _ in range(3):\n    try:\n        f(1)\n    except BaseException:\n        pass\n"
    assert against(dies, tests) == ("gone", "the candidate's process ended during a call")

    def garbage(requests, replies):
        wire.read_frame(requests, 1 << 20)
        wire.write_frame(replies, b"[" * 50_000)
        try:
            while True:  # then answer every further call properly: too late
                wire.read_frame(requests, 1 << 20)
                wire.write_frame(replies, wire.dumps(["return", 1]).encode())
        except (EOFError, OSError):
            pass
        finally:
            os.close(replies)

    status, message = against(garbage, tests + "assert f(1) == 1\n")
    assert status == "failed" and message.startswith("sandbox: the candidate's answer is not a value"), message

    def wrong_shape(requests, replies):
        wire.read_frame(requests, 1 << 20)
        wire.write_frame(replies, wire.dumps(["raise", "not an identifier", "x"]).encode())
        os.close(replies)

    assert against(wrong_shape, "f(1)\n") == ("failed", "sandbox: the candidate's answer is not a return or a raise")


def test_rebuilt_exceptions():
    e = proxy.rebuild_exception("KeyError", "'k'")
    assert isinstance(e, KeyError) and type(e) is not KeyError and type(e).__name__ == "KeyError"
    assert str(e) == "'k'" and proxy.describe(e) == "KeyError: 'k'"
    e = proxy.rebuild_exception("UnicodeDecodeError", "bad byte")  # no 5-argument constructor ran
    assert isinstance(e, UnicodeDecodeError) and str(e) == "bad byte"
    e = proxy.rebuild_exception("print", "not an exception")  # a builtin, but not an exception
    assert type(e).__bases__ == (Exception,) and type(e).__name__ == "print"
    assert builtins.print is print  # nothing of the builtins was touched
    assert isinstance(proxy.rebuild_exception("SystemExit", "0"), SystemExit)


def test_describe():
    assert proxy.describe(ValueError()) == "ValueError"
    assert proxy.describe(ValueError("x" * 2000)).endswith("...") and len(proxy.describe(ValueError("x" * 2000))) == 1000

    class Unprintable(Exception):
        def __str__(self):
            raise RuntimeError

    assert proxy.describe(Unprintable()) == "Unprintable: <unprintable>"
