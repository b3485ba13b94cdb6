"""`torchrun --nproc_per_node=2 -m wmtp_fn` (gloo, CPU) trains like one process, and a run
checkpointed under 2 ranks resumes under 1 (and vice versa), continuing as the uninterrupted
run does: the cursor and the train state in a checkpoint are global, not per rank."""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import subprocess
import sys

import pytest
from safetensors.torch import load_file

from tests.adapters.helpers import rel_err
from tests.pipelines.tiny import ROOT, flags, tiny_config
from wmtp_fn.run import run_config

# Four steps of two micro-batches (one per rank under two), no dropout (its masks are seeded
# per rank), every step logged; the schedule's horizon is the full run's in every part. No
# record is skipped as too long (a step would lose a micro-batch and no longer split evenly).
RUN = {"train.steps": 4, "schedule.total_steps": 4, "train.log_every": 1, "train.eval_every": 0, "lora.dropout": 0.0,
       "data.max_length": 768, "data.too_long": "raise"}
TOL = 1e-5


def torchrun(out_dir, nproc: int, **overrides) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           "-m", "wmtp_fn", *flags(out_dir, **{**RUN, **overrides})]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done


def one_process(out_dir, **overrides) -> str:
    """Run in this process; returns what it printed."""
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        run_config(tiny_config(out_dir, **{**RUN, **overrides}))
    return printed.getvalue()


def tokens(printed: str) -> int:
    """The supervised tokens the summary line counts (every rank's, from where this part began):
    each micro-batch is trained on by exactly one rank."""
    (n,) = re.findall(r"done: .* ([\d,]+) tokens in", printed)
    return int(n.replace(",", ""))


def train_rows(out_dir) -> dict[int, dict]:
    rows = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in rows if "loss" in r]
    assert len({r["step"] for r in train}) == len(train)  # one writer: no step logged twice
    return {r["step"]: r for r in train}


def adapter(out_dir):
    return load_file(out_dir / "adapter" / "params.safetensors")


def assert_same_run(got_dir, want_dir):
    got, want = train_rows(got_dir), train_rows(want_dir)
    assert sorted(got) == sorted(want) == [1, 2, 3, 4]
    for step in want:
        for key in ("loss", "grad_norm"):
            assert abs(got[step][key] - want[step][key]) <= TOL * abs(want[step][key]), (step, key)
    a, b = adapter(got_dir), adapter(want_dir)
    assert a.keys() == b.keys()
    for k in b:
        assert rel_err(a[k], b[k]) <= TOL, k


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    out = tmp_path_factory.mktemp("one") / "run"
    return out, tokens(one_process(out))


def test_two_ranks_then_one_continue_the_uninterrupted_run(tmp_path, uninterrupted):
    want_dir, want_tokens = uninterrupted
    out = tmp_path / "run"
    done = torchrun(out, 2, **{"train.steps": 2})
    assert done.stdout.count("ref_tuning done") == 1  # rank 0 alone prints
    assert (out / "checkpoints").is_dir() and sorted(train_rows(out)) == [1, 2]
    rest = one_process(out)  # resumes from the 2-rank checkpoint
    assert "resuming" in rest
    assert tokens(done.stdout) + tokens(rest) == want_tokens
    assert_same_run(out, want_dir)


def test_one_rank_then_two_continue_the_uninterrupted_run(tmp_path, uninterrupted):
    want_dir, want_tokens = uninterrupted
    out = tmp_path / "run"
    first = one_process(out, **{"train.steps": 2})
    done = torchrun(out, 2)
    assert "resuming" in done.stdout and "2 ranks" in done.stdout
    assert tokens(first) + tokens(done.stdout) == want_tokens
    assert_same_run(out, want_dir)
