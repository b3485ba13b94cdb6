"""rho1 end to end on the embedded default: a ref_tuning run, then rho1 with its adapter as the
reference, on the tiny Llama turned into an MTP base."""

import json
import math
from collections import Counter
from fractions import Fraction

import pytest
import torch
from tensordict import TensorDict
from transformers import LlamaConfig

from wmtp_fn import checkpoint
from wmtp_fn.adapters import to_flat
from wmtp_fn.data.embedded import embedded_tokenizer_path
from wmtp_fn.errors import CheckpointError, ConfigError
from wmtp_fn.models.base import build_base, load_base
from wmtp_fn.models.mtp import mtp_from_llama, save_mtp
from wmtp_fn.pipelines.rho1 import open_rho1
from wmtp_fn.run import run_config
from tests.pipelines.experiment import experiment
from tests.pipelines.tiny import TINY

H = 3  # mtp.n_future of experiments/rho1.py


def config(name, out_dir, **overrides):
    return experiment(name, out_dir, **{**TINY, **overrides})


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """A ref_tuning run directory: the reference adapter, on the embedded tiny Llama."""
    out = tmp_path_factory.mktemp("ref_tuning")
    run_config(config("ref_tuning", out, **{"train.steps": 20, "train.eval_every": 0, "export.peft": True}))
    return out


def rows(out_dir):
    return [json.loads(x) for x in (out_dir / "metrics.jsonl").read_text().splitlines()]


def test_rho1_lowers_validation_loss_logs_the_selection_and_uses_the_trained_reference(reference, tmp_path):
    result = run_config(config("rho1", tmp_path, **{"rho1.reference": str(reference), "train.steps": 30,
                                                    "train.eval_every": 0, "data.n_samples": 64}))
    assert result.steps == 30
    train = [r for r in rows(tmp_path) if "loss" in r]
    val = [r for r in rows(tmp_path) if "val_loss" in r]
    first, last = val[0], val[-1]
    # the trained loss (mask-normalised) and the unweighted CE of every head both go down
    assert result.final_val_loss < result.first_val_loss - 0.05, (result.first_val_loss, result.final_val_loss)
    for k in range(H):
        assert last[f"val_ce/{k}"] < first[f"val_ce/{k}"] - 0.05, k
    # per-head selection: ratios are ceil(0.7 N) / N per micro-batch, thresholds are excesses
    for r in train:
        for k in range(H):
            assert 0.7 <= r[f"ratio/{k}"] < 0.75 and abs(r[f"threshold/{k}"]) < 5.0, (r["step"], k)
        assert 0.7 <= r["overall_ratio"] < 0.75
    # validation reports the loss by the mask count, by the selected count and the unweighted CE:
    # Σ selected NLL = wce · valid = selected_ce · selected, per head
    for k in range(H):
        mask_norm, sel_norm = last[f"val_wce/{k}"], last[f"val_selected_ce/{k}"]
        assert mask_norm * last[f"val_valid/{k}"] == pytest.approx(sel_norm * last[f"val_selected/{k}"], rel=1e-5)
        assert sel_norm > mask_norm  # fewer tokens than the mask count
    assert last["val_loss"] == pytest.approx(sum(last[f"val_wce/{k}"] for k in range(H)) / H, rel=1e-5)
    # the reference is the ref_tuning adapter on head 0: its mean NLL (policy CE minus the signed
    # excess, both over head 0's valid tokens) is the ref_tuning run's own final validation loss
    ref_val = [r for r in rows(reference) if "val_loss" in r][-1]["val_loss"]
    assert first["val_ce/0"] - first["val_excess/0"] == pytest.approx(ref_val, abs=1e-4)
    assert abs(first["val_ce/0"] - ref_val) > 1e-2  # the fresh policy is not the reference


@pytest.mark.parametrize("where", [".", "adapter", "adapter.hf_lora.pt", "peft"])
def test_the_reference_and_the_policy_share_one_base_module(where, reference, tmp_path):
    """One loss call runs only the session's base modules; head 0's layer runs twice (the
    reference with its adapter bound, then the policy), every extra head once. The reference
    given as the run directory, its adapter/, its hf_lora file or its PEFT export is the same adapter."""
    session, recipe = open_rho1(config("rho1", tmp_path, **{"rho1.reference": str(reference / where)}))
    module = session.base.module
    base_storages = {p.untyped_storage().data_ptr() for p in module.parameters()}
    ref_adapter = to_flat(checkpoint.load_params(reference / "adapter")[0]["lora"])
    q0 = "model.layers.0.self_attn.q_proj"  # head 0's (the tiny Llama's one layer's) query projection
    calls, bound_A = Counter(), []

    def record(mod, args, out):
        calls[mod] += 1
        if mod is module.get_submodule(q0):
            bound_A.append(mod.lora_A.clone())

    handle = torch.nn.modules.module.register_module_forward_hook(record)
    try:
        recipe.eval.loss(recipe.params, TensorDict({}, batch_size=[]), session.val_batches[0], torch.ones(H))
    finally:
        handle.remove()
    ran = {p.untyped_storage().data_ptr() for m in calls for p in m.parameters(recurse=False)}
    assert ran and ran <= base_storages  # no weight outside the one base took part
    assert calls[module.model.layers[0]] == 2 and all(calls[layer] == 1 for layer in module.extra_heads)
    assert torch.equal(bound_A[0], ref_adapter[f"{q0}.lora_A"])  # the reference adapter first
    assert torch.equal(bound_A[1], to_flat(recipe.params["policy"])[f"{q0}.lora_A"])


def test_the_scope_key_chooses_what_the_ratio_is_taken_over(reference, tmp_path):
    """rho1.scope=step selects exactly ceil(0.7 N) of the step's N valid tokens per head; the
    micro-batch scope rounds up per micro-batch, so some step of two micro-batches selects more."""
    counts = {}
    for scope in ("step", "micro_batch"):
        run_config(config("rho1", tmp_path / scope, **{"rho1.reference": str(reference), "rho1.scope": scope,
                                                       "train.steps": 3, "train.log_every": 1, "train.eval_every": 0}))
        counts[scope] = [(r[f"selected/{k}"], r[f"valid/{k}"]) for r in rows(tmp_path / scope) if "loss" in r
                         for k in range(H)]
    exact = [math.ceil(Fraction(7, 10) * int(valid)) for _, valid in counts["step"]]
    assert [int(sel) for sel, _ in counts["step"]] == exact
    assert [v for _, v in counts["micro_batch"]] == [v for _, v in counts["step"]]  # the same batches
    assert any(sel > want for (sel, _), want in zip(counts["micro_batch"], exact))


def test_a_reference_made_for_another_base_is_refused_naming_the_key(reference, tmp_path):
    other = tmp_path / "other_base"  # the embedded base's architecture, other weights
    build_base(LlamaConfig.from_pretrained(reference / "base"), seed=1).save_pretrained(other)
    cfg = config("rho1", tmp_path / "run", **{"rho1.reference": str(reference), "base.path": str(other),
                                              "data.tokenizer": str(embedded_tokenizer_path())})
    with pytest.raises(CheckpointError, match=r"^rho1\.reference: .*made for a different base: weights differ"):
        run_config(cfg)


@pytest.mark.parametrize("key, value, match", [
    ("rho1.reference", "", r"rho1\.reference is empty: run experiments/ref_tuning\.py first and pass its out_dir"),
    ("rho1.reference", "/no/such/dir", r"rho1\.reference: /no/such/dir: no such adapter"),
    ("rho1.ratio", 1.5, r"rho1\.ratio is 1\.5; expected .* in \[0, 1\]"),
    ("rho1.mode", "hard", r"rho1\.mode is 'hard'; expected one of \('signed', 'absolute', 'difficult'\)"),
    ("rho1.scope", "epoch", r"rho1\.scope is 'epoch'; expected one of \('micro_batch', 'step'\)"),
    ("rho1.rule", "topk", r"rho1\.rule is 'topk'; expected one of \('exact', 'quantile'\)"),
])
def test_a_bad_rho1_key_is_one_error_naming_it_before_anything_is_written(key, value, match, tmp_path):
    cfg = config("rho1", tmp_path / "run", **{"rho1.reference": str(tmp_path), key: value})
    (tmp_path / "meta.json").write_text("{}")  # passes the format check; the key under test fails first
    with pytest.raises(ConfigError, match=match):
        run_config(cfg)
    assert not (tmp_path / "run").exists()


def test_an_mtp_base_path_is_refused_it_has_no_llama_for_the_reference(reference, tmp_path):
    save_mtp(mtp_from_llama(load_base(reference / "base"), H), tmp_path / "mtp")
    cfg = config("rho1", tmp_path / "run", **{"rho1.reference": str(reference), "base.path": str(tmp_path / "mtp")})
    with pytest.raises(ConfigError, match=r"^base\.path: .* is already an MTP base; .* give that Llama directory"):
        run_config(cfg)
    assert not (tmp_path / "run").exists()


def test_step_scope_with_the_seeds_quantile_rule_is_refused(tmp_path):
    (tmp_path / "meta.json").write_text("{}")
    cfg = config("rho1", tmp_path / "run", **{"rho1.reference": str(tmp_path), "rho1.scope": "step",
                                              "rho1.rule": "quantile"})
    with pytest.raises(ConfigError, match=r"rho1\.rule='quantile' .* use rho1\.scope='micro_batch'"):
        run_config(cfg)


def test_ratio_one_trains_exactly_as_the_baseline(reference, tmp_path):
    """k = 100 % selects every token: one rho1 step is one baseline (plain MTP) step."""
    same = {"train.steps": 1, "train.eval_every": 0, "schedule.warmup_steps": 0}
    rho1 = run_config(config("rho1", tmp_path / "rho1", **same, **{"rho1.reference": str(reference), "rho1.ratio": 1.0}))
    baseline = run_config(config("baseline", tmp_path / "baseline", **same))
    a = to_flat(checkpoint.load_params(rho1.adapter_dir)[0]["policy"])
    b = to_flat(checkpoint.load_params(baseline.adapter_dir)[0]["policy"])
    assert a.keys() == b.keys()
    assert any(k.endswith("lora_B") and a[k].abs().max() > 1e-4 for k in a)  # the step moved B off its zeros
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6)
    assert rho1.final_val_loss == pytest.approx(baseline.final_val_loss, rel=1e-5)
