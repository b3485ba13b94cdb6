"""The shell: cadences, logging, the non-finite stop, and saving on Ctrl-C only between steps."""

import json
from dataclasses import dataclass, replace

import pytest
import torch

from wmtp_fn.train.loop import LoopConfig, MetricsLog, fit


@dataclass(frozen=True)
class State:
    step: int
    params: float = 0.0


def fake_step(losses, skipped=()):
    def step(state, micro_batches):
        s = state.step
        metrics = {"loss": torch.tensor(losses[s]), "n_tokens": torch.tensor(10.0),
                   "skipped": torch.tensor(1.0 if s in skipped else 0.0), "lr": torch.tensor(0.1)}
        return replace(state, step=s + 1, params=state.params + 1), metrics
    return step


def run(tmp_path, cfg, step_fn, next_batch=None, saves=None, evals=None):
    saves = [] if saves is None else saves
    evals = [] if evals is None else evals
    return fit(
        State(0), 0,
        step_fn=step_fn,
        next_batch=next_batch or (lambda c: ([c], c + 1)),
        evaluate=lambda params: evals.append(params) or {"val_loss": 1.0 / (1 + params)},
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
    with pytest.raises(FloatingPointError, match="3 consecutive steps up to step 5"):
        run(tmp_path, cfg, fake_step([1.0] * 20, skipped={2, 3, 4}))


def test_ctrl_c_between_steps_saves_the_last_completed_step(tmp_path):
    def next_batch(c):
        if c == 3:
            raise KeyboardInterrupt
        return [c], c + 1

    saves = []
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path, LoopConfig(total_steps=10, eval_every=0, save_every=0), fake_step([1.0] * 10),
            next_batch=next_batch, saves=saves)
    assert [(s[0], s[1]) for s in saves] == [(3, 3)]  # state and cursor of the same step


def test_ctrl_c_inside_a_step_keeps_the_last_checkpoint(tmp_path):
    inner = fake_step([1.0] * 10)

    def step(state, mbs):
        if state.step == 2:
            raise KeyboardInterrupt  # the optimizer may have updated buffers in place: not saved
        return inner(state, mbs)

    saves = []
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path, LoopConfig(total_steps=10, eval_every=0, save_every=0), step, saves=saves)
    assert saves == []


def test_bad_loop_config():
    with pytest.raises(ValueError, match="total_steps must be >= 1"):
        LoopConfig(total_steps=0)


def test_ctrl_c_right_after_a_save_does_not_save_again(tmp_path):
    def next_batch(c):
        if c == 4:
            raise KeyboardInterrupt
        return [c], c + 1

    saves = []
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path, LoopConfig(total_steps=10, eval_every=0, save_every=4), fake_step([1.0] * 10),
            next_batch=next_batch, saves=saves)
    assert [s[0] for s in saves] == [4]
