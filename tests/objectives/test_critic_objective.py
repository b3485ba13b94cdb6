"""Critic objectives on a tiny Llama: gradients equal autograd of float64 references written here
(HF's own `LlamaModel` forward, the value head and the losses by hand), the pairwise gradient
raises correct and lowers incorrect values through the whole model, use_lora = false trains
the head only, and the MTP base reads its values from the normalised trunk output."""

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from tensordict import TensorDict

import wmtp_fn.objectives.critic as critic_mod
from tests.adapters.helpers import randomize, rel_err
from wmtp_fn.adapters import AdapterSpec, apply, init
from wmtp_fn.losses.critic import lambda_at
from wmtp_fn.models.mtp import mtp_from_llama
from wmtp_fn.models.value_head import ValueHeadSpec, init_value_head
from wmtp_fn.objectives.critic import (
    LambdaSchedule,
    critic_auc,
    lambda_extra,
    lambda_return_objective,
    pairwise_objective,
    value_model,
)
from wmtp_fn.train import adamw
from wmtp_fn.schedule import ScheduleConfig
from wmtp_fn.train.state import init_train_state
from wmtp_fn.train.step import accumulate_grads, make_train_step, run_prepare
from wmtp_fn.dist.comm import LOCAL

D = 64  # the tiny Llama's hidden size


# ------------------------------------------------------------------------------ helpers


def pair_batch(n_pairs, t, prompt, seed, *, pad=(), mask=False, vocab=128):
    """`n_pairs` (correct, incorrect) pairs sharing their prompt; `pad`: (half, row, n) right pads."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(4, vocab, (2, n_pairs, t), generator=gen)
    ids[1, :, :prompt] = ids[0, :, :prompt]
    labels = ids.clone()
    labels[:, :, :prompt] = -100
    attention = torch.ones_like(ids)
    for half, row, n in pad:
        labels[half, row, t - n :] = -100
        ids[half, row, t - n :] = 3
        attention[half, row, t - n :] = 0
    out = {}
    for h, side in enumerate(("pos", "neg")):
        out[side] = {"input_ids": ids[h], "labels": labels[h]}
        if mask:
            out[side]["attention_mask"] = attention[h]
    return out


def micro_batches():
    return [
        pair_batch(2, 10, 3, seed=1, pad=((0, 1, 3), (1, 0, 4)), mask=True),
        pair_batch(3, 8, 2, seed=2, pad=((1, 2, 3),)),
    ]


def critic_params(model, kind="mlp", *, layers=None, seed=0):
    adapter, spec = init(model, AdapterSpec(rank=4, alpha=8.0, layers=layers), seed=seed)
    head = init_value_head(kind, D, seed=seed + 1)
    params = TensorDict({"critic": randomize(adapter, seed + 2), "value_head": randomize(head, seed + 3, scale=0.2)}, batch_size=[])
    return params, spec, ValueHeadSpec(kind, D, dropout=0.0)


def head_by_hand(head, h, kind):
    """The value head written out: fc1 → GELU → fc2 → GELU → out (mlp), or out alone."""
    x = h
    names = ["fc1", "fc2", "out"] if kind == "mlp" else ["out"]
    for name in names:
        x = x @ head[name, "weight"].T + head[name, "bias"]
        if name != "out":
            x = F.gelu(x)
    x = x[..., 0]
    return torch.sigmoid(x) if kind == "sigmoid" else x


def values64(base64, params64, spec, kind, ids, mask=None):
    """float64 values through HF's own `LlamaModel` forward (last_hidden_state is after the norm)."""
    if spec is None:
        h = base64.model(input_ids=ids, attention_mask=mask).last_hidden_state
    else:
        h = apply(base64.model, params64["critic", "model"], spec, input_ids=ids, attention_mask=mask).last_hidden_state
    return head_by_hand(params64["value_head"], h, kind)


def halves64(base64, params64, spec, kind, mb):
    out = []
    for side in ("pos", "neg"):
        half = mb[side]
        v = values64(base64, params64, spec, kind, half["input_ids"], half.get("attention_mask"))
        out.append((v, half["labels"] != -100))
    return out


def masked_mean_by_hand(v, m):
    return torch.stack([v[i][m[i]].sum() / (m[i].sum() + 1e-8) for i in range(v.shape[0])])


def leaves64(params):
    return params.apply(lambda t: t.detach().double().requires_grad_())


def grads_close(got, ref_params, tol=1e-4):
    """Leafwise relative error; a leaf whose reference gradient is exactly zero (the out bias
    under the pairwise loss, which only sees differences) must get a zero one too, up to rounding."""
    for key, g in got.items(True, True):
        r = ref_params.get(key).grad
        if float(r.norm()) < 1e-12:
            assert float(g.abs().max()) < 1e-6, key
        else:
            assert rel_err(g, r) < tol, key


# ---------------------------------------------------------------------------- pairwise


def test_pairwise_gradients_equal_the_float64_reference(base):
    params, spec, head_spec = critic_params(base)
    mbs = micro_batches()
    got = accumulate_grads(pairwise_objective(base, spec, head_spec), params, TensorDict(), mbs)

    base64, p64 = copy.deepcopy(base).double(), leaves64(params)
    losses = []
    for mb in mbs:
        (vp, mp), (vn, mn) = halves64(base64, p64, spec, "mlp", mb)
        margin = masked_mean_by_hand(vp, mp) - masked_mean_by_hand(vn, mn)
        losses.append(torch.log1p(torch.exp(-margin)))  # −log σ(margin)
    ref = torch.cat(losses).mean()  # over all 5 pairs of the step, not a mean of micro-batch means
    ref.backward()
    assert got.counts.tolist() == [5]
    assert abs(float(got.loss) - float(ref.detach())) < 1e-5
    grads_close(got.grads, p64)


def test_pairwise_metrics_equal_the_definitions(base):
    params, spec, head_spec = critic_params(base)
    mbs = micro_batches()
    got = accumulate_grads(pairwise_objective(base, spec, head_spec), params, TensorDict(), mbs).metrics
    base64, p64 = copy.deepcopy(base).double(), leaves64(params)
    means = {"pos": [], "neg": []}
    var, corr, spike = [], [], []
    with torch.no_grad():
        for mb in mbs:
            for side, (v, m) in zip(("pos", "neg"), halves64(base64, p64, spec, "mlp", mb)):
                means[side].append(masked_mean_by_hand(v, m))
                for row, mask in zip(v, m):
                    x = row[mask]
                    var.append(x.var(unbiased=True))
                    jumps = (x[1:] - x[:-1]).abs()
                    spike.append(jumps.max() / (jumps.mean() + 1e-8))
                    t = torch.nonzero(mask)[:, 0].double()
                    corr.append(torch.corrcoef(torch.stack([x, t]))[0, 1])
    pos, neg = torch.cat(means["pos"]), torch.cat(means["neg"])
    expected = {
        "pairwise_accuracy": (pos > neg).double().mean(),
        "mean_pos": pos.mean(),
        "mean_neg": neg.mean(),
        "margin": (pos - neg).mean(),
        "token_variance": torch.stack(var).mean(),  # every sequence has >= 3 response tokens
        "spikiness": torch.stack(spike).mean(),
        "position_corr": torch.stack(corr).mean(),
    }
    assert 0 < float(expected["pairwise_accuracy"]) < 1  # a ratio that can be off by one pair
    for name, value in expected.items():
        assert abs(float(got[name]) - float(value)) < 1e-4 * max(1.0, abs(float(value))), name
    assert float(got["pairs"]) == 5 and float(got["token_variance_count"]) == 10


def test_pairwise_gradient_raises_correct_and_lowers_incorrect_token_values(base, monkeypatch):
    """The cotangent of every value: negative on correct response tokens (a descent step raises
    them), positive on incorrect ones, zero on prompt and padding."""
    cotangents = []

    def recording_head(*args, **kwargs):
        v = critic_mod_value_head(*args, **kwargs)
        v.register_hook(lambda g: cotangents.append(g.detach().clone()))
        return v

    critic_mod_value_head = critic_mod.value_head
    monkeypatch.setattr(critic_mod, "value_head", recording_head)
    params, spec, head_spec = critic_params(base)
    mb = micro_batches()[0]
    accumulate_grads(pairwise_objective(base, spec, head_spec), params, TensorDict(), [mb])
    (g,) = cotangents
    p = mb["pos"]["input_ids"].shape[0]
    for side, rows in (("pos", g[:p]), ("neg", g[p:])):
        m = mb[side]["labels"] != -100
        assert bool((rows[~m] == 0).all()), side
        assert bool((rows[m] < 0).all()) if side == "pos" else bool((rows[m] > 0).all()), side


def test_one_pairwise_step_moves_the_whole_model_towards_the_correct_solution(base):
    """One AdamW step with a toy learning rate on one pair: Adam's first step is sign descent on
    the loss, which lowers it to first order, so the pair's margin must grow; every leaf of the
    adapter and the head's weight moves (the gradient reaches through the head into the LoRA)."""
    params, spec, head_spec = critic_params(base, kind="linear")
    mb = pair_batch(1, 9, 3, seed=5)
    objective = pairwise_objective(base, spec, head_spec)
    values = value_model(base, spec, head_spec)

    def margin(p):
        with torch.no_grad():
            vp, mp, vn, mn = critic_mod.pair_values(values, p, mb)
            return float(masked_mean_by_hand(vp, mp) - masked_mean_by_hand(vn, mn))

    cfg = adamw.AdamWConfig(lr=1e-4, weight_decay=0.0)
    state = init_train_state(params.clone(), cfg, seed=0)
    step = make_train_step(objective, cfg, ScheduleConfig(kind="constant", warmup_steps=0, total_steps=1))
    before = margin(params)
    state, metrics = step(state, [mb])
    assert margin(state.params) > before
    for key, new in state.params.items(True, True):
        if key != ("value_head", "out", "bias"):  # a shift of every value leaves the margin alone
            assert not torch.equal(new, params.get(key)), key


def test_use_lora_false_trains_the_head_on_the_frozen_backbone(base):
    head = randomize(init_value_head("linear", D, seed=1), seed=4, scale=0.2)
    params = TensorDict({"value_head": head}, batch_size=[])
    head_spec = ValueHeadSpec("linear", D)
    mbs = micro_batches()
    got = accumulate_grads(pairwise_objective(base, None, head_spec), params, TensorDict(), mbs)
    assert list(got.grads.keys()) == ["value_head"]

    base64, p64 = copy.deepcopy(base).double(), leaves64(params)
    losses = []
    for mb in mbs:
        (vp, mp), (vn, mn) = halves64(base64, p64, None, "linear", mb)
        losses.append(F.softplus(masked_mean_by_hand(vn, mn) - masked_mean_by_hand(vp, mp)))
    torch.cat(losses).mean().backward()
    grads_close(got.grads, p64)

    frozen = {k: v.clone() for k, v in base.state_dict().items()}
    cfg = adamw.AdamWConfig(lr=1e-2)
    step = make_train_step(pairwise_objective(base, None, head_spec), cfg, ScheduleConfig(kind="constant", warmup_steps=0, total_steps=1))
    state, _ = step(init_train_state(params.clone(), cfg, seed=0), mbs)
    assert not torch.equal(state.params["value_head", "out", "weight"], head["out", "weight"])
    assert all(torch.equal(v, frozen[k]) for k, v in base.state_dict().items())


def test_a_critic_adapter_without_its_spec_is_an_error(base):
    params, spec, head_spec = critic_params(base)
    with pytest.raises(ValueError, match="use_lora = false"):
        accumulate_grads(pairwise_objective(base, None, head_spec), params, TensorDict(), micro_batches()[:1])
    with pytest.raises(KeyError, match="'critic'"):
        head_only = TensorDict({"value_head": params["value_head"]}, batch_size=[])
        accumulate_grads(pairwise_objective(base, spec, head_spec), head_only, TensorDict(), micro_batches()[:1])
    with pytest.raises(ValueError, match="collate_pairs"):
        accumulate_grads(pairwise_objective(base, spec, head_spec), params, TensorDict(), [micro_batches()[0]["pos"]])


# --------------------------------------------------------------------------- λ-returns


def lambda_returns_by_hand(v, m, reward, lam, gamma=1.0):
    """The recursion as a loop: G = R at the last response token, G_t = (1−λ)γ v_{t+1} + λγ G_{t+1}."""
    g = torch.zeros_like(v)
    for i in range(v.shape[0]):
        idx = torch.nonzero(m[i])[:, 0]
        last = int(idx.max())
        g[i, last] = reward
        for t in range(last - 1, -1, -1):
            g[i, t] = (1 - lam) * gamma * v[i, t + 1] + lam * gamma * g[i, t + 1]
    return g


def smooth_l1_by_hand(e, delta):
    return torch.where(e.abs() < delta, 0.5 * e * e / delta, e.abs() - 0.5 * delta)


@pytest.mark.parametrize("value_loss", ["mse", "smooth_l1"])
def test_lambda_return_gradients_equal_the_float64_reference(base, value_loss):
    """λ from the schedule at the step counter in extra (2 → λ(2)), targets from detached
    values, per sequence, then per half over both micro-batches, then the mean of the halves."""
    params, spec, head_spec = critic_params(base)
    mbs = micro_batches()
    schedule = LambdaSchedule("linear", start=1.0, end=0.5, warmup_steps=1, decay_steps=4)
    lam = lambda_at(2, schedule="linear", start=1.0, end=0.5, warmup_steps=1, decay_steps=4)
    assert 0.5 < lam < 1.0
    objective = lambda_return_objective(base, spec, head_spec, lam_schedule=schedule, gamma=0.9, value_loss=value_loss, delta=0.05)
    extra = TensorDict({"lambda_step": torch.tensor(2)}, batch_size=[])
    got = accumulate_grads(objective, params, extra, mbs)

    base64, p64 = copy.deepcopy(base).double(), leaves64(params)
    per_half = {1.0: [], 0.0: []}
    for mb in mbs:
        for reward, (v, m) in zip((1.0, 0.0), halves64(base64, p64, spec, "mlp", mb)):
            g = lambda_returns_by_hand(v.detach(), m, reward, lam, 0.9)
            e = v - g
            per_token = e * e if value_loss == "mse" else smooth_l1_by_hand(e, 0.05)
            per_half[reward] += [per_token[i][m[i]].mean() for i in range(v.shape[0])]
    ref = 0.5 * (torch.stack(per_half[1.0]).mean() + torch.stack(per_half[0.0]).mean())
    ref.backward()
    assert got.counts.tolist() == [5, 5]
    assert int(got.extra["lambda_step"]) == 3
    assert abs(float(got.loss) - float(ref.detach())) < 1e-5
    grads_close(got.grads, p64)


def test_lambda_schedule_follows_the_counter_and_validation_uses_one(base):
    params, spec, head_spec = critic_params(base)
    schedule = LambdaSchedule("cosine", start=1.0, end=0.9, warmup_steps=1, decay_steps=2)
    objective = lambda_return_objective(base, spec, head_spec, lam_schedule=schedule)
    extra, seen = lambda_extra(), []
    for _ in range(4):
        extra, prepared = run_prepare(objective, params, extra, micro_batches(), LOCAL)
        seen.append(prepared[0]["lam"])
        assert all(mb["lam"] == seen[-1] for mb in prepared)
    assert seen == [schedule.at(s) for s in range(4)] and len(set(seen)) == 3  # held, then decaying

    # validation: λ = 1 (targets R everywhere), no prepare
    val = lambda_return_objective(base, spec, head_spec, lam_schedule=schedule, train=False)
    assert val.prepare is None
    got = accumulate_grads(val, params, TensorDict(), micro_batches())
    base64, p64 = copy.deepcopy(base).double(), leaves64(params)
    halves = {1.0: [], 0.0: []}
    with torch.no_grad():
        for mb in micro_batches():
            for reward, (v, m) in zip((1.0, 0.0), halves64(base64, p64, spec, "mlp", mb)):
                halves[reward] += [((v[i][m[i]] - reward) ** 2).mean() for i in range(v.shape[0])]
    ref = 0.5 * (torch.stack(halves[1.0]).mean() + torch.stack(halves[0.0]).mean())
    assert abs(float(got.loss) - float(ref.detach())) < 1e-5


# ----------------------------------------------------------------------- MTP base, AUC


def test_values_on_an_mtp_base_read_the_normalised_trunk(base, tiny_dir):
    """Values of an MTP base = head(norm(z)) with z the output of the HF Llama's first layer
    (the MTP trunk of a two-layer Llama with two heads), adapter on the trunk."""
    from wmtp_fn.adapters import install_slots
    from wmtp_fn.models.base import load_base

    mtp = mtp_from_llama(load_base(tiny_dir), 2)
    install_slots(mtp)
    params, spec, head_spec = critic_params(mtp, layers=(0,))
    ids = micro_batches()[1]["pos"]["input_ids"]
    got = value_model(mtp, spec, head_spec)(params, ids)
    with torch.no_grad():
        out = apply(base, params["critic"], spec, input_ids=ids, output_hidden_states=True)
        ref = head_by_hand(params["value_head"], base.model.norm(out.hidden_states[1]), "mlp")
    assert rel_err(got, ref) < 1e-5


def test_critic_auc_equals_the_pair_count(base):
    params, spec, head_spec = critic_params(base)
    mbs = micro_batches()
    got = float(critic_auc(value_model(base, spec, head_spec), params, mbs))
    base64, p64 = copy.deepcopy(base).double(), leaves64(params)
    pos, neg = [], []
    with torch.no_grad():
        for mb in mbs:
            (vp, mp), (vn, mn) = halves64(base64, p64, spec, "mlp", mb)
            pos += masked_mean_by_hand(vp, mp).tolist()
            neg += masked_mean_by_hand(vn, mn).tolist()
    wins = sum(1.0 if a > b else 0.5 if a == b else 0.0 for a in pos for b in neg)
    assert not math.isnan(got) and got == pytest.approx(wins / (len(pos) * len(neg)), abs=1e-9)
