"""The verifiable objective on a tiny MTP base: TD weights from the critic's values (computed
here through the HF Llama the base came from), running whitening read before and updated once
per step from all micro-batches and ranks, the control modes, one shared base, and bitwise
resume including the whitening state."""

import copy
import gc

import pytest
import torch
from tensordict import TensorDict

from tests.adapters.helpers import randomize, rel_err
from tests.objectives.test_critic_objective import head_by_hand
from tests.train.test_comm import run_ranks
from wmtp_fn.adapters import AdapterSpec, apply, init, install_slots
from wmtp_fn.dist.comm import LOCAL
from wmtp_fn.losses.weighting import td_advantages, td_weights, validation_td_weights
from wmtp_fn.models.base import load_base
from wmtp_fn.models.mtp import mtp_from_llama
from wmtp_fn.models.value_head import ValueHeadSpec, init_value_head
from wmtp_fn.objectives.mtp import mtp_objective
from wmtp_fn.objectives.verifiable import TDConfig, initial_extra, verifiable_objective
from wmtp_fn.train import adamw
from wmtp_fn.train.evaluate import evaluate
from wmtp_fn.train.rng import seeded
from wmtp_fn.schedule import ScheduleConfig
from wmtp_fn.train.state import flatten_state, init_train_state, unflatten_state
from wmtp_fn.train.step import accumulate_grads, make_train_step, run_prepare

D = 64
CFG = adamw.AdamWConfig(lr=1e-2, weight_decay=0.1)
SCHED = ScheduleConfig(kind="cosine", warmup_steps=1, total_steps=6)


@pytest.fixture
def setup(tiny_dir, base):
    """(mtp base, policy params, policy spec, critic params, critic spec, head spec, the HF
    Llama with slots the MTP base was built from). The critic adapter covers the trunk
    (layer 0), whose output is the value input, so the Llama computes the same values."""
    mtp = mtp_from_llama(load_base(tiny_dir), 2)
    gen = torch.Generator().manual_seed(5)
    with torch.no_grad():  # an extra head that differs from head 0
        for p in mtp.extra_heads.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=gen))
    install_slots(mtp)
    policy, policy_spec = init(mtp, AdapterSpec(rank=4, alpha=8.0), seed=0)
    adapter, critic_spec = init(mtp, AdapterSpec(rank=4, alpha=8.0, layers=(0,)), seed=1)
    critic = TensorDict(
        {"critic": randomize(adapter, 2), "value_head": randomize(init_value_head("mlp", D, seed=3), 4, scale=0.5)},
        batch_size=[],
    )
    params = TensorDict({"policy": randomize(policy, 6, scale=0.1)}, batch_size=[])
    return mtp, params, policy_spec, critic, critic_spec, ValueHeadSpec("mlp", D), base


def batch(rows, t, prompt, seed, pad=()):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(4, 128, (rows, t), generator=gen)
    labels = ids.clone()
    labels[:, :prompt] = -100
    for row, n in pad:
        labels[row, t - n :] = -100
    return {"input_ids": ids, "labels": labels}


def steps_batches():
    return [
        [batch(2, 11, 3, 1, pad=((1, 4),)), batch(3, 11, 2, 2, pad=((0, 2),))],
        [batch(2, 11, 4, 3), batch(2, 11, 3, 4, pad=((1, 5),))],
        [batch(3, 11, 2, 5), batch(1, 11, 3, 6)],
        [batch(2, 11, 3, 7, pad=((0, 3),)), batch(2, 11, 1, 8)],
    ]


def critic_values_by_hand(llama, critic, critic_spec, ids):
    """head(norm(z)) with z the HF Llama's first-layer output: the MTP trunk's."""
    with torch.no_grad():
        out = apply(llama, critic["critic"], critic_spec, input_ids=ids, output_hidden_states=True)
        return head_by_hand(critic["value_head"], llama.model.norm(out.hidden_states[1]), "mlp")


def advantages_by_hand(setup, mb, td=TDConfig()):
    llama, critic, critic_spec = setup[6], setup[3], setup[4]
    m = mb["labels"] != -100
    v = critic_values_by_hand(llama, critic, critic_spec, mb["input_ids"])
    return td_advantages(v, m, gamma=td.gamma, lam=td.lam, initial_value=td.initial_value), m


def objective(setup, **kw):
    mtp, _, policy_spec, critic, critic_spec, head_spec, _ = setup
    return verifiable_objective(mtp, policy_spec, critic, critic_spec, head_spec, **kw)


def population(adv, m):
    x = torch.cat([a[k] for a, k in zip(adv, m)]).double()
    return x.mean(), x.std(unbiased=False)


# --------------------------------------------------------------------------- whitening


def test_weights_use_the_statistics_from_before_the_step_and_update_once(setup):
    """Step 1 does not whiten (μ = 0, σ = 1); its extra holds the population moments of all
    valid advantages of both micro-batches (the first update takes the batch outright); step 2
    whitens with those, then blends its batch in with weight 9/10 (warm-up, n = 2 of 10)."""
    obj, params = objective(setup), setup[1]
    extra = initial_extra()
    expected = (torch.tensor(0.0), torch.tensor(1.0))
    for step, mbs in enumerate(steps_batches()[:2]):
        new, prepared = run_prepare(obj, params, extra, mbs, LOCAL)
        adv, masks = zip(*[advantages_by_hand(setup, mb) for mb in mbs])
        for got, a, m in zip(prepared, adv, masks):
            want = td_weights(a, m, expected[0].float(), expected[1].float())
            assert (got["td_weights"] - want).abs().max() < 1e-5
        mean_b, std_b = population(adv, masks)
        keep = 0.0 if step == 0 else 0.1
        mean, std = keep * expected[0].double() + (1 - keep) * mean_b, keep * expected[1].double() + (1 - keep) * std_b
        assert abs(float(new["whitening", "mean"]) - float(mean)) < 1e-6
        assert abs(float(new["whitening", "std"]) - float(std)) < 1e-6
        assert int(new["whitening", "updates"]) == step + 1
        extra, expected = new, (new["whitening", "mean"], new["whitening", "std"])
    assert float(expected[1]) != 1.0  # step 2 really whitened


def test_cutting_the_step_into_micro_batches_changes_nothing(setup):
    obj, params = objective(setup), setup[1]
    mbs = steps_batches()[0]
    joined = [{k: torch.cat([mb[k] for mb in mbs]) for k in ("input_ids", "labels")}]
    extra = run_prepare(obj, params, initial_extra(), steps_batches()[1], LOCAL)[0]  # a whitened step
    split, whole = accumulate_grads(obj, params, extra, mbs), accumulate_grads(obj, params, extra, joined)
    # The moments are fp64 sums of fp32 advantages, and the fp32 forward of one joined batch
    # rounds differently from two halves (5e-7 relative on the mean here): bound by fp32 noise.
    assert torch.equal(split.extra["whitening", "updates"], whole.extra["whitening", "updates"])
    for key in ("mean", "std"):
        assert torch.allclose(split.extra["whitening", key], whole.extra["whitening", key], rtol=1e-5, atol=0)
    assert rel_err(split.loss, whole.loss) < 1e-6
    for name, value in whole.metrics.items():
        assert torch.allclose(split.metrics[name], value, rtol=1e-5, atol=1e-6), name
    for (k, g), (_, r) in zip(split.grads.items(True, True), whole.grads.items(True, True)):
        assert rel_err(g, r) < 1e-5, k


def test_two_ranks_equal_one_rank_on_both_micro_batches(setup):
    obj, params = objective(setup), setup[1]
    mbs = steps_batches()[0]
    extra = run_prepare(obj, params, initial_extra(), steps_batches()[1], LOCAL)[0]
    one = accumulate_grads(obj, params, extra, mbs)
    mtp, _, policy_spec, critic, critic_spec, head_spec, _ = setup

    def rank(comm, mb):  # each rank (a thread here) holds its own base: slots are per module
        own = verifiable_objective(copy.deepcopy(mtp), policy_spec, critic, critic_spec, head_spec)
        return accumulate_grads(own, params, extra, [mb], comm=comm)

    ranks, _ = run_ranks(rank, [(mbs[0],), (mbs[1],)])
    for got in ranks:
        for key in ("mean", "std", "updates"):
            assert torch.allclose(got.extra["whitening", key], one.extra["whitening", key], rtol=1e-12, atol=0)
        for name, value in one.metrics.items():  # td_reports counts one report per rank
            want = value * 2 if name == "td_reports" else value
            assert torch.allclose(got.metrics[name], want, rtol=1e-5, atol=1e-6), name
    assert float(one.metrics["w_min"]) < float(one.metrics["w_max"])


def test_metrics_are_the_statistics_of_the_weights_trained_with(setup):
    obj, params = objective(setup), setup[1]
    mbs = steps_batches()[0]
    extra = run_prepare(obj, params, initial_extra(), steps_batches()[1], LOCAL)[0]
    got = accumulate_grads(obj, params, extra, mbs).metrics
    mean, std = extra["whitening", "mean"].float(), extra["whitening", "std"].float()
    adv, masks = zip(*[advantages_by_hand(setup, mb) for mb in mbs])
    raw = torch.cat([torch.exp((a - mean) / (std + 1e-8))[m] for a, m in zip(adv, masks)]).double()
    w = raw.clamp(0.1, 3.0)
    p = w / w.sum()
    expected = {
        "w_mean": w.mean(),
        "w_std": w.std(unbiased=False),
        "w_min": w.min(),
        "w_max": w.max(),
        "w_entropy": -(w * torch.log(w + 1e-10)).mean(),
        "w_normalized_entropy": -(p * p.log()).sum() / torch.log(torch.tensor(float(w.numel()))),
        "w_clip_ratio": ((raw < 0.1) | (raw > 3.0)).double().mean(),
        "td_running_mean": mean,
        "td_running_std": std,
        "td_batch_mean": population(adv, masks)[0],
        "td_batch_std": population(adv, masks)[1],
    }
    assert 0 < float(expected["w_clip_ratio"]) < 1
    for name, value in expected.items():
        assert abs(float(got[name]) - float(value)) < 1e-5, name
    # loss_ratio = weighted / unweighted, and the unweighted loss is the plain MTP loss
    plain = accumulate_grads(mtp_objective(setup[0], setup[2]), params, TensorDict(), mbs)
    assert rel_err(got["unweighted_loss"], plain.loss) < 1e-6
    weighted = accumulate_grads(obj, params, extra, mbs).loss
    assert rel_err(got["loss_ratio"], weighted / plain.loss) < 1e-6


def test_the_loss_is_the_mtp_loss_with_the_weights_by_hand(setup):
    obj, params = objective(setup), setup[1]
    mbs = steps_batches()[2]
    extra = run_prepare(obj, params, initial_extra(), steps_batches()[0], LOCAL)[0]
    mean, std = extra["whitening", "mean"].float(), extra["whitening", "std"].float()
    by_hand = []
    for mb in mbs:
        a, m = advantages_by_hand(setup, mb)
        by_hand.append({**mb, "w": td_weights(a, m, mean, std)})
    ref = accumulate_grads(mtp_objective(setup[0], setup[2], weights_key="w"), params, TensorDict(), by_hand)
    got = accumulate_grads(obj, params, extra, mbs)
    assert rel_err(got.loss, ref.loss) < 1e-5
    for (k, g), (_, r) in zip(got.grads.items(True, True), ref.grads.items(True, True)):
        assert rel_err(g, r) < 1e-4, k
    assert torch.allclose(got.metrics["ce"], ref.metrics["ce"]) and not torch.allclose(got.metrics["ce"], got.metrics["wce"])


def test_validation_whitens_each_batch_with_its_own_statistics_and_keeps_extra(setup):
    val, params = objective(setup, train=False), setup[1]
    extra = run_prepare(objective(setup), params, initial_extra(), steps_batches()[0], LOCAL)[0]
    mb = steps_batches()[1][0]
    new, (prepared,) = run_prepare(val, params, extra, [mb], LOCAL)
    a, m = advantages_by_hand(setup, mb)
    want, mean, std = validation_td_weights(a, m)
    assert (prepared["td_weights"] - want).abs().max() < 1e-5
    assert all(torch.equal(new.get(k), extra.get(k)) for k in extra.keys(True, True))
    out = evaluate(val, params, extra, [mb])
    assert abs(out["td_batch_mean"] - float(mean)) < 1e-5 and abs(out["td_batch_std"] - float(std)) < 1e-5
    assert "td_running_mean" not in out


def test_a_skipped_step_keeps_the_whitening_state(setup):
    obj, params = objective(setup), setup[1]
    step = make_train_step(obj, CFG, SCHED)
    state = init_train_state(params.clone(), CFG, seed=0, extra=initial_extra())
    state, _ = step(state, steps_batches()[0])
    before = state.extra.clone()
    empty = [{**mb, "labels": torch.full_like(mb["labels"], -100)} for mb in steps_batches()[1]]
    state, metrics = step(state, empty)
    assert float(metrics["skipped"]) == 1.0
    assert all(torch.equal(state.extra.get(k), before.get(k)) for k in before.keys(True, True))


# ------------------------------------------------------------------------------ one base


def test_critic_and_policy_share_one_base(setup):
    """The critic's forward (in prepare) and the policy's (in the loss) run through the same
    decoder-layer objects holding the base's weight storage, with the critic's and then the
    policy's adapter in its slots; building the objective and stepping creates no parameter."""
    mtp, params, _, critic, _, _, _ = setup
    base_ptrs = {p.data_ptr() for p in mtp.parameters()}

    def parameters_alive():
        return {id(o) for o in gc.get_objects() if type(o) is torch.nn.Parameter}

    alive = parameters_alive()
    obj = objective(setup)
    layer = mtp.model.layers[0]
    calls = []

    def hook(module, args):
        q = module.self_attn.q_proj
        calls.append((id(module), q.weight.data_ptr(), q.lora_A.detach().clone()))

    handle = layer.register_forward_pre_hook(hook)
    try:
        accumulate_grads(obj, params, initial_extra(), steps_batches()[0])
    finally:
        handle.remove()
    assert parameters_alive() == alive
    assert len(calls) == 4  # two critic forwards in prepare, then two policy forwards
    assert {c[0] for c in calls} == {id(layer)} and {c[1] for c in calls} <= base_ptrs
    a_critic = critic["critic", "model", "layers", "0", "self_attn", "q_proj", "lora_A"]
    a_policy = params["policy", "model", "layers", "0", "self_attn", "q_proj", "lora_A"]
    assert all(torch.equal(c[2], a_critic) for c in calls[:2])
    assert all(torch.equal(c[2], a_policy) for c in calls[2:])


# -------------------------------------------------------------------------- control modes


def prepared_weights(setup, td, mbs, seed=0):
    with seeded(seed):
        _, prepared = run_prepare(objective(setup, td=td), setup[1], initial_extra(), mbs, LOCAL)
    return [p["td_weights"] for p in prepared]


def sorted_rows(w, scope):
    return [torch.sort(row[s]).values for row, s in zip(w, scope)]


def test_control_modes(setup):
    mbs = steps_batches()[0]
    masks = [mb["labels"] != -100 for mb in mbs]
    critic = prepared_weights(setup, TDConfig(), mbs)

    uniform = prepared_weights(setup, TDConfig(control="uniform"), mbs)
    assert all(torch.equal(u, m.float()) for u, m in zip(uniform, masks))

    for matched in (True, False):
        random = prepared_weights(setup, TDConfig(control="random", random_matched=matched), mbs)
        for r, c, m in zip(random, critic, masks):
            assert bool((r[m] > 0).all()) and bool((r[~m] == 0).all()) and not torch.allclose(r, c)
            if not matched:  # the seeds' fixed LogNormal, clamped
                assert bool((r[m] >= 0.1).all()) and bool((r[m] <= 3.0).all())

    shuffled = prepared_weights(setup, TDConfig(control="shuffled"), mbs)
    assert not all(torch.equal(s, c) for s, c in zip(shuffled, critic))
    for s, c, m in zip(shuffled, critic, masks):
        assert bool((s[~m] == 0).all())
        for got, want in zip(sorted_rows(s, m), sorted_rows(c, m)):
            assert torch.equal(got, want)  # each sequence keeps its multiset of weights

    attended = prepared_weights(setup, TDConfig(control="shuffled", shuffle_scope="attended"), mbs)
    moved_to_prompt = False
    for s, c, m in zip(attended, critic, masks):
        scope = torch.flip(torch.cummax(torch.flip(m.int(), [1]), 1).values, [1]).bool()  # up to the last response token
        for got, want in zip(sorted_rows(s, scope), sorted_rows(c, scope)):
            assert torch.equal(got, want)
        assert bool((s[~scope] == 0).all())
        moved_to_prompt |= bool((s[scope & ~m] != 0).any())
    assert moved_to_prompt  # the seeds' scope moves response weights onto the prompt

    for mode in ("uniform", "random", "shuffled"):  # every mode trains
        got = accumulate_grads(objective(setup, td=TDConfig(control=mode)), setup[1], initial_extra(), mbs)
        assert torch.isfinite(got.loss) and all(bool(torch.isfinite(g).all()) for g in got.grads.values(True, True))


def test_bad_td_settings_are_config_errors():
    from wmtp_fn.errors import ConfigError

    for bad in (dict(control="critics"), dict(shuffle_scope="all"), dict(lam=1.5), dict(beta=0.0), dict(w_min=4.0), dict(whitening_warmup=-1)):
        with pytest.raises(ConfigError):
            TDConfig(**bad)


# -------------------------------------------------------------------------------- resume


def test_resume_is_bitwise_identical_including_the_whitening_state(setup):
    """Random control weights and policy dropout draw from the step's seeded generator, and the
    whitening state is in the checkpointed extra: 2 + save/load + 2 steps = 4 steps."""
    mtp, params, _, critic, critic_spec, head_spec, _ = setup
    spec = setup[2].replace(dropout=0.1)
    obj = verifiable_objective(mtp, spec, critic, critic_spec, head_spec, td=TDConfig(control="random"))
    step = make_train_step(obj, CFG, SCHED)
    batches = steps_batches()

    def run(state, bs):
        metrics = []
        for mbs in bs:
            state, m = step(state, mbs)
            metrics.append({k: v.clone() for k, v in m.items()})
        return state, metrics

    straight, m_straight = run(init_train_state(params.clone(), CFG, seed=3, extra=initial_extra()), batches)
    half, _ = run(init_train_state(params.clone(), CFG, seed=3, extra=initial_extra()), batches[:2])
    tensors, meta = flatten_state(half)
    resumed, m_resumed = run(unflatten_state({k: v.clone() for k, v in tensors.items()}, meta), batches[2:])
    a, _ = flatten_state(straight)
    b, _ = flatten_state(resumed)
    assert a.keys() == b.keys() and any(k.startswith("extra.whitening") for k in a)
    assert all(torch.equal(a[k], b[k]) for k in a)
    for got, want in zip(m_resumed, m_straight[2:]):
        assert all(torch.equal(got[k], want[k]) for k in want)
    assert int(straight.extra["whitening", "updates"]) == 4
