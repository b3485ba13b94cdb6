"""ref_tuning end to end on the embedded default (tiny Llama, bundled HumanEval data, CPU)."""

import json
import shutil
from pathlib import Path

import pytest
import torch

from wmtp_fn import checkpoint
from wmtp_fn.adapters import install_slots, to_flat
from wmtp_fn.adapters.seeds_io import read_seed_checkpoint
from wmtp_fn.atomic import atomic_write_text
from wmtp_fn.errors import ConfigError
from wmtp_fn.models.base import load_base
from tests.pipelines.experiment import experiment
from wmtp_fn.run import run_config

ROOT = Path(__file__).resolve().parents[2]


def config(out_dir, **overrides):
    return experiment("ref_tuning", out_dir, **{"train.log_every": 2, **overrides})


def test_embedded_ref_tuning_lowers_validation_loss_and_writes_the_adapter(tmp_path):
    result = run_config(config(tmp_path, **{"train.steps": 40, "train.eval_every": 0, "train.save_every": 0,
                                           "optim.lr": 5e-3, "lora.rank": 8, "data.val_n_samples": 8}))
    assert result.steps == 40
    assert result.final_val_loss < result.first_val_loss - 0.3, (result.first_val_loss, result.final_val_loss)

    base = load_base(tmp_path / "base")
    install_slots(base)
    adapter, spec = checkpoint.load_adapter(result.adapter_dir, "lora", base)  # strict: keys, shapes, base
    assert spec.rank == 8 and spec.base_fingerprint is not None
    seed = read_seed_checkpoint(tmp_path / "adapter.hf_lora.pt", base)
    for k, v in to_flat(adapter).items():
        assert torch.equal(to_flat(seed.adapter)[k], v)
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines if "val_loss" in x] == [0, 40]
    assert all(x["loss"] > 0 and x["tokens_per_s"] > 0 for x in lines if "loss" in x)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["train.steps"] == 40 and saved["optim.lr"] == 5e-3


def test_resume_after_three_steps_is_bitwise_identical_and_logs_every_step_once(tmp_path, capsys):
    overrides = {"train.steps": 6, "train.save_every": 3, "train.eval_every": 2, "train.log_every": 1,
                 "train.batch_size": 4, "train.micro_batch_size": 2, "data.val_n_samples": 4}
    straight = run_config(config(tmp_path / "straight", **overrides))

    interrupted = tmp_path / "interrupted"
    run_config(config(interrupted, **overrides))
    ckpts = interrupted / "checkpoints"
    shutil.rmtree(ckpts / "step_00000006")  # as if the run had died after step 3's checkpoint
    atomic_write_text(ckpts / "latest", "step_00000003\n")
    shutil.rmtree(interrupted / "adapter")
    capsys.readouterr()
    resumed = run_config(config(interrupted, **overrides))

    # metrics.jsonl: the rows of steps 4-6 of the dead run are gone, those of the rerun are there once
    strip = lambda p: [{k: v for k, v in json.loads(x).items() if k != "tokens_per_s"} for x in p.read_text().splitlines()]
    rows = strip(interrupted / "metrics.jsonl")
    assert rows == strip(tmp_path / "straight" / "metrics.jsonl")
    assert [r["step"] for r in rows if "val_loss" in r] == [0, 2, 4, 6]
    # the summary covers the whole run: the first validation loss is step 0's, read back
    assert resumed.first_val_loss == straight.first_val_loss == rows[0]["val_loss"]
    assert f"val_loss {straight.first_val_loss:.4f} -> {straight.final_val_loss:.4f}" in capsys.readouterr().out

    a, _ = checkpoint.read_checkpoint(checkpoint.latest(tmp_path / "straight" / "checkpoints"))
    b, meta = checkpoint.read_checkpoint(checkpoint.latest(ckpts))
    assert meta["state"]["step"] == 6 and meta["cursor"]["position"] > 0
    for group in ("params", "state"):
        assert a[group].keys() == b[group].keys()
        for k in a[group]:
            assert torch.equal(a[group][k], b[group][k]), (group, k)


def test_a_finished_run_is_not_trained_again(tmp_path, capsys):
    overrides = {"train.steps": 2, "train.eval_every": 0, "data.val_n_samples": 2}
    first = run_config(config(tmp_path, **overrides))
    mtime = (first.adapter_dir / "params.safetensors").stat().st_mtime_ns
    again = run_config(config(tmp_path, **overrides))
    assert "is already complete (2/2 steps" in capsys.readouterr().out
    assert again.steps == 2 and again.final_val_loss == first.final_val_loss
    assert (first.adapter_dir / "params.safetensors").stat().st_mtime_ns == mtime


def test_changed_config_refuses_to_resume(tmp_path):
    run_config(config(tmp_path, **{"train.steps": 2, "train.eval_every": 0, "lora.rank": 8, "data.val_n_samples": 2}))
    with pytest.raises(ConfigError, match=r"another config \(lora.rank: 8 -> 4\)"):
        run_config(config(tmp_path, **{"train.steps": 2, "lora.rank": 4, "data.val_n_samples": 2}))
    with pytest.raises(ConfigError, match="already holds a run"):
        run_config(config(tmp_path, **{"train.steps": 2, "train.resume": "never", "lora.rank": 8, "data.val_n_samples": 2}))


def test_unknown_pipeline_is_an_error(tmp_path):
    cfg = config(tmp_path)
    with cfg.unlocked():
        cfg.pipeline = "nope"
    with pytest.raises(ConfigError, match=r"config.pipeline is 'nope'; expected one of \(.*'baseline'.*'ref_tuning'.*\)"):
        run_config(cfg)


def test_a_finished_run_that_died_before_exporting_exports_on_rerun(tmp_path):
    overrides = {"train.steps": 2, "train.eval_every": 0, "data.val_n_samples": 2}
    first = run_config(config(tmp_path, **overrides))
    shutil.rmtree(first.adapter_dir)
    (tmp_path / "adapter.hf_lora.pt").unlink()
    run_config(config(tmp_path, **overrides))
    params, _, meta = checkpoint.load_params(first.adapter_dir)
    assert meta["step"] == 2 and (tmp_path / "adapter.hf_lora.pt").is_file()
    trained, _ = checkpoint.read_checkpoint(checkpoint.latest(tmp_path / "checkpoints"))
    for k, v in trained["params"].items():
        assert torch.equal(to_flat(params)[k], v)


def test_training_further_keeps_the_schedule_horizon(tmp_path):
    base = {"train.eval_every": 0, "data.val_n_samples": 2, "schedule.warmup_steps": 0}
    run_config(config(tmp_path, **{"train.steps": 2, **base}))
    with pytest.raises(ConfigError, match=r"horizon from step 2 to 4 mid-run.*--config.schedule.total_steps=2"):
        run_config(config(tmp_path, **{"train.steps": 4, **base}))
    result = run_config(config(tmp_path, **{"train.steps": 4, "schedule.total_steps": 2, **base}))
    assert result.steps == 4
    rows = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    lr = {r["step"]: r["lr"] for r in rows if "lr" in r}
    assert lr[4] == pytest.approx(5e-3 * 0.1)  # past the horizon: the final rate, not a new decay
