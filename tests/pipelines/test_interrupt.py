"""Ctrl-C / SIGTERM through the real entry point: the step in flight finishes, its checkpoint is
written, one line is printed, the exit status is 128 + the signal; the rerun resumes bitwise."""

import json
import os
import signal
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors.torch import load_file

from tests.pipelines.tiny import ROOT, flags
from wmtp_fn import checkpoint

# Runs `python -m wmtp_fn ARGS` with the train loop's step wrapped so that the step starting at
# SIGNAL_AT sends the signal to its own process while it runs (a deterministic "Ctrl-C mid-step";
# -1: never). Every run of the test goes through it with one thread: a BLAS allowed to pick its
# thread count by the machine's load (MKL_DYNAMIC) reduces in another order under load, and
# "bitwise" would then compare two runs that rounded differently.
DRIVER = textwrap.dedent("""
    import os, runpy, sys, torch
    import wmtp_fn.train.loop as loop
    signum, at, *args = sys.argv[1:]
    torch.set_num_threads(1)
    real_fit = loop.fit
    def fit(state, cursor, *, step_fn, **kw):
        def step(st, mbs):
            if st.step == int(at):
                os.kill(os.getpid(), int(signum))
            return step_fn(st, mbs)
        return real_fit(state, cursor, step_fn=step, **kw)
    loop.fit = fit
    sys.argv = ["wmtp_fn", *args]
    runpy.run_module("wmtp_fn", run_name="__main__")
""")


def run_cli(args: list[str], signum: int = 0, at: int = -1) -> subprocess.CompletedProcess:
    env = {**os.environ, "MKL_DYNAMIC": "FALSE", "OMP_DYNAMIC": "FALSE", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-c", DRIVER, str(signum), str(at), *args],
                          cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    out = tmp_path_factory.mktemp("straight")
    proc = run_cli(flags(out))
    assert proc.returncode == 0, proc.stderr
    return out


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_a_signal_mid_step_saves_that_step_and_the_rerun_resumes_bitwise(straight, tmp_path, signum):
    args = flags(tmp_path)
    proc = run_cli(args, int(signum), 3)
    assert proc.returncode == 128 + signum, proc.stderr
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == (
        "interrupted at step 4; checkpoint written; rerun the same command to resume"
    )
    found = checkpoint.latest(tmp_path / "checkpoints")
    assert found.name == "step_00000004"  # save_every=0: only the interrupt saved
    assert not (tmp_path / "adapter").exists()

    rerun = run_cli(args)  # the same command again resumes and finishes
    assert rerun.returncode == 0, rerun.stderr
    assert "resuming" in rerun.stdout
    a = load_file(straight / "adapter" / "params.safetensors")
    b = load_file(tmp_path / "adapter" / "params.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    strip = lambda p: [{k: v for k, v in json.loads(x).items() if k != "tokens_per_s"} for x in p.read_text().splitlines()]
    assert strip(tmp_path / "metrics.jsonl") == strip(straight / "metrics.jsonl")  # no row twice, none lost
