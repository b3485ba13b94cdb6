"""The loop shell's edges (surviving mutants of ``train.loop``): the metrics file's layout and
its rewind, throughput against a fake clock, metrics a step does not report, the interval
record key by key, the info given to ``save``, the progress bar and the validation lines, and
the non-finite stop's message in full."""

import json
import math
import re
import signal
from dataclasses import replace
from types import SimpleNamespace

import pytest
import torch

import wmtp_fn.train.loop as loop
from wmtp_fn.errors import CheckpointError, Interrupted, NonFiniteError
from wmtp_fn.train.loop import LoopConfig, MetricsLog, NullLog, fit
from tests.train.test_train_loop import State, fake_step, run, signalling


def rows_of(path):
    return [json.loads(x) for x in path.read_text().splitlines()]


def fake_clock(monkeypatch, tick=0.5, start=10.0):
    """`loop.time.perf_counter` returns start, start + tick, start + 2·tick, … (one tick per call)."""
    calls = []

    def perf_counter():
        calls.append(None)
        return start + (len(calls) - 1) * tick

    monkeypatch.setattr(loop, "time", SimpleNamespace(perf_counter=perf_counter))
    return calls


# ---------------------------------------------------------------- the metrics file


def test_the_log_makes_missing_parent_directories_and_writes_sorted_keys(tmp_path):
    path = tmp_path / "a" / "b" / "m.jsonl"
    log = MetricsLog(path)
    assert path.parent.is_dir()
    log.write({"step": 1, "b": 2.5, "a": 1})
    log.write({"z": 0, "step": 2})
    assert path.read_text() == '{"a": 1, "b": 2.5, "step": 1}\n{"step": 2, "z": 0}\n'


def test_rewind_names_a_torn_line_before_the_last_by_its_number(tmp_path):
    path = tmp_path / "m.jsonl"
    path.write_text('{"step": 0}\n{"step": 1, "lo\n{"step": 2}\n')
    with pytest.raises(CheckpointError, match=f"^{re.escape(f'{path}:2: not a JSON metrics row')}$"):
        MetricsLog(path).rewind(2)


def test_rewind_to_step_one_keeps_rows_up_to_it_and_rewrites_them_with_sorted_keys(tmp_path):
    path = tmp_path / "m.jsonl"
    path.write_text('{"step": 0, "val_loss": 2.0}\n{"step": 1, "loss": 1.5}\n{"step": 2, "loss": 1.0}\n')
    kept = MetricsLog(path).rewind(1)
    assert kept == [{"step": 0, "val_loss": 2.0}, {"step": 1, "loss": 1.5}]
    assert path.read_text() == '{"step": 0, "val_loss": 2.0}\n{"loss": 1.5, "step": 1}\n'
    assert MetricsLog(path).rewind(0) == [] and path.read_text() == ""  # step 0 starts afresh


def test_the_null_log_keeps_nothing(tmp_path):
    log = NullLog()
    log.write({"step": 1, "loss": 1.0})
    assert log.rewind(5) == [] and list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------- what a row holds


def test_throughput_and_seconds_against_a_fake_clock(tmp_path, monkeypatch):
    calls = fake_clock(monkeypatch, tick=0.5)
    _, _, hist = run(tmp_path, LoopConfig(total_steps=4, log_every=2, eval_every=0, save_every=0),
                     fake_step([1.0] * 4))
    rows = [r for r in rows_of(tmp_path / "m.jsonl") if "loss" in r]
    # clock: start 10; rows at 10.5 and 11.0 (20 tokens in 0.5 s each); the end at 11.5
    assert [r["tokens_per_s"] for r in rows] == [40.0, 40.0]
    assert len(calls) == 4 and hist.seconds == 1.5


def test_the_row_flushed_by_a_stop_signal_times_its_own_interval(tmp_path, monkeypatch):
    fake_clock(monkeypatch, tick=0.25)
    with pytest.raises(Interrupted):
        run(tmp_path, LoopConfig(total_steps=10, log_every=2, eval_every=0, save_every=0),
            signalling(fake_step([1.0] * 10), 2, [signal.SIGINT]))
    rows = [r for r in rows_of(tmp_path / "m.jsonl") if "loss" in r]
    # clock: start 10, the row of steps 1-2 at 10.25 (80 tok/s), the stop's row of step 3 at 10.5
    assert [(r["step"], r["tokens_per_s"]) for r in rows] == [(2, 80.0), (3, 40.0)]


def test_a_step_without_token_or_skip_metrics_counts_none(tmp_path):
    def step(state, mbs):
        return replace(state, step=state.step + 1), {"loss": torch.tensor(float(state.step))}

    _, _, hist = run(tmp_path, LoopConfig(total_steps=2, log_every=2, eval_every=0, save_every=0), step)
    (row,) = [r for r in rows_of(tmp_path / "m.jsonl") if "loss" in r]
    assert row == {"step": 2, "tokens_per_s": 0.0, "loss": 0.5}  # no step was skipped
    assert hist.tokens == 0 and hist.skipped == 0 and hist.train_loss == [(2, 0.5)]


def test_a_skip_flag_reported_by_some_steps_only_is_summed_over_those(tmp_path):
    def step(state, mbs):
        metrics = {"loss": torch.tensor([5.0, 1.0, 3.0][state.step]), "n_tokens": torch.tensor(4.0)}
        if state.step == 0:
            metrics["skipped"] = torch.tensor(1.0)
        return replace(state, step=state.step + 1), metrics

    _, _, hist = run(tmp_path, LoopConfig(total_steps=3, log_every=3, eval_every=0, save_every=0), step)
    (row,) = [r for r in rows_of(tmp_path / "m.jsonl") if "loss" in r]
    assert row["skipped"] == 1.0 and row["loss"] == 2.0 and hist.skipped == 1


def test_the_interval_record_key_by_key_lr_and_grad_norm_from_its_last_step(tmp_path):
    def step(state, mbs):
        s = state.step
        metrics = {"loss": torch.tensor(float(s)), "n_tokens": torch.tensor(10.0), "skipped": torch.tensor(0.0),
                   "lr": torch.tensor(0.5 * (s + 1)), "grad_norm": torch.tensor(2.0 ** s)}
        return replace(state, step=s + 1), metrics

    run(tmp_path, LoopConfig(total_steps=3, log_every=3, eval_every=0, save_every=0), step)
    (row,) = [r for r in rows_of(tmp_path / "m.jsonl") if "loss" in r]
    assert set(row) == {"step", "tokens_per_s", "loss", "skipped", "lr", "grad_norm"}  # n_tokens is in tokens_per_s
    assert (row["loss"], row["skipped"], row["lr"], row["grad_norm"]) == (1.0, 0.0, 1.5, 4.0)


def test_a_resumed_run_counts_the_skips_of_earlier_rows_also_without_a_skip_key(tmp_path):
    path = tmp_path / "m.jsonl"
    path.write_text('{"step": 1, "loss": 2.0}\n{"step": 2, "loss": 1.0, "skipped": 1}\n{"step": 2, "val_loss": 3.0}\n')
    _, _, hist = run(tmp_path, LoopConfig(total_steps=3, log_every=1, eval_every=0, save_every=0),
                     fake_step([1.0] * 3), start=2)
    assert hist.skipped == 1 and hist.train_loss[:2] == [(1, 2.0), (2, 1.0)] and hist.val_loss[0] == (2, 3.0)


def test_save_gets_the_last_train_and_validation_losses(tmp_path):
    saves = []
    run(tmp_path, LoopConfig(total_steps=6, log_every=2, eval_every=3, save_every=1), fake_step([6, 5, 4, 3, 2, 1]),
        saves=saves)
    info = {step: i for step, _, i in saves}
    assert info[1] == {"train_loss": None, "val_loss": 1.0}  # before any row: the start's validation
    assert info[4] == {"train_loss": 3.5, "val_loss": 0.25}  # the row of step 4, the validation at step 3
    assert info[6] == {"train_loss": 1.5, "val_loss": 1 / 7}


def test_save_before_any_row_or_validation_gets_none_and_a_stop_save_gets_the_info(tmp_path):
    saves = []
    fit(State(0), 0, step_fn=fake_step([2.0, 4.0]), next_batch=lambda c: ([c], c + 1), evaluate=None,
        save=lambda st, cur, info: saves.append((st.step, info)),
        cfg=LoopConfig(total_steps=2, log_every=2, eval_every=0, save_every=1), log=MetricsLog(tmp_path / "m.jsonl"))
    assert saves == [(1, {"train_loss": None, "val_loss": None}), (2, {"train_loss": 3.0, "val_loss": None})]
    saves.clear()
    with pytest.raises(Interrupted):
        run(tmp_path, LoopConfig(total_steps=10, log_every=1, eval_every=0, save_every=0),
            signalling(fake_step([1.0] * 10), 1, [signal.SIGTERM]), saves=saves)
    assert [(s, i) for s, _, i in saves] == [(2, {"train_loss": 1.0, "val_loss": 1.0})]


def test_step_fn_gets_the_micro_batches_next_batch_made(tmp_path):
    seen = []

    def step(state, mbs):
        seen.append(mbs)
        return fake_step([1.0] * 3)(state, mbs)

    run(tmp_path, LoopConfig(total_steps=3, eval_every=0, save_every=0), step, next_batch=lambda c: ([c, -c], c + 1))
    assert seen == [[0, 0], [1, -1], [2, -2]]


def test_the_non_finite_stop_message_in_full(tmp_path):
    cfg = LoopConfig(total_steps=5, log_every=1, eval_every=0, save_every=0, max_consecutive_skips=2)
    message = ("2 consecutive steps up to step 3 had a non-finite loss or gradient and were skipped; stopping "
               "(lower the learning rate or check the data)")
    with pytest.raises(NonFiniteError, match=f"^{re.escape(message)}$"):
        run(tmp_path, cfg, fake_step([1.0] * 5, skipped={1, 2}))


# ---------------------------------------------------------------- what the user sees


def test_the_progress_bar_and_the_validation_lines(tmp_path, capsys, monkeypatch):
    fake_clock(monkeypatch, tick=0.5)
    run(tmp_path, LoopConfig(total_steps=4, log_every=2, eval_every=0, save_every=0), fake_step([2.0, 1.0, 4.0, 3.0]))
    out, err = capsys.readouterr()
    assert out.splitlines() == ["step 0: val_loss=1.0000", "step 4: val_loss=0.2000"]
    last = err.split("\r")[-1]
    assert last.startswith("train: 100%") and " 4/4 " in last
    assert "loss=3.5000" in last and "tok_s=40" in last  # the last row's postfix


def test_the_bar_of_a_resumed_run_starts_at_its_step(tmp_path, capsys):
    run(tmp_path, LoopConfig(total_steps=6, log_every=2, eval_every=0, save_every=0), fake_step([1.0] * 6), start=4)
    last = capsys.readouterr().err.split("\r")[-1]
    assert " 6/6 " in last and "train: 100%" in last


def test_several_validation_metrics_are_one_line(tmp_path, capsys):
    fit(State(0), 0, step_fn=fake_step([1.0]), next_batch=lambda c: ([c], c + 1),
        evaluate=lambda st: {"val_loss": 0.5, "val_acc": 0.25}, save=lambda *a: None,
        cfg=LoopConfig(total_steps=1), log=MetricsLog(tmp_path / "m.jsonl"), desc="ntp")
    out, err = capsys.readouterr()
    assert out.splitlines() == [f"step {s}: val_loss=0.5000, val_acc=0.2500" for s in (0, 1)]
    assert err.split("\r")[-1].startswith("ntp: 100%")


def test_quiet_shows_neither_bar_nor_validation_lines(tmp_path, capsys):
    evals = []
    fit(State(0), 0, step_fn=fake_step([1.0] * 4), next_batch=lambda c: ([c], c + 1),
        evaluate=lambda st: evals.append(st.step) or {"val_loss": 1.0}, save=lambda *a: None,
        cfg=LoopConfig(total_steps=4, log_every=2, eval_every=2), log=MetricsLog(tmp_path / "m.jsonl"), quiet=True)
    assert capsys.readouterr() == ("", "") and evals == [0, 2, 4]
    assert not math.isnan(rows_of(tmp_path / "m.jsonl")[1]["loss"])  # the rows are still written
