"""critic end to end on the embedded correct/incorrect data (tiny Llama, CPU)."""

import json
import shutil

import pytest
import torch

from wmtp_fn import checkpoint
from wmtp_fn.adapters import AdapterSpec, install_slots
from wmtp_fn.atomic import atomic_write_text
from wmtp_fn.config import apply_override
from wmtp_fn.data.index import read_many
from wmtp_fn.data.pairs import pair_sets
from wmtp_fn.data.stream import encoded_examples
from wmtp_fn.errors import ConfigError
from wmtp_fn.models.base import load_base
from wmtp_fn.models.value_head import ValueHeadSpec, init_value_head, read_seed_critic
from wmtp_fn.objectives.critic import value_model
from wmtp_fn.pipelines.runner import load_tokenizer
from tests.pipelines.experiment import experiment
from wmtp_fn.run import run_config

# A 64-wide one-layer Llama; prompts longer than 320 tokens are skipped (a few problems).
TINY = {"base.tiny_hidden_size": 64, "base.tiny_layers": 1, "data.max_length": 320, "data.too_long": "skip"}


def config(out_dir, **overrides):
    return experiment("critic", out_dir, **{**TINY, "train.log_every": 1, **overrides})


def val_rows(out_dir):
    return [r for r in map(json.loads, (out_dir / "metrics.jsonl").read_text().splitlines()) if "val_loss" in r]


def val_problems(cfg) -> int:
    """The problems behind the validation pairs that fit `data.max_length`."""
    tokenizer = load_tokenizer(cfg.data, cfg.base.path)
    _, val = pair_sets(cfg.data, cfg.critic, tokenizer, cfg.seed)
    examples, _ = encoded_examples(val.index, [o for pair in val.pairs for o in pair], tokenizer, cfg.data)
    kept = [pos for (pos, _), a, b in zip(val.pairs, examples[::2], examples[1::2]) if a is not None and b is not None]
    return len({r.problem_id for r in read_many(val.index["path"], kept)})


def test_a_short_critic_run_ranks_held_out_pairs_above_chance(tmp_path):
    """Done-means 3. Validation is the held-out half of the embedded problems (disjoint from the
    training problems): 276 (canonical, failing mutant) pairs of 72 problems whose prompts fit. A critic that
    knows nothing wins each pair with probability 1/2: its accuracy has mean 0.5 and std
    sqrt(0.25 / n), 0.030 over n = 276 pairs; the pairs of one problem share their correct
    side, so count conservatively one trial per problem, n = 72: std 0.059. 40 steps of the
    tiny random Llama (64 wide, one layer) with an mlp head reach 0.659 (seed 42; seeds 1 and
    2 of the same run give 0.575 and 0.639): 2.7 conservative stds, 5.3 per-pair stds above
    chance. Asserted: more than 2 conservative stds. Before training every value is the
    head's bias, so the strict v̄_pos > v̄_neg holds for no pair (accuracy 0)."""
    cfg = config(tmp_path, **{
        "train.steps": 40, "train.eval_every": 0, "train.save_every": 0, "data.val_fraction": 0.5,
        "critic.head.kind": "mlp", "critic.head.dropout": 0.0, "optim.lr": 2e-3, "critic.head.lr_ratio": 10.0,
        "export.hf_lora": False,
    })
    n_problems = val_problems(cfg)
    result = run_config(cfg)
    first, last = val_rows(tmp_path)
    assert result.steps == 40 and first["step"] == 0 and last["step"] == 40
    assert (last["val_pairs"], n_problems) == (276, 72)
    assert first["val_pairwise_accuracy"] == 0.0  # all values equal at init: no strict win
    assert last["val_pairwise_accuracy"] > 0.5 + 2 * (0.25 / n_problems) ** 0.5, last
    assert last["val_loss"] < first["val_loss"]


def test_use_lora_false_trains_the_value_head_alone(tmp_path, capsys):
    cfg = config(tmp_path, **{"train.steps": 3, "train.eval_every": 0, "critic.use_lora": False,
                              "critic.val_n_pairs": 8, "critic.head.kind": "linear", "critic.head.dropout": 0.3})
    result = run_config(cfg)
    assert "no critic adapter for the seeds' hf_lora file" in capsys.readouterr().out
    params, specs, _ = checkpoint.load_params(result.adapter_dir)
    assert list(params.keys()) == ["value_head"] and list(specs) == ["value_head"]
    assert specs["value_head"] == ValueHeadSpec("linear", 64, dropout=0.3, bias_init=0.0)  # the saved spec carries it
    fresh = init_value_head("linear", 64, seed=cfg.seed)
    assert not torch.equal(params["value_head", "out", "weight"], fresh["out", "weight"])  # it trained
    tensors, _ = checkpoint.read_checkpoint(checkpoint.latest(tmp_path / "checkpoints"))
    assert all(k.startswith("value_head.") for k in tensors["params"])
    opt = [k.split(".", 2) for k in tensors["state"] if k.startswith("opt_state.")]
    assert opt and all(rest.startswith("value_head.") for _, _, rest in opt)  # the optimizer holds the head alone
    assert not (tmp_path / "adapter.hf_lora.pt").exists()


def test_resume_of_a_lambda_return_critic_is_bitwise_identical(tmp_path):
    """λ-return with a λ schedule that moves during the run (its step counter lives in `extra`),
    adapter and mlp-head dropout on: the resumed run must replay the same pairs, λ and masks."""
    overrides = {"train.steps": 6, "train.save_every": 3, "train.eval_every": 3, "train.batch_size": 4,
                 "train.micro_batch_size": 2, "critic.val_n_pairs": 6, "critic.loss": "lambda_return",
                 "critic.lam.schedule": "linear", "critic.lam.warmup_steps": 1, "critic.lam.decay_steps": 4,
                 "critic.value_loss": "smooth_l1", "critic.head.bias_init": 0.5, "lora.dropout": 0.1}
    run_config(config(tmp_path / "straight", **overrides))
    interrupted = tmp_path / "interrupted"
    run_config(config(interrupted, **overrides))
    ckpts = interrupted / "checkpoints"
    shutil.rmtree(ckpts / "step_00000006")  # as if the run had died after step 3's checkpoint
    atomic_write_text(ckpts / "latest", "step_00000003\n")
    shutil.rmtree(interrupted / "adapter")
    run_config(config(interrupted, **overrides))

    strip = lambda p: [{k: v for k, v in json.loads(x).items() if k != "tokens_per_s"} for x in p.read_text().splitlines()]
    assert strip(interrupted / "metrics.jsonl") == strip(tmp_path / "straight" / "metrics.jsonl")
    a, _ = checkpoint.read_checkpoint(checkpoint.latest(tmp_path / "straight" / "checkpoints"))
    b, meta = checkpoint.read_checkpoint(checkpoint.latest(ckpts))
    assert meta["state"]["step"] == 6 and meta["cursor"]["position"] > 0
    assert int(b["state"]["extra.lambda_step"]) == 6
    for group in ("params", "state"):
        assert a[group].keys() == b[group].keys()
        for k in a[group]:
            assert torch.equal(a[group][k], b[group][k]), (group, k)


def test_the_seeds_export_reads_back_with_its_value_head_and_gives_the_same_values(tmp_path):
    result = run_config(config(tmp_path, **{"train.steps": 4, "train.eval_every": 0, "critic.val_n_pairs": 4,
                                           "optim.lr": 1e-2, "lora.rank": 4}))
    params, specs, _ = checkpoint.load_params(result.adapter_dir)
    assert set(params.keys()) == {"critic", "value_head"}
    assert isinstance(specs["critic"], AdapterSpec) and isinstance(specs["value_head"], ValueHeadSpec)
    base = load_base(tmp_path / "base")
    install_slots(base)
    adapter, spec, head, head_spec = read_seed_critic(tmp_path / "adapter.hf_lora.pt", base)
    assert head_spec == ValueHeadSpec("mlp", 64) and spec.rank == 4
    ids = torch.randint(4, 1000, (2, 12), generator=torch.Generator().manual_seed(1))
    trained = value_model(base, specs["critic"], specs["value_head"])({"critic": params["critic"], "value_head": params["value_head"]}, ids)
    read = value_model(base, spec, head_spec)({"critic": adapter, "value_head": head}, ids)
    assert trained.std() > 0  # the head left its constant init
    assert torch.equal(read, trained)


@pytest.mark.parametrize("key, value, message", [
    ("critic.loss", "hinge", r"critic.loss is 'hinge'; expected one of \('pairwise', 'lambda_return'\)"),
    ("critic.pairing", "nearest", r"critic.pairing is 'nearest'; expected one of"),
    ("critic.head.kind", "deep", r"critic.head.kind is 'deep'; expected one of \('linear', 'sigmoid', 'mlp'\)"),
    ("critic.mtp_n_future", "1", r"critic.mtp_n_future is 1; expected 0 \(the Llama base\) or >= 2"),
    ("critic.lam.schedule", "step", r"critic.lam: .*step"),
    ("critic.head.lr_ratio", "0", r"critic.head.lr_ratio is 0.0; expected a number > 0"),
])
def test_a_bad_critic_value_is_one_line_naming_the_key_and_writes_nothing(tmp_path, key, value, message):
    cfg = config(tmp_path / "run")
    apply_override(cfg, key, value)
    with pytest.raises(ConfigError, match=message) as e:
        run_config(cfg)
    assert "\n" not in str(e.value)
    assert not (tmp_path / "run").exists()


def test_an_unknown_critic_key_is_an_error_naming_it(tmp_path):
    with pytest.raises(ConfigError, match=r"--config.critic.los: no such key; did you mean --config.critic.loss\?"):
        apply_override(config(tmp_path), "critic.los", "pairwise")


def test_a_critic_on_the_mtp_base_reads_the_trunk_and_exports_hf_lora_with_its_head(tmp_path):
    """`critic.mtp_n_future = 2`: the base of the policy pipelines (`baseline.as_mtp`), the value
    read from the normalised trunk; the seeds' file is the critic's hf_lora, not a policy file."""
    result = run_config(config(tmp_path, **{"train.steps": 2, "train.eval_every": 0, "critic.val_n_pairs": 4,
                                           "critic.mtp_n_future": 2, "base.tiny_layers": 2, "optim.lr": 1e-2}))
    from wmtp_fn.adapters.seeds_io import read_seed_checkpoint
    from wmtp_fn.models.mtp import mtp_from_llama

    mtp = mtp_from_llama(load_base(tmp_path / "base"), 2)
    install_slots(mtp)
    params, specs, _ = checkpoint.load_params(result.adapter_dir)
    assert any(k[0] == "extra_heads" for k in params["critic"].keys(True, True))  # the MTP base's own paths
    seed = read_seed_checkpoint(tmp_path / "adapter.hf_lora.pt", mtp)
    assert not (tmp_path / "adapter.seeds_lora.pt").exists()
    assert set(seed.value_head) == {"mlp.0.weight", "mlp.0.bias", "mlp.3.weight", "mlp.3.bias", "mlp.6.weight", "mlp.6.bias"}
    ids = torch.randint(4, 1000, (1, 10), generator=torch.Generator().manual_seed(2))
    v = value_model(mtp, specs["critic"], specs["value_head"])({"critic": params["critic"], "value_head": params["value_head"]}, ids)
    assert v.shape == (1, 10) and v.std() > 0
