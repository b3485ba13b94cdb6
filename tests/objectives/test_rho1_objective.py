"""The Rho-1 objective: k = 1 is the MTP objective, k = 0 a finite zero, the two scopes agree on
one micro-batch, exactly ⌈k·N⌉ tokens per head, the selection equals a float64 brute force from
the all-head logits, and the reference is head 0 of the one shared base."""

from itertools import product

import numpy as np
import pytest
import torch
from tensordict import TensorDict

from tests.adapters.helpers import randomize, rel_err
from tests.objectives.test_mtp_objective import micro_batches, mtp_base, naive_objective, params_for
from wmtp_fn.adapters import AdapterSpec, apply, init, install_slots
from wmtp_fn.dist.comm import LOCAL
from wmtp_fn.models.base import build_base, load_base, tiny_llama_config
from wmtp_fn.objectives.rho1 import WEIGHTS_KEY, Reference, reference_nll_fn, rho1_objective
from wmtp_fn.train.evaluate import evaluate
from wmtp_fn.train.step import accumulate_grads

H = 3
SCOPES = ["micro_batch", "step"]


@pytest.fixture
def setup(tiny_dir):
    """An MTP base (heads differ), a random policy adapter on it, and a reference adapter
    rooted at the Llama the base was built from (what ref_tuning writes)."""
    base = mtp_base(tiny_dir, H)
    params, spec = params_for(base)
    llama = load_base(tiny_dir)
    install_slots(llama)
    adapter, ref_spec = init(llama, AdapterSpec(rank=2, alpha=4.0), seed=1)
    return base, params, spec, Reference(randomize(adapter, seed=9), ref_spec), llama


def grads_close(got, ref, tol=1e-5):
    for (k, g), (_, r) in zip(got.grads.items(True, True), ref.grads.items(True, True)):
        assert r.abs().sum() > 0 and rel_err(g, r) < tol, k


def ceil_7_10(n: int) -> int:
    return -(-7 * n // 10)


def valid_counts(labels: torch.Tensor) -> list[int]:
    """Head k's valid targets, by a loop: t + k < T and labels[b, t+k] != -100."""
    B, T = labels.shape
    return [sum(1 for b, t in product(range(B), range(T)) if t + k < T and labels[b, t + k] != -100) for k in range(1, H + 1)]


@pytest.mark.parametrize("scope", SCOPES)
def test_ratio_one_is_the_plain_mtp_objective(setup, scope):
    base, params, spec, reference, _ = setup
    mbs = micro_batches()
    plain = accumulate_grads(naive_objective(base, spec), params, TensorDict(), mbs)
    got = accumulate_grads(rho1_objective(base, spec, reference=reference, ratio=1.0, scope=scope), params, TensorDict(), mbs)
    assert rel_err(got.loss, plain.loss) < 1e-6
    grads_close(got, plain)
    assert torch.equal(got.metrics["selected"], got.counts.float()) and torch.all(got.metrics["ratio"] == 1)
    torch.testing.assert_close(got.metrics["ce"], got.metrics["wce"], rtol=1e-6, atol=0)


@pytest.mark.parametrize("scope", SCOPES)
def test_ratio_zero_is_a_finite_zero_with_zero_gradients(setup, scope):
    base, params, spec, reference, _ = setup
    got = accumulate_grads(rho1_objective(base, spec, reference=reference, ratio=0.0, scope=scope), params, TensorDict(), micro_batches())
    assert float(got.loss) == 0.0
    assert all(float(g.abs().sum()) == 0.0 for g in got.grads.values(True, True))
    assert got.metrics["selected"].sum() == 0 and got.metrics["valid"].sum() > 0
    assert torch.all(got.metrics["ce"] > 0)  # the unweighted CE is still reported


def test_micro_batch_scope_on_one_micro_batch_equals_step_scope(setup):
    base, params, spec, reference, _ = setup
    (mb,) = micro_batches()[1:]
    a = accumulate_grads(rho1_objective(base, spec, reference=reference, scope="micro_batch"), params, TensorDict(), [mb])
    b = accumulate_grads(rho1_objective(base, spec, reference=reference, scope="step"), params, TensorDict(), [mb])
    assert 0 < a.metrics["overall_ratio"] < 1
    assert rel_err(a.loss, b.loss) < 1e-6
    grads_close(a, b)
    assert a.metrics.keys() == b.metrics.keys()
    for name in a.metrics:
        torch.testing.assert_close(a.metrics[name], b.metrics[name], rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.parametrize("scope", SCOPES)
def test_exactly_ceil_k_n_tokens_per_head_with_ties(setup, scope):
    """Duplicated rows (equal NLLs, so tied excess) and several micro-batches of unequal sizes."""
    base, params, spec, reference, _ = setup
    mbs = [{key: torch.cat([v, v]) for key, v in mb.items()} for mb in micro_batches()]
    got = accumulate_grads(rho1_objective(base, spec, reference=reference, ratio=0.7, scope=scope), params, TensorDict(), mbs)
    per_mb = [valid_counts(mb["labels"]) for mb in mbs]
    if scope == "step":
        want = [ceil_7_10(sum(c[k] for c in per_mb)) for k in range(H)]
    else:
        want = [sum(ceil_7_10(c[k]) for c in per_mb) for k in range(H)]
    assert got.metrics["selected"].tolist() == want
    assert got.metrics["valid"].tolist() == [sum(c[k] for c in per_mb) for k in range(H)]


def brute_force(base, params, spec, reference, mbs, *, mode, scope, rule="exact"):
    """float64, token by token: policy NLL from the all-head logits (adapters.apply, policy
    adapter), reference NLL from head 0's logits with the reference adapter; excess; per head
    the top ⌈0.7·N⌉ by (higher excess, then micro-batch, row, position) — or the seeds'
    quantile rule per micro-batch. Returns {(mb, b, t, k): (excess, policy nll, selected)}."""
    tokens = {}
    for i, mb in enumerate(mbs):
        ids, labels = mb["input_ids"], mb["labels"]
        with torch.no_grad():
            policy = apply(base, params["policy"], spec, ids).double().log_softmax(-1)  # [B, T, H, V]
            ref = apply(base, reference.adapter, reference.spec, ids)[:, :, 0].double().log_softmax(-1)
        B, T = labels.shape
        for b, t, k in product(range(B), range(T), range(1, H + 1)):
            if t + k < T and labels[b, t + k] != -100:
                y = labels[b, t + k]
                lp, lr = -policy[b, t, k - 1, y].item(), -ref[b, t + k - 1, y].item()
                excess = {"signed": lp - lr, "absolute": abs(lp - lr), "difficult": lr}[mode]
                tokens[(i, b, t, k)] = [excess, lp, False]
    groups = {}
    for key in tokens:
        groups.setdefault((key[3],) if scope == "step" else (key[0], key[3]), []).append(key)
    for keys in groups.values():
        if rule == "exact":
            for key in sorted(keys, key=lambda x: (-tokens[x][0], x))[: ceil_7_10(len(keys))]:
                tokens[key][2] = True
        else:
            threshold = np.quantile([tokens[x][0] for x in keys], 0.3, method="linear")
            for key in keys:
                tokens[key][2] = tokens[key][0] >= threshold
    return tokens


def per_head(tokens, what):
    """Per-head sums over the selected tokens of the brute force: count, NLL, excess."""
    out = np.zeros(H)
    for (_, _, _, k), (excess, nll, selected) in tokens.items():
        if selected:
            out[k - 1] += {"count": 1.0, "nll": nll, "excess": excess}[what]
    return out


@pytest.mark.parametrize("mode", ["signed", "absolute", "difficult"])
@pytest.mark.parametrize("scope", SCOPES)
def test_selection_matches_a_float64_brute_force(setup, mode, scope):
    base, params, spec, reference, _ = setup
    base = base.double()
    mbs = micro_batches()
    tokens = brute_force(base, params, spec, reference, mbs, mode=mode, scope=scope)
    objective = rho1_objective(base, spec, reference=reference, ratio=0.7, mode=mode, scope=scope)
    got = accumulate_grads(objective, params, TensorDict(), mbs)
    m = got.metrics
    np.testing.assert_array_equal(m["selected"].numpy(), per_head(tokens, "count"))
    np.testing.assert_allclose((m["selected_ce"] * m["selected"]).numpy(), per_head(tokens, "nll"), rtol=1e-6)
    np.testing.assert_allclose((m["selected_excess"] * m["selected"]).numpy(), per_head(tokens, "excess"), rtol=1e-5, atol=1e-6)
    thresholds = {}
    for (i, _, _, k), (excess, _, selected) in tokens.items():
        if selected:
            group = (k,) if scope == "step" else (i, k)
            thresholds[group] = min(thresholds.get(group, np.inf), excess)
    want = [np.mean([v for g, v in thresholds.items() if g[-1] == k]) for k in range(1, H + 1)]
    np.testing.assert_allclose(m["threshold"].numpy(), want, rtol=1e-6, atol=1e-7)
    if scope == "step":  # the stored weights are exactly the brute-force set
        with torch.no_grad():
            _, prepared = objective.prepare(params, TensorDict(), mbs, LOCAL)
        got_set = {(i, b, t, k + 1) for i, mb in enumerate(prepared) for b, t, k in mb[WEIGHTS_KEY].nonzero().tolist()}
        assert got_set == {key for key, (_, _, selected) in tokens.items() if selected}


def test_quantile_rule_is_the_seeds_per_micro_batch_quantile(setup):
    base, params, spec, reference, _ = setup
    base = base.double()
    mbs = micro_batches()
    tokens = brute_force(base, params, spec, reference, mbs, mode="signed", scope="micro_batch", rule="quantile")
    objective = rho1_objective(base, spec, reference=reference, ratio=0.7, rule="quantile")
    m = accumulate_grads(objective, params, TensorDict(), mbs).metrics
    np.testing.assert_array_equal(m["selected"].numpy(), per_head(tokens, "count"))
    np.testing.assert_allclose((m["selected_ce"] * m["selected"]).numpy(), per_head(tokens, "nll"), rtol=1e-6)


@pytest.mark.parametrize("scope", SCOPES)
def test_the_reference_is_head_0_of_the_one_policy_base(setup, scope):
    """Every module that runs belongs to the policy base (no copy of it), and head 0's layer runs
    once more per micro-batch than the extra heads: the reference forward."""
    base, params, spec, reference, _ = setup
    objective = rho1_objective(base, spec, reference=reference, scope=scope)
    owned = {id(m) for m in base.modules()}
    calls = []
    handle = torch.nn.modules.module.register_module_forward_hook(lambda m, i, o: calls.append(m))
    try:
        accumulate_grads(objective, params, TensorDict(), micro_batches())
    finally:
        handle.remove()
    assert calls and all(id(m) in owned for m in calls)
    head_0, *extra = base.head_layers()
    policy_passes = 2 if scope == "step" else 1  # the step scope's pre-pass runs the policy too
    assert sum(m is head_0 for m in calls) == 2 * (policy_passes + 1)
    assert all(sum(m is e for m in calls) == 2 * policy_passes for e in extra)


def test_a_separate_reference_base_equals_the_shared_head_0(setup):
    """The Llama the MTP base was built from, with the same adapter, is the same reference."""
    base, params, spec, reference, llama = setup
    separate = Reference(reference.adapter, reference.spec, model=llama)
    mb = micro_batches()[1]
    shared_nll = reference_nll_fn(base, reference)(mb)
    separate_nll = reference_nll_fn(base, separate)(mb)
    bare = reference_nll_fn(base, Reference())(mb)
    assert rel_err(separate_nll, shared_nll) < 1e-6 and rel_err(bare, shared_nll) > 1e-3
    a = accumulate_grads(rho1_objective(base, spec, reference=reference, scope="step"), params, TensorDict(), [mb])
    b = accumulate_grads(rho1_objective(base, spec, reference=separate, scope="step"), params, TensorDict(), [mb])
    assert torch.equal(a.metrics["selected"], b.metrics["selected"]) and rel_err(a.loss, b.loss) < 1e-6


def test_the_reference_runs_without_dropout(setup):
    base, _, _, reference, _ = setup
    noisy = Reference(reference.adapter, reference.spec.replace(dropout=0.5))
    mb = micro_batches()[0]
    clean = reference_nll_fn(base, reference)(mb)
    for seed in (0, 1):
        torch.manual_seed(seed)
        assert torch.equal(reference_nll_fn(base, noisy)(mb), clean)


def test_a_separate_reference_with_another_vocabulary_is_refused(setup):
    base, _, spec, _, _ = setup
    other = build_base(tiny_llama_config(vocab_size=96), seed=3)
    with pytest.raises(ValueError, match=r"reference model has a vocabulary of 96 tokens, the policy base 128"):
        rho1_objective(base, spec, reference=Reference(model=other))


def test_the_step_selection_runs_the_policy_without_dropout(setup):
    base, params, _, reference, _ = setup
    mbs = micro_batches()
    weights = []
    for dropout, seed in ((0.5, 0), (0.5, 1), (0.0, 0)):
        spec = params_for(base, dropout=dropout)[1]
        objective = rho1_objective(base, spec, reference=reference, scope="step")
        torch.manual_seed(seed)
        with torch.no_grad():
            _, prepared = objective.prepare(params, TensorDict(), mbs, LOCAL)
        weights.append([mb[WEIGHTS_KEY] for mb in prepared])
    assert all(torch.equal(w, v) for other in weights[1:] for w, v in zip(weights[0], other))
    # and with dropout the loss pass differs from the selection pass (dropout is on there)
    spec = params_for(base, dropout=0.5)[1]
    on = accumulate_grads(rho1_objective(base, spec, reference=reference, scope="step"), params, TensorDict(), mbs)
    off = accumulate_grads(rho1_objective(base, spec, reference=reference, scope="step", train=False), params, TensorDict(), mbs)
    assert torch.equal(on.metrics["selected"], off.metrics["selected"]) and rel_err(on.loss, off.loss) > 1e-4


@pytest.mark.parametrize("scope", SCOPES)
def test_validation_reports_both_normalisations_and_the_plain_ce(setup, scope):
    base, params, spec, reference, _ = setup
    base = base.double()
    mbs = micro_batches()
    objective = rho1_objective(base, spec, reference=reference, scope=scope, train=False)
    out = evaluate(objective, params, TensorDict(), mbs)
    tokens = brute_force(base, params, spec, reference, mbs, mode="signed", scope="micro_batch")
    # evaluate treats each batch as a step: both scopes select per batch here
    valid = np.array([sum(valid_counts(mb["labels"])[k] for mb in mbs) for k in range(H)])
    nll, count = per_head(tokens, "nll"), per_head(tokens, "count")
    assert out["loss"] == pytest.approx(np.mean(nll / valid), rel=1e-5)
    for k in range(H):
        assert out[f"selected_ce/{k}"] == pytest.approx(nll[k] / count[k], rel=1e-5)
        assert out[f"wce/{k}"] == pytest.approx(nll[k] / valid[k], rel=1e-5)
        plain = np.sum([t[1] for key, t in tokens.items() if key[3] == k + 1])
        assert out[f"ce/{k}"] == pytest.approx(plain / valid[k], rel=1e-5)
    assert out["selected_loss"] == pytest.approx(nll.sum() / count.sum(), rel=1e-5)
    assert out["overall_ratio"] == pytest.approx(count.sum() / valid.sum(), rel=1e-6)


def test_bad_arguments_are_refused(setup):
    base, _, spec, reference, _ = setup
    cases = [
        (dict(ratio=1.5), "ratio must be a number in \\[0, 1\\]"),
        (dict(mode="hard"), "mode must be one of"),
        (dict(rule="topk"), "rule must be 'exact' or 'quantile'"),
        (dict(scope="rank"), "scope must be 'micro_batch' or 'step'"),
        (dict(scope="step", rule="quantile"), "quantile rule is per micro-batch"),
    ]
    for kwargs, match in cases:
        with pytest.raises(ValueError, match=match):
            rho1_objective(base, spec, reference=reference, **kwargs)
    with pytest.raises(ValueError, match="both adapter and spec"):
        Reference(adapter=reference.adapter)
    step = rho1_objective(base, spec, reference=reference, scope="step")
    with pytest.raises(KeyError, match="objective.prepare must run first"):
        step.loss(TensorDict(), TensorDict(), micro_batches()[0], torch.ones(H))
