"""Critic losses and metrics: pairwise Bradley-Terry and λ-return regression against float64
loops written here, gradients, the λ schedule, the per-sequence value statistics and AUC."""

import math

import pytest
import torch
from hypothesis import given, settings, strategies as st

from wmtp_fn.errors import ConfigError
from wmtp_fn.losses.critic import (
    auc,
    critic_metric_sums,
    critic_metrics,
    lambda_at,
    lambda_return_loss,
    lambda_returns,
    masked_mean,
    pairwise_loss,
)
from wmtp_fn.models.value_head import init_value_head, value_head

F64 = torch.float64


def random_pairs(seed, P=5, T=9, empty_rows=True):
    g = torch.Generator().manual_seed(seed)
    v_pos, v_neg = torch.randn(P, T, generator=g, dtype=F64), torch.randn(P, T, generator=g, dtype=F64)
    m_pos = (torch.rand(P, T, generator=g) < 0.6).long()
    m_neg = (torch.rand(P, T, generator=g) < 0.6).long()
    if empty_rows:
        m_neg[0] = 0
    return v_pos, m_pos, v_neg, m_neg


def mean_loop(v, m):
    return [sum(x for x, k in zip(row, mk) if k) / (sum(mk) + 1e-8) for row, mk in zip(v.tolist(), m.tolist())]


# -------------------------------------------------------------------------------- pairwise


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_pairwise_loss_equals_float64_reference(seed):
    v_pos, m_pos, v_neg, m_neg = random_pairs(seed)
    pos, neg = mean_loop(v_pos, m_pos), mean_loop(v_neg, m_neg)
    ref = sum(-math.log(1 / (1 + math.exp(-(p - n)))) for p, n in zip(pos, neg)) / len(pos)
    assert pairwise_loss(v_pos, m_pos, v_neg, m_neg).item() == pytest.approx(ref, rel=1e-12)


def test_pairwise_without_pairs_is_zero():
    empty = torch.zeros(0, 4)
    assert pairwise_loss(empty, empty, empty, empty).item() == 0.0


def test_pairwise_gradient_raises_positives_and_lowers_negatives():
    """A toy linear head on hidden states whose correct rows live in feature 0 and incorrect rows
    in feature 1: one gradient step raises every positive's mean value and lowers every
    negative's, and the value gradient is −σ(−Δ)/(P·n) on valid positive tokens, +σ(−Δ)/(P·n) on
    valid negative tokens and 0 on masked ones."""
    P, T, d = 3, 6, 4
    g = torch.Generator().manual_seed(0)
    h_pos = torch.zeros(P, T, d)
    h_neg = torch.zeros(P, T, d)
    h_pos[..., 0] = 1 + torch.rand(P, T, generator=g)
    h_neg[..., 1] = 1 + torch.rand(P, T, generator=g)
    m_pos = torch.ones(P, T)
    m_pos[:, :2] = 0  # prompt
    m_neg = torch.ones(P, T)
    m_neg[:, -1] = 0  # padding
    params = init_value_head("linear", d)
    params["out", "weight"].requires_grad_(True)
    params["out", "bias"].requires_grad_(True)

    def values(p):
        return value_head(p, h_pos, kind="linear"), value_head(p, h_neg, kind="linear")

    v_pos, v_neg = values(params)
    gv_pos, gv_neg = torch.autograd.grad(pairwise_loss(v_pos, m_pos, v_neg, m_neg), (v_pos, v_neg))
    coef = torch.sigmoid(torch.tensor(0.0)) / P  # Δ = 0 at init
    torch.testing.assert_close(gv_pos, -coef * m_pos / m_pos.sum(-1, keepdim=True))
    torch.testing.assert_close(gv_neg, coef * m_neg / m_neg.sum(-1, keepdim=True))

    v_pos, v_neg = values(params)
    loss = pairwise_loss(v_pos, m_pos, v_neg, m_neg)
    gw, gb = torch.autograd.grad(loss, (params["out", "weight"], params["out", "bias"]))
    stepped = params.detach().clone()
    stepped["out", "weight"] -= 0.5 * gw
    stepped["out", "bias"] -= 0.5 * gb
    before = [masked_mean(v.detach(), m) for v, m in zip(values(params), (m_pos, m_neg))]
    after = [masked_mean(v.detach(), m) for v, m in zip(values(stepped), (m_pos, m_neg))]
    assert (after[0] > before[0]).all() and (after[1] < before[1]).all()
    assert pairwise_loss(*[x for pair in zip(values(stepped), (m_pos, m_neg)) for x in pair]) < loss


# ------------------------------------------------------------------------------- λ-returns


def returns_loop(values, mask, reward, lam, gamma):
    out = []
    for row, mk in zip(values, mask):
        G = [0.0] * len(row)
        valid = [i for i, k in enumerate(mk) if k]
        if valid:
            last = valid[-1]
            G[last] = reward
            for i in range(last - 1, -1, -1):
                G[i] = (1 - lam) * gamma * row[i + 1] + lam * gamma * G[i + 1]
        out.append(G)
    return out


def lambda_loss_loop(v_pos, m_pos, v_neg, m_neg, lam, gamma, kind, delta):
    halves = []
    for v, m, reward in ((v_pos, m_pos, 1.0), (v_neg, m_neg, 0.0)):
        G = returns_loop(v.tolist(), m.tolist(), reward, lam, gamma)
        seqs = []
        for row, mk, g in zip(v.tolist(), m.tolist(), G):
            terms = []
            for x, k, y in zip(row, mk, g):
                if not k:
                    continue
                e = x - y
                if kind == "mse":
                    terms.append(e * e)
                else:
                    terms.append(0.5 * e * e / delta if abs(e) < delta else abs(e) - 0.5 * delta)
            if terms:
                seqs.append(sum(terms) / len(terms))
        if seqs:
            halves.append(sum(seqs) / len(seqs))
    return sum(halves) / len(halves) if halves else 0.0


def test_lambda_returns_golden():
    # prompt 0, response 1-3, padding 4; λ = 0.5, γ = 0.9 (so (1−λ)γ = λγ = 0.45), R = 1:
    # G3 = 1; G2 = 0.45·0.4 + 0.45·1 = 0.63; G1 = 0.45·0.6 + 0.45·0.63 = 0.5535
    v = torch.tensor([[9.0, 0.2, 0.6, 0.4, 5.0]], dtype=F64)
    m = torch.tensor([[0, 1, 1, 1, 0]])
    G = lambda_returns(v, m, 1.0, lam=0.5, gamma=0.9)
    torch.testing.assert_close(G[:, 1:], torch.tensor([[0.5535, 0.63, 1.0, 0.0]], dtype=F64))
    # λ = 1, γ = 1 is the Monte-Carlo target: R on every response token
    mc = lambda_returns(v, m, torch.tensor([0.0]), lam=1.0)
    assert mc[0, 1:4].tolist() == [0.0, 0.0, 0.0]


@settings(max_examples=40)
@given(
    seed=st.integers(0, 2**16),
    lam=st.floats(0.0, 1.0),
    gamma=st.floats(0.5, 1.0),
    kind=st.sampled_from(["mse", "smooth_l1"]),
    delta=st.floats(0.05, 2.0),
    empty_rows=st.booleans(),
)
def test_lambda_return_loss_equals_float64_reference(seed, lam, gamma, kind, delta, empty_rows):
    v_pos, m_pos, v_neg, m_neg = random_pairs(seed, P=3, T=7, empty_rows=empty_rows)
    got = lambda_return_loss(v_pos, m_pos, v_neg, m_neg, lam=lam, gamma=gamma, loss=kind, delta=delta)
    ref = lambda_loss_loop(v_pos, m_pos, v_neg, m_neg, lam, gamma, kind, delta)
    assert got.item() == pytest.approx(ref, rel=1e-10, abs=1e-12)


def test_lambda_return_loss_with_an_empty_half_and_all_masked():
    v_pos, m_pos, v_neg, m_neg = random_pairs(4)
    alone = lambda_return_loss(v_pos, m_pos, v_neg, torch.zeros_like(m_neg), lam=0.9)
    assert alone.item() == pytest.approx(lambda_loss_loop(v_pos, m_pos, v_neg, 0 * m_neg, 0.9, 1.0, "mse", 0.5))
    none = lambda_return_loss(v_pos, 0 * m_pos, v_neg, 0 * m_neg, lam=0.9)
    assert none.item() == 0.0


def test_lambda_return_targets_carry_no_gradient():
    """MSE gradient w.r.t. the values with the targets held fixed: 2(v − G)·m / (n_row · n_rows · 2)."""
    v_pos, m_pos, v_neg, m_neg = random_pairs(5, empty_rows=False)
    v_pos.requires_grad_(True)
    loss = lambda_return_loss(v_pos, m_pos, v_neg, m_neg, lam=0.7, gamma=0.95)
    (grad,) = torch.autograd.grad(loss, v_pos)
    G = torch.tensor(returns_loop(v_pos.tolist(), m_pos.tolist(), 1.0, 0.7, 0.95), dtype=F64)
    n_rows = (m_pos.sum(-1) > 0).sum()
    expected = 2 * (v_pos.detach() - G) * m_pos / m_pos.sum(-1, keepdim=True).clamp_min(1) / n_rows / 2
    torch.testing.assert_close(grad, expected)


def test_lambda_schedule():
    assert lambda_at(0, schedule="constant", start=0.9) == 0.9
    for kind in ("linear", "cosine"):
        assert lambda_at(0, schedule=kind) == 1.0 and lambda_at(250, schedule=kind) == 1.0  # held
        assert lambda_at(750, schedule=kind) == pytest.approx(0.95) and lambda_at(5000, schedule=kind) == pytest.approx(0.95)
    # a quarter into the decay: linear 0.95 + 0.05·0.75; cosine 0.95 + 0.05·(1 + cos(π/4))/2
    assert lambda_at(375, schedule="linear") == pytest.approx(0.9875)
    assert lambda_at(375, schedule="cosine") == pytest.approx(0.95 + 0.05 * (1 + math.cos(math.pi / 4)) / 2)
    with pytest.raises(ConfigError, match="lambda_schedule"):
        lambda_at(3, schedule="exp")


# --------------------------------------------------------------------------------- metrics


def test_critic_metrics_golden():
    # pos rows: values [0, 1, 1, 4] (Δ 1, 0, 3: spikiness 3 / (4/3) = 2.25, mean 1.5);
    #           [1, 2, 3] on positions 0-2 (mean 2, corr +1), then masked padding
    # neg rows: [1, 3, 2] (mean 2, corr 0.5, Δ 2, 1: spikiness 2/1.5);
    #           [5, _, 1, 2] with a hole (mean 8/3, pairs only (2, 3): Δ 1, spikiness 1)
    v_pos = torch.tensor([[0.0, 1.0, 1.0, 4.0], [1.0, 2.0, 3.0, 7.0]], dtype=F64)
    m_pos = torch.tensor([[1, 1, 1, 1], [1, 1, 1, 0]])
    v_neg = torch.tensor([[1.0, 3.0, 2.0, 0.0], [5.0, 9.0, 1.0, 2.0]], dtype=F64)
    m_neg = torch.tensor([[1, 1, 1, 0], [1, 0, 1, 1]])
    metrics = critic_metrics(critic_metric_sums(v_pos, m_pos, v_neg, m_neg))
    variances = [3.0, 1.0, 1.0, (2 - 8 / 3) ** 2 / 2 + (7 / 3) ** 2 / 2 + (1 - 8 / 3) ** 2 / 2]
    # the row with a hole: positions (0, 2, 3) vs values (5, 1, 2)
    tc, vc = [0 - 5 / 3, 2 - 5 / 3, 3 - 5 / 3], [5 - 8 / 3, 1 - 8 / 3, 2 - 8 / 3]
    corr_hole = sum(a * b for a, b in zip(tc, vc)) / math.sqrt(sum(a * a for a in tc) * sum(b * b for b in vc))
    corr_first = sum(a * b for a, b in zip([-1.5, -0.5, 0.5, 1.5], [-1.5, -0.5, -0.5, 2.5])) / math.sqrt(5 * 9)
    expected = {
        "pairwise_accuracy": 0.0,  # 1.5 < 2 and 2 < 8/3
        "mean_pos": (1.5 + 2.0) / 2,
        "mean_neg": (2.0 + 8 / 3) / 2,
        "margin": (1.5 + 2.0) / 2 - (2.0 + 8 / 3) / 2,
        "token_variance": sum(variances) / 4,
        "spikiness": (2.25 + 1.0 + 2 / 1.5 + 1.0) / 4,
        "position_corr": (corr_first + 1.0 + 0.5 + corr_hole) / 4,
    }
    for k, v in expected.items():
        assert metrics[k].item() == pytest.approx(v, rel=1e-6, abs=1e-9), k


def test_pairwise_accuracy_counts_only_strict_wins():
    v_pos = torch.tensor([[2.0], [1.0], [0.5]])
    v_neg = torch.tensor([[1.0], [1.0], [0.7]])
    m = torch.ones(3, 1)
    assert critic_metrics(critic_metric_sums(v_pos, m, v_neg, m))["pairwise_accuracy"].item() == pytest.approx(1 / 3)


def test_short_sequences_do_not_enter_the_shape_statistics():
    # two valid tokens: a variance and one pair, but no correlation; nothing valid at all: no NaN
    v = torch.tensor([[0.0, 2.0, 9.0]])
    m = torch.tensor([[1, 1, 0]])
    sums = critic_metric_sums(v, m, v, torch.zeros_like(m))
    assert sums["position_corr_count"].item() == 0 and sums["token_variance_count"].item() == 1
    metrics = critic_metrics(sums)
    assert metrics["token_variance"].item() == pytest.approx(2.0) and metrics["position_corr"].item() == 0.0
    empty = critic_metrics(critic_metric_sums(v, 0 * m, v, 0 * m))
    assert all(torch.isfinite(x) for x in empty.values())


@settings(max_examples=60)
@given(scores=st.lists(st.integers(-3, 3), min_size=2, max_size=30), data=st.data())
def test_auc_equals_brute_force_pair_count_with_ties(scores, data):
    labels = data.draw(st.lists(st.booleans(), min_size=len(scores), max_size=len(scores)))
    pos = [s for s, y in zip(scores, labels) if y]
    neg = [s for s, y in zip(scores, labels) if not y]
    got = auc(torch.tensor(scores, dtype=torch.float32), torch.tensor(labels))
    if not pos or not neg:
        assert math.isnan(got.item())
        return
    ref = sum(1.0 if p > n else 0.5 if p == n else 0.0 for p in pos for n in neg) / (len(pos) * len(neg))
    assert got.item() == pytest.approx(ref, abs=1e-12)
