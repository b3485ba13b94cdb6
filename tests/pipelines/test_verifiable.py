"""verifiable end to end on the embedded default: the tiny Llama turned into an MTP base, a
critic built here on that same base (the embedded base is rebuilt deterministically), TD
weights from it, every control mode, one shared base, bitwise resume with the whitening state."""

import dataclasses
import json
import shutil

import pytest
import torch
from tensordict import TensorDict

from tests.adapters.helpers import randomize
from tests.pipelines.experiment import experiment
from wmtp_fn import checkpoint
from wmtp_fn.adapters import AdapterSpec, init, install_slots
from wmtp_fn.atomic import atomic_write_text
from wmtp_fn.dist.comm import LOCAL
from wmtp_fn.errors import BaseModelError, CheckpointError, ConfigError
from wmtp_fn.models.base import build_base, embedded_base_dir, load_base
from wmtp_fn.models.mtp import mtp_from_llama
from wmtp_fn.models.value_head import ValueHeadSpec, init_value_head
from wmtp_fn.objectives.verifiable import initial_extra, verifiable_objective
from wmtp_fn.pipelines import verifiable
from wmtp_fn.pipelines.runner import load_tokenizer
from wmtp_fn.run import run_config
from wmtp_fn.train.rng import seeded
from wmtp_fn.train.step import run_prepare

HIDDEN, LAYERS = 64, 2  # a one-layer trunk, so the critic's value input is a real hidden state
TINY = {
    "base.tiny_hidden_size": HIDDEN, "base.tiny_layers": LAYERS, "data.n_samples": 16, "data.val_n_samples": 4,
    "data.max_length": 320, "data.too_long": "skip", "train.batch_size": 4, "train.micro_batch_size": 2,
    "lora.rank": 8, "train.log_every": 1,
}


def config(out_dir, critic, **overrides):
    return experiment("verifiable", out_dir, **{**TINY, "critic.path": str(critic), **overrides})


def embedded_llama(tmp_path, cfg):
    """The embedded tiny Llama of `cfg` exactly as the pipeline builds it (fixed seed, sized
    to the embedded tokenizer), written under `tmp_path`."""
    tok = load_tokenizer(cfg.data, "")
    return load_base(embedded_base_dir(tmp_path, tok, hidden_size=cfg.base.tiny_hidden_size, layers=cfg.base.tiny_layers))


def write_critic(path, model, *, layers=(0,), seed=0):
    """A critic checkpoint on `model` (a Llama or an MTP base, slots installed here): a random
    adapter on `layers` and an mlp head whose last layer is not zero, so values vary per token."""
    install_slots(model)
    adapter, spec = init(model, AdapterSpec(rank=4, alpha=8.0, layers=layers), seed=seed)
    d = model.config.hidden_size
    head = init_value_head("mlp", d, bias_init=0.0, seed=seed)
    params = TensorDict({"critic": randomize(adapter, seed + 1, scale=0.3), "value_head": randomize(head, seed + 2, scale=0.5)},
                        batch_size=[])
    checkpoint.save_params(path, params, {"critic": spec, "value_head": ValueHeadSpec("mlp", d)})
    return model, params, spec


def mtp_critic(root, **overrides):
    """A critic run directory (`adapter/` only) on the MTP base made from the embedded Llama."""
    llama = embedded_llama(root / "llama", config(root, "", **overrides))
    write_critic(root / "run" / "adapter", mtp_from_llama(llama, 3))
    return root / "run"


@pytest.fixture(scope="module")
def critic_dir(tmp_path_factory):
    return mtp_critic(tmp_path_factory.mktemp("critic"))


def rows(out_dir):
    return [json.loads(x) for x in (out_dir / "metrics.jsonl").read_text().splitlines()]



def whitening_after(running, batch, n, warmup=10):
    """The running (μ, σ) after update `n` (1-based) with the batch's (μ_b, σ_b), by hand."""
    keep = (n - 1) / warmup if n <= warmup else 0.9
    return tuple(keep * r + (1 - keep) * b for r, b in zip(running, batch))


def test_verifiable_lowers_validation_loss_and_logs_weights_whitening_and_every_head(tmp_path):
    """The embedded default's 256-wide tiny Llama, 24 steps on 32 records (the 64-wide base of
    the other tests moves too little in a short run). The validation loss is the TD-weighted MTP
    loss of 4 held-out records; it is deterministic for a seed (no dropout, a frozen critic, each
    batch whitened with its own statistics: the weights are the same at every validation), so
    it moves only with the policy, which starts as the base (B = 0). Measured: 9.35 -> 8.51
    weighted, 6.98 -> 6.39 unweighted, every head's CE down by about 0.6; asserted with about
    60 % of those margins."""
    wide = {"base.tiny_hidden_size": 256, "data.n_samples": 32}
    critic = mtp_critic(tmp_path / "critic", **wide)
    result = run_config(config(tmp_path, critic, **{"train.steps": 24, "train.eval_every": 0, **wide}))
    assert result.steps == 24
    assert result.final_val_loss < result.first_val_loss - 0.5, (result.first_val_loss, result.final_val_loss)
    log = rows(tmp_path)
    val = [r for r in log if "val_loss" in r]
    assert [r["step"] for r in val] == [0, 24]
    assert val[-1]["val_unweighted_loss"] < val[0]["val_unweighted_loss"] - 0.3
    for k in ("ce", "wce"):
        assert all(val[-1][f"val_{k}/{h}"] < val[0][f"val_{k}/{h}"] - 0.3 for h in range(3))  # every head learns

    train = [r for r in log if "loss" in r]
    assert [r["step"] for r in train] == list(range(1, 25))
    for r in train:
        assert {"ce/0", "ce/1", "ce/2", "wce/0", "wce/1", "wce/2", "unweighted_loss", "loss_ratio"} <= set(r)
        assert 0.1 - 1e-6 <= r["w_min"] <= r["w_mean"] <= r["w_max"] <= 3.0 + 1e-6 and r["w_std"] > 0.1
        assert 0 < r["w_normalized_entropy"] <= 1 and 0 <= r["w_clip_ratio"] <= 1
        assert r["loss"] == pytest.approx(r["loss_ratio"] * r["unweighted_loss"], rel=1e-5)
    # the whitening state is threaded through the run: each step whitens with the statistics
    # the previous steps left (step 1 with the initial 0 / 1), updated once per step
    running = (0.0, 1.0)
    for n, r in enumerate(train, start=1):
        assert (r["td_running_mean"], r["td_running_std"]) == pytest.approx(running, rel=1e-4, abs=1e-5), n
        running = whitening_after(running, (r["td_batch_mean"], r["td_batch_std"]), n)


def reachable_modules(*roots):
    """Every `nn.Module` reachable from `roots` through closures, defaults, containers and
    dataclass fields (a module's own submodules are not walked: they are its parameters)."""
    seen, found, stack = set(), [], list(roots)
    while stack:
        x = stack.pop()
        if id(x) in seen:
            continue
        seen.add(id(x))
        if isinstance(x, torch.nn.Module):
            found.append(x)
        elif isinstance(x, (list, tuple, set, frozenset)):
            stack += list(x)
        elif isinstance(x, dict):
            stack += list(x.values())
        elif dataclasses.is_dataclass(x) and not isinstance(x, type):
            stack += [getattr(x, f.name) for f in dataclasses.fields(x)]
        elif callable(x) and hasattr(x, "__code__"):
            for cell in x.__closure__ or ():
                try:
                    stack.append(cell.cell_contents)
                except ValueError:  # an empty cell
                    pass
            stack += list(x.__defaults__ or ()) + list((x.__kwdefaults__ or {}).values())
    return found


def storages(modules):
    return {p.untyped_storage().data_ptr() for m in modules for p in m.parameters()}


@pytest.mark.parametrize("trained_on", ["mtp", "llama"])
def test_critic_and_policy_share_one_base_module(tmp_path, critic_dir, trained_on):
    """Every parameter reachable from the objectives (policy and critic) lives in the storage
    of the one base's parameters, and every module they reach is the base, part of it, or a
    view made only of its parts; the critic of the plain Llama included (it reads the MTP
    base's head-0 path through such a view)."""
    critic = critic_dir
    if trained_on == "llama":
        critic = tmp_path / "llama_critic"
        write_critic(critic, embedded_llama(tmp_path / "llama", config(tmp_path, "")))
    session, recipe = verifiable.build(config(tmp_path / "run", critic))
    base = session.base.module
    parts = {id(m) for m in base.modules()}
    modules = reachable_modules(recipe.train, recipe.eval)
    assert any(m is base for m in modules)
    assert all(id(m) in parts or all(id(c) in parts for c in m.children()) for m in modules)
    assert storages(modules) == storages([base])
    assert len({id(p) for m in modules for p in m.parameters()} - {id(p) for p in base.parameters()}) == 0


def critic_run_weights(cfg, batches=None, seed=0):
    """The TD weights the pipeline's training objective gives the first two validation
    micro-batches at step 1, and those micro-batches' response masks."""
    session, recipe = verifiable.build(cfg)
    mbs = session.val_batches[:2] if batches is None else batches
    with seeded(seed):
        _, prepared = run_prepare(recipe.train, recipe.params, recipe.extra, mbs, LOCAL)
    return [p["td_weights"] for p in prepared], [mb["labels"] != -100 for mb in mbs], mbs


def test_shuffled_keeps_each_sequences_response_weight_multiset(tmp_path, critic_dir):
    critic, masks, mbs = critic_run_weights(config(tmp_path / "critic", critic_dir))
    shuffled, _, _ = critic_run_weights(config(tmp_path / "shuffled", critic_dir, **{"td.control": "shuffled"}), mbs)
    assert not all(torch.equal(s, c) for s, c in zip(shuffled, critic))
    for s, c, m in zip(shuffled, critic, masks):
        assert bool((s[~m] == 0).all())
        for row in range(m.shape[0]):
            assert torch.equal(torch.sort(s[row][m[row]]).values, torch.sort(c[row][m[row]]).values), row


def test_a_plain_llama_critic_gives_its_own_values_on_the_mtp_base(tmp_path):
    """A critic trained on the plain embedded Llama, shared with the MTP policy base, gives the
    same TD weights as that critic on a separately loaded plain Llama (`critic.base_path`);
    reading the MTP trunk's value input instead would not (checked: they differ)."""
    cfg = config(tmp_path, "")
    llama_dir = embedded_base_dir(tmp_path / "llama", load_tokenizer(cfg.data, ""), hidden_size=HIDDEN, layers=LAYERS)
    load_tokenizer(cfg.data, "").save_pretrained(llama_dir)  # a critic base brings its tokenizer
    _, params, spec = write_critic(tmp_path / "critic", load_base(llama_dir))
    shared, masks, mbs = critic_run_weights(config(tmp_path / "shared", tmp_path / "critic"))
    separate, _, _ = critic_run_weights(config(tmp_path / "separate", tmp_path / "critic", **{"critic.base_path": str(llama_dir)}), mbs)
    for a, b in zip(shared, separate):
        assert torch.allclose(a, b, atol=1e-6, rtol=1e-5)
    session, _ = verifiable.build(config(tmp_path / "trunk", tmp_path / "critic"))
    trunk = verifiable_objective(session.base.module, spec, params, spec, ValueHeadSpec("mlp", HIDDEN))
    with seeded(0):
        _, prepared = run_prepare(trunk, TensorDict({}, batch_size=[]), initial_extra(), mbs, LOCAL)
    assert not torch.allclose(prepared[0]["td_weights"], shared[0], atol=1e-3)

    odd = load_tokenizer(cfg.data, "")  # a critic base whose tokenizer has one token more
    odd.add_tokens(["<not_in_the_policy>"])
    shutil.copytree(llama_dir, tmp_path / "odd")
    odd.save_pretrained(tmp_path / "odd")
    with pytest.raises(BaseModelError, match=r"^critic.base_path: the tokenizer at .* is not the policy's .*'<not_in_the_policy>'"):
        verifiable.build(config(tmp_path / "odd_run", tmp_path / "critic", **{"critic.base_path": str(tmp_path / "odd")}))


def test_each_control_mode_runs_a_step(tmp_path, critic_dir):
    step = {}
    for mode in ("critic", "uniform", "random", "shuffled"):
        run_config(config(tmp_path / mode, critic_dir, **{"train.steps": 1, "train.eval_every": 0, "td.control": mode}))
        (step[mode],) = [r for r in rows(tmp_path / mode) if "loss" in r]
        assert step[mode]["grad_norm"] > 0 and step[mode]["loss"] > 0, mode
    stats = ("w_mean", "w_std", "w_min", "w_max", "w_entropy")
    assert step["uniform"]["w_mean"] == step["uniform"]["w_min"] == step["uniform"]["w_max"] == 1.0
    assert step["uniform"]["loss"] == pytest.approx(step["uniform"]["unweighted_loss"], rel=1e-6)
    # shuffled moves the critic's weights within each response: the same statistics, another loss
    assert [step["shuffled"][k] for k in stats] == pytest.approx([step["critic"][k] for k in stats], rel=1e-5)
    assert step["shuffled"]["loss"] != pytest.approx(step["critic"]["loss"], rel=1e-4)
    assert step["random"]["w_min"] > 0 and step["random"]["w_entropy"] != pytest.approx(step["critic"]["w_entropy"], rel=1e-3)
    assert step["critic"]["unweighted_loss"] == pytest.approx(step["random"]["unweighted_loss"], rel=1e-6)  # same batch


def test_resume_is_bitwise_identical_and_the_whitening_state_is_checkpointed(tmp_path, critic_dir):
    overrides = {"train.steps": 6, "train.save_every": 3, "train.eval_every": 2}
    straight = run_config(config(tmp_path / "straight", critic_dir, **overrides))

    interrupted = tmp_path / "interrupted"
    run_config(config(interrupted, critic_dir, **overrides))
    ckpts = interrupted / "checkpoints"
    at3, _ = checkpoint.read_checkpoint(ckpts / "step_00000003")
    shutil.rmtree(ckpts / "step_00000006")  # as if the run had died after step 3's checkpoint
    atomic_write_text(ckpts / "latest", "step_00000003\n")
    shutil.rmtree(interrupted / "adapter")
    resumed = run_config(config(interrupted, critic_dir, **overrides))

    strip = lambda p: [{k: v for k, v in json.loads(x).items() if k != "tokens_per_s"} for x in p.read_text().splitlines()]
    log = strip(interrupted / "metrics.jsonl")
    assert log == strip(tmp_path / "straight" / "metrics.jsonl")
    assert resumed.final_val_loss == straight.final_val_loss
    # the running statistics of step 3 are in the checkpoint, and step 4 whitened with them
    whitening = {k: at3["state"][f"extra.whitening.{k}"] for k in ("mean", "std", "updates")}
    assert int(whitening["updates"]) == 3
    (step4,) = [r for r in log if r["step"] == 4 and "loss" in r]
    assert (step4["td_running_mean"], step4["td_running_std"]) == pytest.approx(
        (float(whitening["mean"]), float(whitening["std"])), rel=1e-6)

    a, _ = checkpoint.read_checkpoint(checkpoint.latest(tmp_path / "straight" / "checkpoints"))
    b, meta = checkpoint.read_checkpoint(checkpoint.latest(ckpts))
    assert meta["state"]["step"] == 6 and int(b["state"]["extra.whitening.updates"]) == 6
    for group in ("params", "state"):
        assert a[group].keys() == b[group].keys()
        for k in a[group]:
            assert torch.equal(a[group][k], b[group][k]), (group, k)


def test_bad_critic_and_td_settings_are_refused_naming_the_key(tmp_path, critic_dir):
    out = tmp_path / "run"
    with pytest.raises(ConfigError, match=r"critic.path is empty: train a critic first \(python -m wmtp_fn --config experiments/critic.py\)"):
        run_config(config(out, ""))
    with pytest.raises(ConfigError, match=r"critic.path: '.*nowhere' holds no critic.*experiments/critic.py"):
        run_config(config(out, tmp_path / "nowhere"))
    for key, value in (("td.lam", 1.5), ("td.beta", 0.0), ("td.control", "critics"), ("td.whitening_warmup", -1)):
        with pytest.raises(ConfigError, match=rf"^{key}[ =]"):
            run_config(config(out, critic_dir, **{key: value}))
    with pytest.raises(ConfigError, match=r"^td: "):
        run_config(config(out, critic_dir, **{"td.w_min": 2.0, "td.w_max": 1.0}))
    assert not out.exists()  # all of these before anything is written

    llama = embedded_llama(tmp_path / "llama", config(out, ""))
    mtp = mtp_from_llama(llama, 3)
    install_slots(mtp)
    adapter, spec = init(mtp, AdapterSpec(rank=2), seed=0)  # a run directory of another pipeline
    checkpoint.save_params(tmp_path / "policy" / "adapter", TensorDict({"policy": adapter}, batch_size=[]), {"policy": spec})
    with pytest.raises(CheckpointError, match=r"^critic.path: .* holds subtrees \['policy'\]; a critic holds 'value_head'"):
        run_config(config(out, tmp_path / "policy"))
    other = build_base(llama.config, seed=1)  # same shape, other weights
    write_critic(tmp_path / "other" / "adapter", mtp_from_llama(other, 3))
    with pytest.raises(CheckpointError, match=r"^critic.path: .*other.* was trained on another base than the base at "):
        run_config(config(out, tmp_path / "other"))
