"""ref_tuning and baseline on an NF4 base (`base.quantize="nf4"`): the tiny embedded Llama on
the CPU. The adapter trained on the 4-bit base reloads, strictly, onto the full-precision base
it was quantised from (the same fingerprint, `quant` recorded beside it)."""

import json

import pytest

pytest.importorskip("bitsandbytes")

from wmtp_fn import checkpoint  # noqa: E402
from wmtp_fn.adapters import install_slots  # noqa: E402
from wmtp_fn.errors import ConfigError  # noqa: E402
from wmtp_fn.models.base import load_base  # noqa: E402
from wmtp_fn.models.mtp import mtp_from_llama  # noqa: E402
from wmtp_fn.run import run_config  # noqa: E402
from tests.pipelines.experiment import experiment  # noqa: E402


def test_ref_tuning_on_an_nf4_base_lowers_the_loss_and_reloads_on_the_dense_base(tmp_path):
    result = run_config(experiment("ref_tuning", tmp_path, **{
        "base.quantize": "nf4", "base.tiny_hidden_size": 64, "base.tiny_layers": 1, "train.steps": 10,
        "train.eval_every": 0, "train.save_every": 0, "train.log_every": 5, "optim.lr": 2e-2, "lora.rank": 8,
        "data.n_samples": 32, "data.val_n_samples": 4, "data.max_length": 320, "data.too_long": "skip",
    }))
    assert result.final_val_loss < result.first_val_loss - 0.1, (result.first_val_loss, result.final_val_loss)
    dense = load_base(tmp_path / "base")
    install_slots(dense)
    adapter, spec = checkpoint.load_adapter(result.adapter_dir, "lora", dense)  # strict: keys, shapes, base
    assert spec.base_fingerprint["quant"] == "nf4"


def test_baseline_on_an_nf4_mtp_base_trains_every_head_and_reloads_on_the_dense_base(tmp_path):
    result = run_config(experiment("baseline", tmp_path, **{
        "base.quantize": "nf4", "base.tiny_hidden_size": 64, "base.tiny_layers": 1, "train.steps": 10,
        "train.eval_every": 0, "train.save_every": 0, "train.log_every": 5, "lora.rank": 8, "optim.lr": 2e-2,
        "data.n_samples": 32, "data.val_n_samples": 4,
    }))
    assert result.final_val_loss < result.first_val_loss - 0.1, (result.first_val_loss, result.final_val_loss)
    rows = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert all({"ce/0", "ce/1", "ce/2"} <= set(r) for r in rows if "loss" in r)
    mtp = mtp_from_llama(load_base(tmp_path / "base"), 3)
    install_slots(mtp)
    _, spec = checkpoint.load_adapter(result.adapter_dir, "policy", mtp)
    assert spec.base_fingerprint["quant"] == "nf4"


def test_an_unknown_quantisation_is_refused_naming_the_key(tmp_path):
    with pytest.raises(ConfigError, match=r"base.quantize: .int3. is not a quantisation"):
        run_config(experiment("ref_tuning", tmp_path, **{"base.quantize": "int3", "base.tiny_hidden_size": 64,
                                                         "base.tiny_layers": 1, "data.n_samples": 8}))
    assert not (tmp_path / "config.json").exists()  # refused before the run directory is written
