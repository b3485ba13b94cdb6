"""Train step: accumulation == one big batch == plain torch, empty batches, NaN policy,
per-step RNG, metrics without host syncs."""

import pytest
import torch
import torch.nn.functional as F

from tests.train.host_sync import HostSyncCounter
from tensordict import TensorDict

from tests.train.train_toy_lm import (
    UNEMBED,
    concat,
    count_fn,
    hidden,
    init_params,
    make_batch,
    make_objective,
    toy_sums,
)
from wmtp_fn.objectives import Objective, component_weights, weighted_sum
from wmtp_fn.train import adamw
from wmtp_fn.schedule import ScheduleConfig, lr_at
from wmtp_fn.train.state import init_train_state
from wmtp_fn.train.step import accumulate_grads, make_train_step
from wmtp_fn.train.tree import leaf_keys, leaves

IMPLS = ["fused", "foreach"]
SCHED = ScheduleConfig(kind="cosine", warmup_steps=1, total_steps=10, min_lr_ratio=0.1)


def clone_tree(td):
    return td.apply(lambda t: t.clone())


def snapshot(state):
    return [clone_tree(t) for t in (state.params, state.opt_state)]


def assert_trees_equal(snap, state):
    for before, after in zip(snap, (state.params, state.opt_state)):
        for k in leaf_keys(before):
            assert torch.equal(before.get(k), after.get(k)), ".".join(k)


def test_component_weights_golden():
    w = component_weights(torch.tensor([4, 0, 2]))
    torch.testing.assert_close(w, torch.tensor([1 / 8, 0.0, 1 / 4]))
    assert torch.equal(component_weights(torch.tensor([0, 0])), torch.zeros(2))


def test_objective_is_mean_over_active_components():
    """K = 3 with one empty component: (S0/N0 + S2/N2) / 2, independent of micro-batching."""
    params = init_params()
    x = params["head", "bias"]

    def loss(p, extra, mb, scale):
        b = p["head", "bias"]
        sums = torch.stack([mb["a"] * b.sum(), b.sum() * 0, mb["c"] * (b**2).sum()])
        return weighted_sum(sums, scale), sums, {}

    mbs = [{"a": 1.0, "c": 2.0, "n": torch.tensor([3, 0, 1])}, {"a": 3.0, "c": 5.0, "n": torch.tensor([1, 0, 4])}]
    grads, loss, counts, _, _ = accumulate_grads(Objective(lambda mb: mb["n"], loss), params, TensorDict(), mbs)
    assert counts.tolist() == [4, 0, 5]
    expected = 0.5 * ((1 + 3) * x.sum() / 4 + (2 + 5) * (x**2).sum() / 5)
    torch.testing.assert_close(loss, expected, rtol=1e-6, atol=0)
    torch.testing.assert_close(grads["head", "bias"], 0.5 * (1.0 + 7 * 2 * x / 5), rtol=1e-6, atol=1e-7)
    assert not grads["lora", "proj", "lora_A"].any()  # unreached leaves get zero gradients


def plain_torch_run(batch, steps, lr_fn, cfg_kwargs):
    """Independent reference: the usual loop — full logits, F.cross_entropy mean (what HF does),
    torch.optim.AdamW, clip_grad_norm_."""
    p0 = init_params()
    keys = leaf_keys(p0)
    ref = {k: p0.get(k).clone().requires_grad_() for k in keys}
    opt = torch.optim.AdamW(list(ref.values()), lr=lr_fn(0), weight_decay=cfg_kwargs["weight_decay"], fused=True)
    tree = p0.apply(lambda t: t)
    for s in range(steps):
        for k in keys:
            tree.set(k, ref[k])
        logits = hidden(tree, batch["input_ids"]) @ UNEMBED.T
        loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), batch["labels"][:, 1:].reshape(-1))
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(list(ref.values()), cfg_kwargs["max_grad_norm"])
        for g in opt.param_groups:
            g["lr"] = lr_fn(s)
        opt.step()
    return {k: v.detach() for k, v in ref.items()}, loss.detach()


@pytest.mark.parametrize("impl", IMPLS)
def test_accumulation_equals_big_batch_equals_plain_torch(impl):
    mbs = [make_batch(2, seed=1), make_batch(1, seed=2), make_batch(3, seed=3)]
    big = concat(mbs)
    n_tok = [int(count_fn(mb)) for mb in mbs]
    assert len(set(n_tok)) == 3, n_tok  # unequal token counts, or the test proves little
    cfg_kwargs = dict(weight_decay=0.05, max_grad_norm=1.0)
    cfg = adamw.AdamWConfig(lr=3e-2, no_decay=(), impl=impl, **cfg_kwargs)
    step = make_train_step(make_objective(), cfg, SCHED)
    s_acc = init_train_state(init_params(), cfg, seed=0)
    s_big = init_train_state(init_params(), cfg, seed=0)
    for _ in range(4):
        s_acc, m_acc = step(s_acc, mbs)
        s_big, m_big = step(s_big, [big])
        torch.testing.assert_close(m_acc["loss"], m_big["loss"], rtol=1e-6, atol=0)
        torch.testing.assert_close(m_acc["grad_norm"], m_big["grad_norm"], rtol=1e-6, atol=0)
        assert float(m_acc["n_tokens"]) == float(m_big["n_tokens"]) == sum(n_tok)
    keys = leaf_keys(s_acc.params)
    for k in keys:
        torch.testing.assert_close(s_acc.params.get(k), s_big.params.get(k), rtol=1e-6, atol=1e-7)
    ref, last_loss = plain_torch_run(big, 4, lambda s: lr_at(s, 3e-2, SCHED), cfg_kwargs)
    torch.testing.assert_close(m_big["loss"], last_loss, rtol=1e-6, atol=0)
    for k in keys:
        torch.testing.assert_close(s_big.params.get(k), ref[k], rtol=1e-6, atol=1e-7)


def test_mean_of_means_would_differ():
    """Sanity for the test above: with these micro-batches a mean of per-micro-batch means is
    measurably different, so the equality is not an accident of equal counts."""
    params = init_params()
    mbs = [make_batch(2, seed=1), make_batch(1, seed=2), make_batch(3, seed=3)]
    means = [toy_sums(params, mb)[0] / count_fn(mb) for mb in mbs]
    loss = accumulate_grads(make_objective(), params, TensorDict(), mbs).loss
    assert abs(float(sum(means) / 3) - float(loss)) > 1e-3


@pytest.mark.parametrize("impl", IMPLS)
def test_all_masked_step_is_finite_zero_and_skips(impl):
    empty = make_batch(3, seed=4)
    empty["labels"][:] = -100
    grads, loss, counts, _, _ = accumulate_grads(make_objective(), init_params(), TensorDict(), [empty, empty])
    assert loss.item() == 0.0 and int(counts.sum()) == 0
    for g in leaves(grads, leaf_keys(grads)):
        assert torch.isfinite(g).all() and not g.any()

    cfg = adamw.AdamWConfig(lr=1e-2, weight_decay=0.1, impl=impl)
    step = make_train_step(make_objective(), cfg, SCHED)
    state, _ = step(init_train_state(init_params(), cfg, seed=0), [make_batch(2, seed=5)])
    snap = snapshot(state)
    state2, m = step(state, [empty])
    # Decision: an empty step applies no update at all — not even weight decay.
    assert_trees_equal(snap, state2)
    assert state2.step == 2
    assert m["loss"].item() == 0.0 and m["skipped"].item() == 1.0 and m["n_tokens"].item() == 0.0
    assert m["grad_norm"].item() == 0.0


class NanGrad(torch.autograd.Function):
    """Identity forward, NaN backward: a finite loss with a non-finite gradient."""

    @staticmethod
    def forward(x):
        return x.clone()

    @staticmethod
    def setup_context(ctx, inputs, output):
        pass

    @staticmethod
    def backward(ctx, g):
        return g * float("nan")


def _poisoned_loss(params, extra, batch, scale):
    if batch.get("nan_grad"):
        params = params.clone(recurse=False)
        params.set(("head", "bias"), NanGrad.apply(params["head", "bias"]))
    return make_objective().loss(params, extra, batch, scale)


poisoned = Objective(count=count_fn, loss=_poisoned_loss)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("kind", ["loss", "grad"])
def test_nonfinite_skip_leaves_state_bitwise_and_advances(impl, kind):
    cfg = adamw.AdamWConfig(lr=1e-2, weight_decay=0.1, max_grad_norm=1.0, impl=impl)
    step = make_train_step(poisoned, cfg, SCHED, nonfinite="skip")
    state, _ = step(init_train_state(init_params(), cfg, seed=0), [make_batch(2, seed=6)])
    snap = snapshot(state)
    bad = make_batch(2, seed=7)
    if kind == "loss":
        bad["poison"] = torch.tensor(float("nan"))
    else:
        bad["nan_grad"] = True
    state2, m = step(state, [make_batch(1, seed=8), bad])
    assert m["skipped"].item() == 1.0 and state2.step == 2
    assert torch.isfinite(m["loss"]).item() == (kind == "grad")
    assert not torch.isfinite(m["grad_norm"]).item()
    assert_trees_equal(snap, state2)


@pytest.mark.parametrize("kind, what", [("loss", "loss"), ("grad", "grad norm")])
def test_nonfinite_raise_names_step_and_cause(kind, what):
    cfg = adamw.AdamWConfig(lr=1e-2, weight_decay=0.1)
    step = make_train_step(poisoned, cfg, SCHED, nonfinite="raise")
    state = init_train_state(init_params(), cfg, seed=0)
    for s in range(3):
        state, _ = step(state, [make_batch(2, seed=s)])
    snap = snapshot(state)
    bad = make_batch(2, seed=9)
    if kind == "loss":
        bad["poison"] = torch.tensor(float("inf"))
    else:
        bad["nan_grad"] = True
    with pytest.raises(FloatingPointError, match=rf"train step 3: non-finite {what}"):
        step(state, [bad])
    assert_trees_equal(snap, state)
    with pytest.raises(ValueError, match="nonfinite"):
        make_train_step(poisoned, cfg, SCHED, nonfinite="ignore")


def test_dropout_is_seeded_per_step_and_leaves_global_rng_alone():
    cfg = adamw.AdamWConfig(lr=1e-2)
    step = make_train_step(make_objective(dropout=0.5), cfg, SCHED)
    batch = [make_batch(3, seed=10)]
    torch.manual_seed(123)
    before = torch.get_rng_state()
    out = []
    for _ in range(2):
        s, m = step(init_train_state(init_params(), cfg, seed=7), batch)
        out.append((s, m))
    assert torch.equal(torch.get_rng_state(), before)
    assert torch.equal(out[0][1]["loss"], out[1][1]["loss"])
    for k in leaf_keys(out[0][0].params):
        assert torch.equal(out[0][0].params.get(k), out[1][0].params.get(k))
    # another run seed, or the next step, draws other masks
    _, m_other = step(init_train_state(init_params(), cfg, seed=8), batch)
    assert not torch.equal(m_other["loss"], out[0][1]["loss"])


@pytest.mark.parametrize("impl", IMPLS)
def test_skip_mode_step_has_no_host_sync_and_tensor_metrics(impl):
    cfg = adamw.AdamWConfig(lr=1e-2, weight_decay=0.1, max_grad_norm=1.0, impl=impl)
    step = make_train_step(make_objective(), cfg, SCHED)
    state = init_train_state(init_params(), cfg, seed=0)
    good = [make_batch(2, seed=11), make_batch(1, seed=12)]
    bad = make_batch(1, seed=13)
    bad["poison"] = torch.tensor(float("nan"))
    with HostSyncCounter() as counter:
        state, m = step(state, good)
        state, m2 = step(state, [bad])
    assert counter.syncs == 0
    assert {"loss", "grad_norm", "lr", "n_tokens", "skipped", "n_seq", "hidden_mean"} <= set(m)
    for v in m.values():
        assert isinstance(v, torch.Tensor) and v.shape == ()
    assert m["n_seq"].item() == 3.0  # a plain sum over the micro-batches (2 + 1 sequences)
    h = [hidden(init_params(), mb["input_ids"]) for mb in good]  # the params before the step
    torch.testing.assert_close(m["hidden_mean"], (h[0].sum() + h[1].sum()) / (h[0].numel() + h[1].numel()))
    assert m["n_hidden"].item() == h[0].numel() + h[1].numel()  # a denominator is reported as its sum
    assert m["lr"].item() == pytest.approx(lr_at(0, 1e-2, SCHED))
    assert m2["skipped"].item() == 1.0
    # the detector works: raise mode must read values on the host
    raising = make_train_step(make_objective(), cfg, SCHED, nonfinite="raise")
    with HostSyncCounter() as counter:
        raising(state, good)
    assert counter.syncs > 0


def test_metric_collision_and_bad_counts_raise():
    cfg = adamw.AdamWConfig()
    state = init_train_state(init_params(), cfg, seed=0)
    snap = snapshot(state)

    def with_metrics(metrics):
        def loss(p, e, b, scale):
            out, sums, _ = make_objective().loss(p, e, b, scale)
            return out, sums, metrics
        return loss

    cases = [
        (Objective(count_fn, with_metrics({"loss": 1.0})), "collide"),
        (Objective(lambda b: torch.tensor([1, 2]), make_objective().loss), "sums of shape"),
        (Objective(count_fn, with_metrics({"x": torch.ones(2, 2)})), "'x' must be a"),
        (Objective(count_fn, with_metrics({"a/b": 1.0})), "without '/'"),
        (Objective(count_fn, with_metrics({"x": 1.0}), means={"x": "n_x"}), "neither 'count' nor a metric"),
        (Objective(count_fn, with_metrics({}), means={"x": "count"}), "divides metric 'x'"),
    ]
    for objective, message in cases:
        with pytest.raises(ValueError, match=message):
            make_train_step(objective, cfg, SCHED)(state, [make_batch(1)])
    assert_trees_equal(snap, state)  # errors come before the (donating) update
    changing = iter([{"x": 1.0}, {"y": 1.0}])
    with pytest.raises(ValueError, match=r"micro-batch 1 returned metrics \['y'\], micro-batch 0 \['x'\]"):
        make_train_step(Objective(count_fn, lambda p, e, b, s: with_metrics(next(changing))(p, e, b, s)), cfg, SCHED)(
            state, [make_batch(1), make_batch(1)]
        )
    with pytest.raises(ValueError, match="no micro-batches"):
        make_train_step(make_objective(), cfg, SCHED)(state, [])
    with pytest.raises(ValueError, match="Objective.means"):
        Objective(count_fn, make_objective().loss, means={"x": "x"})


def test_step_randomness_comes_from_step_seed():
    """Step s draws exactly what seeded(step_seed(rng, s)) draws; consecutive steps differ."""
    from wmtp_fn.train.rng import seeded, step_seed

    def loss(params, extra, batch, scale):
        out, sums, _ = make_objective().loss(params, extra, batch, scale)
        return out, sums, {"draw": torch.rand(())}

    cfg = adamw.AdamWConfig(lr=1e-2)
    step = make_train_step(Objective(count_fn, loss), cfg, SCHED)
    state = init_train_state(init_params(), cfg, seed=11)
    draws = []
    for s in range(3):
        state, m = step(state, [make_batch(1, seed=s)])
        with seeded(step_seed(11, s)):
            expected = torch.rand(())
        assert torch.equal(m["draw"], expected)
        draws.append(m["draw"].item())
    assert len(set(draws)) == 3
