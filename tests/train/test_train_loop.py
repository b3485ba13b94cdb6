"""The shell: cadences, logging, the non-finite stop, stop signals, and the log of a resumed run."""

import json
import math
import os
import signal
from dataclasses import dataclass, replace

import pytest
import torch

from wmtp_fn.errors import Interrupted, NonFiniteError
from wmtp_fn.train.loop import LoopConfig, MetricsLog, fit


@dataclass(frozen=True)
class State:
    step: int
    params: float = 0.0
    consecutive_skips: int = 0  # as train.state.TrainState keeps it


def fake_step(losses, skipped=()):
    def step(state, micro_batches):
        s = state.step
        metrics = {"loss": torch.tensor(losses[s]), "n_tokens": torch.tensor(10.0),
                   "skipped": torch.tensor(1.0 if s in skipped else 0.0), "lr": torch.tensor(0.1)}
        run = state.consecutive_skips + 1 if s in skipped else 0
        return replace(state, step=s + 1, params=state.params + 1, consecutive_skips=run), metrics
    return step


def run(tmp_path, cfg, step_fn, next_batch=None, saves=None, evals=None, start=0):
    saves = [] if saves is None else saves
    evals = [] if evals is None else evals
    return fit(
        State(start, float(start)), start,
        step_fn=step_fn,
        next_batch=next_batch or (lambda c: ([c], c + 1)),
        evaluate=lambda st: evals.append(st.params) or {"val_loss": 1.0 / (1 + st.params)},
        save=lambda st, cur, info: saves.append((st.step, cur, info)),
        cfg=cfg,
        log=MetricsLog(tmp_path / "m.jsonl"),
    )


def test_cadences_and_log(tmp_path):
    saves, evals = [], []
    state, cursor, hist = run(tmp_path, LoopConfig(total_steps=6, log_every=2, eval_every=3, save_every=4),
                              fake_step([6, 5, 4, 3, 2, 1]), saves=saves, evals=evals)
    assert state.step == 6 and cursor == 6
    assert evals == [0.0, 3.0, 6.0]  # at the start, every 3 steps, and at the end
    assert [s[0] for s in saves] == [4, 6] and saves[-1][1] == 6
    assert hist.train_loss == [(2, 5.5), (4, 3.5), (6, 1.5)]
    assert hist.tokens == 60
    rows = [json.loads(x) for x in (tmp_path / "m.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == [2, 4, 6]
    assert [r["val_loss"] for r in rows if "val_loss" in r] == [1.0, 0.25, 1 / 7]


def test_skipped_steps_are_counted_and_excluded_from_the_loss(tmp_path):
    _, _, hist = run(tmp_path, LoopConfig(total_steps=4, log_every=4, eval_every=0, save_every=0),
                     fake_step([1.0, float("nan"), 3.0, 5.0], skipped={1}))
    assert hist.skipped == 1 and hist.train_loss == [(4, 3.0)]


def test_repeated_non_finite_steps_stop_the_run(tmp_path):
    cfg = LoopConfig(total_steps=20, log_every=1, eval_every=0, save_every=0, max_consecutive_skips=3)
    with pytest.raises(NonFiniteError, match="3 consecutive steps up to step 5"):
        run(tmp_path, cfg, fake_step([1.0] * 20, skipped={2, 3, 4}))


def test_bad_loop_config():
    with pytest.raises(ValueError, match="total_steps must be >= 1"):
        LoopConfig(total_steps=0)




def signalling(step_fn, at: int, signals):
    """`step_fn`, but the step that starts at `at` receives `signals` while it runs."""

    def step(state, mbs):
        if state.step == at:
            for s in signals:
                os.kill(os.getpid(), s)
        return step_fn(state, mbs)

    return step


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_a_stop_signal_finishes_the_step_saves_it_and_stops(tmp_path, signum):
    before = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    saves, steps = [], []
    inner = fake_step([1.0] * 10)

    def counted(state, mbs):
        steps.append(state.step)
        return inner(state, mbs)

    with pytest.raises(Interrupted) as info:
        run(tmp_path, LoopConfig(total_steps=10, eval_every=0, save_every=0), signalling(counted, 3, [signum]),
            saves=saves)
    assert steps == [0, 1, 2, 3]  # the signalled step ran to its end, no later one started
    assert [(s[0], s[1]) for s in saves] == [(4, 4)]  # state and cursor of the same step
    assert info.value.step == 4 and info.value.exit_code == 128 + signum
    assert str(info.value) == "interrupted at step 4; checkpoint written; rerun the same command to resume"
    assert {s: signal.getsignal(s) for s in before} == before  # the previous handlers are back
    rows = [json.loads(x) for x in (tmp_path / "m.jsonl").read_text().splitlines()]
    assert [(r["step"], r["loss"]) for r in rows if "loss" in r] == [(4, 1.0)]  # steps 1-4 not lost


def test_a_second_signal_aborts_at_once_without_saving(tmp_path):
    saves, after = [], []
    inner = fake_step([1.0] * 10)

    def step(state, mbs):
        if state.step == 3:
            os.kill(os.getpid(), signal.SIGINT)
            os.kill(os.getpid(), signal.SIGINT)
            after.append("the step went on")  # not reached: the second signal raises here
        return inner(state, mbs)

    with pytest.raises(Interrupted) as info:
        run(tmp_path, LoopConfig(total_steps=10, eval_every=0, save_every=0), step, saves=saves)
    assert info.value.step is None and info.value.exit_code == 130
    assert saves == [] and after == []


def test_a_stop_signal_right_after_a_save_does_not_save_again(tmp_path):
    saves = []
    with pytest.raises(Interrupted, match="at step 4"):
        run(tmp_path, LoopConfig(total_steps=10, eval_every=0, save_every=4),
            signalling(fake_step([1.0] * 10), 3, [signal.SIGTERM]), saves=saves)
    assert [s[0] for s in saves] == [4]


def test_vector_metrics_are_logged_per_component(tmp_path):
    inner = fake_step([2.0, 4.0])

    def step(state, mbs):
        new, metrics = inner(state, mbs)
        head_ce = torch.tensor([1.0, 3.0]) * (state.step + 1)  # [K = 2]
        return new, {**metrics, "head_ce": head_ce, "aux": torch.tensor(5.0)}

    _, _, hist = run(tmp_path, LoopConfig(total_steps=2, log_every=2, eval_every=0, save_every=0), step)
    row = [r for r in map(json.loads, (tmp_path / "m.jsonl").read_text().splitlines()) if "loss" in r][0]
    assert row["head_ce/0"] == 1.5 and row["head_ce/1"] == 4.5  # each component averaged over the steps
    assert row["aux"] == 5.0 and row["loss"] == 3.0 and "head_ce" not in row
    assert hist.train_loss == [(2, 3.0)]


def test_a_resumed_run_logs_no_row_twice_and_remembers_the_whole_run(tmp_path):
    cfg = LoopConfig(total_steps=8, log_every=2, eval_every=4, save_every=4)
    losses = [8.0, 7.0, 6.0, 5.0, 4.0, 3.0, 2.0, 1.0]
    run(tmp_path, cfg, fake_step(losses, skipped={1}))
    straight = (tmp_path / "m.jsonl").read_text()

    log = tmp_path / "m.jsonl"
    log.unlink()
    with pytest.raises(Interrupted):  # a first process logs up to step 6 (its checkpoints are dropped here)
        run(tmp_path, replace(cfg, save_every=0), signalling(fake_step(losses, skipped={1}), 5, [signal.SIGINT]))
    with log.open("a") as f:
        f.write('{"step": 7, "lo')  # and a row torn by a SIGKILL
    # resume from the checkpoint at step 4: rows of steps 5-6 are dropped, then written again
    _, _, hist = run(tmp_path, cfg, fake_step(losses, skipped={1}), start=4)
    rows = [json.loads(x) for x in log.read_text().splitlines()]
    steps = [r["step"] for r in rows]
    assert steps == sorted(steps) and len(steps) == len(set((r["step"], "loss" in r) for r in rows))
    strip = lambda rows: [{k: v for k, v in r.items() if k != "tokens_per_s"} for r in rows]
    assert strip(rows) == strip([json.loads(x) for x in straight.splitlines()])
    assert hist.val_loss[0] == (0, 1.0) and hist.val_loss[-1][0] == 8  # the whole run, from step 0
    assert [s for s, _ in hist.train_loss] == [2, 4, 6, 8] and hist.skipped == 1
    assert hist.start_step == 4 and hist.tokens == 40  # this process: steps 5-8


def test_a_run_restarting_at_step_zero_starts_a_fresh_log(tmp_path):
    cfg = LoopConfig(total_steps=2, log_every=1, eval_every=0, save_every=0)
    run(tmp_path, cfg, fake_step([1.0, 2.0]))
    run(tmp_path, cfg, fake_step([1.0, 2.0]))
    rows = [json.loads(x) for x in (tmp_path / "m.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [0, 1, 2, 2]  # val at 0, train at 1 and 2, val at the end
    assert not math.isnan(rows[1]["loss"])
