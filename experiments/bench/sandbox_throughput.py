"""Sandbox throughput: trivial programs, ``--workers`` runs at a time, both modes.

    python experiments/bench/sandbox_throughput.py [--runs 400] [--workers 2] [--no-cgroup]

Prints runs/s (wall clock) and the CPU time per run (the host's own plus its children's,
from ``os.times``): on a shared machine wall-clock numbers depend on the neighbours, while
``2 / (CPU s per run)`` is what two otherwise idle cores would sustain. Imports only the
sandbox (no torch), so it runs with any Python >= 3.10 from the repository root.
"""

import argparse
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
for name, path in (("wmtp_fn", "wmtp_fn"), ("wmtp_fn.sandbox", "wmtp_fn/sandbox")):
    module = type(sys)(name)
    module.__path__ = [os.path.join(REPO, path)]
    sys.modules[name] = module

from wmtp_fn.sandbox.host import isolation_problem, run_function_tests, run_program  # noqa: E402

MODES = {
    "in-process": lambda: run_program("x = 1\n"),
    "proxy": lambda: run_function_tests("def f(x):\n    return x\n", "f", "assert f(1) == 1\n"),
}


def measure(run, runs: int, workers: int) -> dict:
    run()  # warm: the probe, the compiled driver, the interpreter's layout
    start, before = time.monotonic(), os.times()
    with ThreadPoolExecutor(workers) as pool:
        results = list(pool.map(lambda _: run(), range(runs)))
    wall, after = time.monotonic() - start, os.times()
    cpu = sum(getattr(after, k) - getattr(before, k)
              for k in ("user", "system", "children_user", "children_system"))
    bad = [r for r in results if r.status != "passed"]
    if bad:
        raise SystemExit(f"{len(bad)} runs did not pass, e.g. {bad[0]}")
    return {"runs_per_s": runs / wall, "cpu_ms_per_run": 1000 * cpu / runs}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=400)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--no-cgroup", action="store_true",
                        help="as root, without the per-run memory cgroup (to see what it costs)")
    args = parser.parse_args()
    if args.no_cgroup:
        from wmtp_fn.sandbox import cgroup

        cgroup.memory_cgroup_parent = lambda: None
    problem = isolation_problem()
    if problem is not None:
        raise SystemExit(f"no kernel isolation here: {problem}")
    print(f"cores available: {len(os.sched_getaffinity(0))}, load average: {os.getloadavg()[0]:.2f}, "
          f"{'root' if os.geteuid() == 0 else 'not root'}")
    for name, run in MODES.items():
        m = measure(run, args.runs, args.workers)
        print(f"{name:10s} {m['runs_per_s']:6.1f} runs/s with {args.workers} workers; "
              f"{m['cpu_ms_per_run']:5.1f} ms CPU per run (2 idle cores: {2000 / m['cpu_ms_per_run']:.0f} runs/s)")


if __name__ == "__main__":
    main()
