"""baseline end to end on the embedded default: the tiny Llama turned into an MTP base."""

import json

import torch

from wmtp_fn import checkpoint
from wmtp_fn.adapters import install_slots, to_flat
from wmtp_fn.models.base import load_base
from wmtp_fn.models.meta import read_seeds_policy
from wmtp_fn.models.mtp import mtp_from_llama
from tests.pipelines.experiment import experiment
from wmtp_fn.run import run_config



def config(out_dir, **overrides):
    return experiment("baseline", out_dir, **overrides)


def test_baseline_lowers_validation_loss_logs_every_head_and_reloads(tmp_path):
    result = run_config(config(tmp_path, **{
        "train.steps": 30, "train.eval_every": 0, "train.save_every": 0, "train.log_every": 5,
        "data.n_samples": 64, "data.val_n_samples": 6, "lora.rank": 8,
    }))
    assert result.steps == 30
    assert result.final_val_loss < result.first_val_loss - 0.2, (result.first_val_loss, result.final_val_loss)
    rows = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in rows if "loss" in r]
    assert all({"ce/0", "ce/1", "ce/2"} <= set(r) for r in train)
    val = [r for r in rows if "val_loss" in r]
    assert {"val_ce/0", "val_ce/1", "val_ce/2"} <= set(val[-1])
    assert val[-1]["val_ce/2"] > val[-1]["val_ce/0"] - 1.0  # every head is evaluated, head by head

    mtp = mtp_from_llama(load_base(tmp_path / "base"), 3)  # the same base, rebuilt
    install_slots(mtp)
    adapter, spec = checkpoint.load_adapter(result.adapter_dir, "policy", mtp)  # strict: keys, shapes, base
    flat, seeds_spec, _ = read_seeds_policy(tmp_path / "adapter.seeds_lora.pt", mtp.config)
    assert seeds_spec.targets == spec.targets
    for k, v in to_flat(adapter).items():
        assert torch.equal(flat[k], v), k
