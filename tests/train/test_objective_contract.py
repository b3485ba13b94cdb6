"""The objective contract: K = 2 components with exact per-component metrics, a loss that runs
its own backward passes (two heads on a detached trunk), the order count → prepare → loss, and
``evaluate``."""

import pytest
import torch
import torch.nn.functional as F
from tensordict import TensorDict

from tests.train.host_sync import HostSyncCounter
from tests.train.train_toy_lm import D, UNEMBED, concat, hidden, init_extra, init_params, make_batch, make_stateful_objective
from wmtp_fn.objectives import COUNT, Objective, weighted_sum
from wmtp_fn.train import adamw
from wmtp_fn.train.evaluate import evaluate
from wmtp_fn.schedule import ScheduleConfig
from wmtp_fn.train.state import init_train_state
from wmtp_fn.train.step import accumulate_grads, make_train_step
from wmtp_fn.train.tree import leaf_keys

K = 2
SCHED = ScheduleConfig(kind="constant")


def two_head_params() -> TensorDict:
    """The toy trunk's params plus one [D, D] matrix per head."""
    params = init_params()
    g = torch.Generator().manual_seed(5)
    for k in range(K):
        params.set(("heads", str(k), "w"), 0.3 * torch.randn(D, D, generator=g))
    return params


def head_count(batch) -> torch.Tensor:
    """[K]: head k at position t predicts labels[t + k + 1]."""
    return torch.stack([(batch["labels"][:, k + 1 :] != -100).sum() for k in range(K)])


def head_outputs(params, h, labels, k):
    """Head k on trunk output h [B, T, D]: (CE sum, #correct, Σ p(target), #valid) over its targets."""
    hk = h + torch.tanh(h @ params["heads", str(k), "w"])
    logits = (hk @ UNEMBED.T)[:, : h.shape[1] - k - 1].reshape(-1, UNEMBED.shape[0])
    targets = labels[:, k + 1 :].reshape(-1)
    valid = targets != -100
    ce = F.cross_entropy(logits, targets, ignore_index=-100, reduction="sum")
    logp = logits.detach().log_softmax(-1).gather(1, targets.clamp_min(0)[:, None])[:, 0]
    correct = ((logits.detach().argmax(-1) == targets) & valid).sum()
    return ce, correct, (logp.exp() * valid).sum(), valid.sum()


def metrics_of(per_head, batch):
    _, correct, p, n = zip(*per_head)
    return {
        "ce": torch.stack([x[0].detach() for x in per_head]),  # [K], mean by the normalisers
        "acc": torch.stack(correct),  # [K], mean by the normalisers
        "p_target": sum(p),  # scalar, divided by the named count n_valid
        "n_valid": sum(n),
        "n_seq": batch["input_ids"].shape[0],  # a plain sum
    }


MEANS = {"ce": COUNT, "acc": COUNT, "p_target": "n_valid"}


def plain_loss(params, extra, batch, scale):
    h = hidden(params, batch["input_ids"])
    per_head = [head_outputs(params, h, batch["labels"], k) for k in range(K)]
    sums = torch.stack([x[0] for x in per_head])
    return weighted_sum(sums, scale), sums, metrics_of(per_head, batch)


def detached_trunk_loss(params, extra, batch, scale):
    """Each head's forward + backward (scaled by scale_k) on the detached trunk output,
    accumulating the trunk cotangent; the returned objective backpropagates the trunk once."""
    h = hidden(params, batch["input_ids"])
    h_detached = h.detach().requires_grad_()
    per_head = []
    for k in range(K):
        out = head_outputs(params, h_detached, batch["labels"], k)
        if torch.is_grad_enabled():
            (out[0] * scale[k]).backward()
        per_head.append((out[0].detach(), *out[1:]))
    sums = torch.stack([x[0] for x in per_head])
    if not torch.is_grad_enabled():
        return weighted_sum(sums, scale), sums, metrics_of(per_head, batch)
    return (h * h_detached.grad).sum(), sums, metrics_of(per_head, batch)


PLAIN = Objective(count=head_count, loss=plain_loss, means=MEANS)
DETACHED = Objective(count=head_count, loss=detached_trunk_loss, means=MEANS)


def micro_batches():
    mbs = [make_batch(2, seed=31), make_batch(3, seed=32)]
    n = [head_count(mb).tolist() for mb in mbs]
    assert n[0] != n[1] and n[0][0] != n[0][1], n  # unequal token counts per micro-batch and head
    return mbs


def float64_reference(params, mbs):
    """Per-token loops in float64 over both micro-batches: Σ / Σ per head, and the metrics."""
    ce, correct, p, n = torch.zeros(K, dtype=torch.float64), torch.zeros(K), 0.0, torch.zeros(K)
    with torch.no_grad():
        for mb in mbs:
            h = hidden(params, mb["input_ids"]).double()
            B, T = mb["labels"].shape
            for k in range(K):
                w = params["heads", str(k), "w"].double()
                for b in range(B):
                    for t in range(T - k - 1):
                        y = int(mb["labels"][b, t + k + 1])
                        if y == -100:
                            continue
                        logits = (h[b, t] + torch.tanh(h[b, t] @ w)) @ UNEMBED.double().T
                        logp = logits.log_softmax(-1)
                        ce[k] -= logp[y]
                        correct[k] += float(int(logits.argmax()) == y)
                        p += float(logp[y].exp())
                        n[k] += 1
    return {"ce": ce / n, "acc": correct.double() / n, "p_target": p / float(n.sum()), "n_valid": float(n.sum()),
            "n_seq": float(sum(mb["input_ids"].shape[0] for mb in mbs)), "n": n}


@pytest.mark.parametrize("objective", [PLAIN, DETACHED], ids=["plain", "detached_trunk"])
def test_two_components_give_exact_per_component_metrics(objective):
    params = two_head_params()
    mbs = micro_batches()
    ref = float64_reference(params, mbs)
    step = make_train_step(objective, adamw.AdamWConfig(lr=1e-2), SCHED)
    _, m = step(init_train_state(params.clone(), adamw.AdamWConfig(lr=1e-2), seed=0), mbs)
    assert m["ce"].shape == m["acc"].shape == (K,) and m["p_target"].shape == ()
    torch.testing.assert_close(m["ce"].double(), ref["ce"], rtol=1e-6, atol=0)
    torch.testing.assert_close(m["acc"].double(), ref["acc"], rtol=1e-6, atol=0)
    torch.testing.assert_close(m["p_target"].double(), torch.tensor(ref["p_target"], dtype=torch.float64), rtol=1e-5, atol=0)
    assert m["n_valid"].item() == ref["n_valid"] and m["n_seq"].item() == ref["n_seq"] == 5.0
    assert m["n_tokens"].item() == float(ref["n"].sum())
    torch.testing.assert_close(m["loss"].double(), ref["ce"].mean(), rtol=1e-6, atol=0)
    # the test can tell: per-micro-batch means averaged (the old behaviour) are measurably off
    per_mb = [float64_reference(params, [mb])["ce"] for mb in mbs]
    assert (abs((per_mb[0] + per_mb[1]) / 2 - ref["ce"]) > 1e-3).all()


def test_a_loss_with_its_own_backward_gives_the_plain_gradients():
    """Both forms against an independent reference: autograd of mean_k(mean CE of head k) on the
    concatenated batch (F.cross_entropy's own mean)."""
    params = two_head_params()
    mbs = micro_batches()
    plain = accumulate_grads(PLAIN, params, TensorDict(), mbs)
    detached = accumulate_grads(DETACHED, params, TensorDict(), mbs)

    ref = params.apply(lambda t: t.clone().requires_grad_())
    big = concat(mbs)
    h = hidden(ref, big["input_ids"])
    means = []
    for k in range(K):
        hk = h + torch.tanh(h @ ref["heads", str(k), "w"])
        logits = (hk @ UNEMBED.T)[:, : h.shape[1] - k - 1]
        means.append(F.cross_entropy(logits.reshape(-1, logits.shape[-1]), big["labels"][:, k + 1 :].reshape(-1)))
    objective = sum(means) / K
    objective.backward()

    torch.testing.assert_close(plain.loss, objective.detach(), rtol=1e-6, atol=0)
    torch.testing.assert_close(detached.loss, plain.loss, rtol=1e-6, atol=0)
    for key in leaf_keys(params):
        g_ref = ref.get(key).grad
        assert g_ref.abs().max() > 1e-4, key  # every part (trunk and both heads) gets a gradient
        torch.testing.assert_close(plain.grads.get(key), g_ref, rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(detached.grads.get(key), g_ref, rtol=1e-5, atol=1e-7)


def test_prepare_sees_all_micro_batches_before_any_loss():
    log = []
    objective = make_stateful_objective(log=log)
    step = make_train_step(objective, adamw.AdamWConfig(lr=1e-2), SCHED)
    state = init_train_state(init_params(), adamw.AdamWConfig(lr=1e-2), seed=0, extra=init_extra())
    state, _ = step(state, [make_batch(1, seed=1), make_batch(2, seed=2), make_batch(1, seed=3)])
    # counts first (masks only), then one no-grad prepare over all three, then the losses, each
    # receiving the micro-batch as prepare annotated it
    assert log == ["count"] * 3 + [("prepare", 3, False)] + [("loss", True)] * 3
    assert state.extra["stats", "tokens_seen"].item() == 4 * 9


def test_evaluate_is_sum_over_sum_with_the_named_counts():
    params = two_head_params()
    mbs = micro_batches()
    ref = float64_reference(params, mbs)
    with HostSyncCounter() as counter:
        out = evaluate(DETACHED, params, TensorDict(), mbs)  # its inner backward is off under no-grad
    assert counter.syncs <= 1  # one transfer at the end, not one per batch or per metric
    assert set(out) == {"loss", "n_tokens", "ce/0", "ce/1", "acc/0", "acc/1", "p_target", "n_valid", "n_seq"}
    assert all(isinstance(v, float) for v in out.values())
    for k in range(K):
        assert out[f"ce/{k}"] == pytest.approx(float(ref["ce"][k]), rel=1e-6)
        assert out[f"acc/{k}"] == pytest.approx(float(ref["acc"][k]), rel=1e-6)
    assert out["loss"] == pytest.approx(float(ref["ce"].mean()), rel=1e-6)
    assert out["p_target"] == pytest.approx(ref["p_target"], rel=1e-5)
    assert out["n_tokens"] == float(ref["n"].sum()) and out["n_seq"] == 5.0
    assert evaluate(PLAIN, params, TensorDict(), mbs) == pytest.approx(out, rel=1e-6)
    assert all(t.grad is None for t in params.values(True, True))
    with pytest.raises(ValueError, match="no batches"):
        evaluate(PLAIN, params, TensorDict(), [])


def test_evaluate_runs_prepare_per_batch_and_keeps_the_run_state():
    log = []
    objective = make_stateful_objective(log=log)
    extra = init_extra()
    before = extra.apply(lambda t: t.clone())
    batches = [make_batch(2, seed=1), make_batch(1, seed=2)]
    out = evaluate(objective, init_params(), extra, batches)
    assert log == ["count"] * 2 + [("prepare", 1, False), ("loss", True)] * 2
    for key in leaf_keys(before):
        assert torch.equal(extra.get(key), before.get(key))
    # each batch's loss used the extra its own prepare produced: compare with the step's view of
    # each batch alone (a one-micro-batch step from the same state)
    sums = []
    for b in batches:
        acc = accumulate_grads(make_stateful_objective(), init_params(), init_extra(), [b])
        sums.append(float(acc.loss) * float(b["labels"][:, 1:].ne(-100).sum()))
    n = sum(float(b["labels"][:, 1:].ne(-100).sum()) for b in batches)
    assert out["loss"] == pytest.approx(sum(sums) / n, rel=1e-6)
