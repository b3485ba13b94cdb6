"""Critic losses and metrics at their edges, by hand or against float64 loops: one pair, the
defaults of the λ-return losses, shape messages, metric dtypes, value statistics of large and
tiny values, a large AUC (surviving mutants of losses.critic)."""

import math

import numpy as np
import pytest
import torch

from wmtp_fn.errors import ConfigError
from wmtp_fn.losses.critic import (
    auc,
    critic_metric_sums,
    critic_metrics,
    lambda_return_loss,
    lambda_return_sequence_losses,
    lambda_returns,
    pairwise_loss,
    pairwise_losses,
    sequence_value_stats,
)

# One pair, worked out by hand with λ = 0.5, γ = 1:
#   pos: v = (0.2, 0.6), R = 1: G₁ = 1, G₀ = 0.5·0.6 + 0.5·1 = 0.8;
#        mse = ((0.2 − 0.8)² + (0.6 − 1)²)/2 = 0.26;
#        smooth_l1 with β = 0.5: |0.6| ≥ β → 0.6 − 0.25 = 0.35, |0.4| < β → 0.4²/(2·0.5) = 0.16: 0.255
#   neg: v = (0.4, 0.1), R = 0: G₁ = 0, G₀ = 0.5·0.1 = 0.05; mse = (0.35² + 0.1²)/2 = 0.06625
V_POS, V_NEG, M = torch.tensor([[0.2, 0.6]]), torch.tensor([[0.4, 0.1]]), torch.ones(1, 2)


def test_lambda_return_sequence_losses_defaults_are_gamma_1_mse_and_delta_half():
    loss, valid = lambda_return_sequence_losses(V_POS, M, 1.0, lam=0.5)
    assert loss.item() == pytest.approx(0.26, abs=1e-7) and valid.tolist() == [True]
    smooth, _ = lambda_return_sequence_losses(V_POS, M, 1.0, lam=0.5, loss="smooth_l1")
    assert smooth.item() == pytest.approx(0.255, abs=1e-7)


def test_lambda_return_loss_of_one_pair_by_hand():
    assert lambda_return_loss(V_POS, M, V_NEG, M, lam=0.5).item() == pytest.approx((0.26 + 0.06625) / 2, abs=1e-7)
    # smooth_l1, default β = 0.5: neg has |0.35| and |0.1| below β: (0.35² + 0.1²)/(2·0.5)/2 = 0.1325/2
    got = lambda_return_loss(V_POS, M, V_NEG, M, lam=0.5, loss="smooth_l1").item()
    assert got == pytest.approx((0.255 + 0.06625) / 2, abs=1e-7)


def test_pairwise_loss_of_one_pair_by_hand():
    # v̄_pos = 0.4, v̄_neg = 0.25 (up to the 1e-8 in the denominators): −log σ(0.15) = log(1 + e^−0.15)
    assert pairwise_loss(V_POS, M, V_NEG, M).item() == pytest.approx(math.log1p(math.exp(-0.15)), abs=1e-6)


@pytest.mark.parametrize("fn", [pairwise_losses, lambda_return_loss, critic_metric_sums])
def test_pair_shape_messages_name_the_function(fn):
    kw = {"lam": 1.0} if fn is lambda_return_loss else {}
    with pytest.raises(ValueError, match=rf"^{fn.__name__} expects v_pos, m_pos \[P, T\] and v_neg, m_neg \[P, T'\] "
                                         r"with the same P pairs, got \[\(1, 2\), \(1, 2\), \(2, 2\), \(2, 2\)\]$"):
        fn(V_POS, M, torch.zeros(2, 2), torch.ones(2, 2), **kw)


def test_metric_sums_are_float64_for_fp32_values_and_one_pair_is_not_halved():
    sums = critic_metric_sums(V_POS, M, V_NEG, M)
    assert {k: v.dtype for k, v in sums.items()} == {k: torch.float64 for k in sums}
    metrics = critic_metrics(sums)
    assert metrics["pairwise_accuracy"].item() == 1.0
    assert metrics["mean_pos"].item() == pytest.approx(0.4, abs=1e-7)
    assert metrics["margin"].item() == pytest.approx(0.15, abs=1e-7)


def stats_by_loop(v, m):
    """sequence_value_stats written as float64 Python loops over each row's valid tokens."""
    out = {"token_variance": [], "spikiness": [], "position_corr": []}
    for row, mask in zip(v.double().tolist(), m.tolist()):
        idx = [t for t, x in enumerate(mask) if x]
        vals, n = [row[t] for t in idx], len(idx)
        mean = sum(vals) / (n + 1e-8)
        c = [x - mean for x in vals]
        out["token_variance"].append(sum(x * x for x in c) / max(n - 1, 1))
        jumps = [abs(row[t + 1] - row[t]) for t in range(len(row) - 1) if mask[t] and mask[t + 1]]
        out["spikiness"].append(max(jumps, default=0.0) / (sum(jumps) / max(len(jumps), 1) + 1e-8))
        tm = sum(idx) / (n + 1e-8)
        tc = [t - tm for t in idx]
        cov = sum(a * b for a, b in zip(tc, c))
        scale = math.sqrt(sum(a * a for a in tc) * sum(b * b for b in c))
        out["position_corr"].append(cov / scale if scale > 0 else 0.0)
    return out


def test_value_stats_of_large_fp32_values_are_computed_in_float64():
    """Values near 2²⁴ (exact in fp32, but their means and deviations are not): the statistics
    equal float64 loops to 1e-12, which fp32 arithmetic inside misses by far."""
    v = torch.tensor([[2.0**24 + 2, 2.0**24, 2.0**24 + 6, 2.0**24 + 2], [3.0, 1.0, 2.0, 7.0]], dtype=torch.float32)
    m = torch.tensor([[1, 1, 1, 1], [0, 1, 1, 1]])
    got = sequence_value_stats(v, m)
    want = stats_by_loop(v, m)
    for name, (value, _) in got.items():
        assert value.dtype == torch.float64
        np.testing.assert_allclose(value.tolist(), want[name], rtol=1e-12, atol=1e-12, err_msg=name)


def test_spikiness_at_a_tiny_scale_and_zero_values_by_hand():
    """Jumps of 1e-8 and 2e-8: 2e-8 / (1.5e-8 + 1e-8) = 0.8. All-zero values over three tokens:
    no spread, position_corr 0."""
    v = torch.tensor([[0.0, 1e-8, 3e-8], [0.0, 0.0, 0.0]], dtype=torch.float64)
    got = sequence_value_stats(v, torch.ones(2, 3))
    assert got["spikiness"][0][0].item() == pytest.approx(0.8, rel=1e-9)
    corr, valid = got["position_corr"]
    assert corr[1].item() == 0.0 and valid[1].item()


def test_auc_of_many_positives_counts_every_pair():
    """5801 positives: n_pos(n_pos + 1)/2 = 16 828 701 is odd and above 2²⁴ (not an fp32 number);
    the AUC equals the exact pair count of a brute force over sorted scores."""
    rng = np.random.default_rng(0)
    pos, neg = rng.integers(0, 50, 5801), rng.integers(0, 50, 7)
    scores = torch.tensor(np.concatenate([pos, neg]), dtype=torch.float64)
    labels = torch.tensor([True] * 5801 + [False] * 7)
    s = np.sort(pos)
    wins = sum(len(s) - np.searchsorted(s, x, side="right") + 0.5 * (np.searchsorted(s, x, side="right") - np.searchsorted(s, x, side="left")) for x in neg)
    assert auc(scores, labels).item() == pytest.approx(wins / (5801 * 7), abs=1e-13)


def test_lambda_return_argument_messages():
    v, m = torch.zeros(1, 2), torch.ones(1, 2)
    for kw, name in ((dict(lam=1.5), "lam"), (dict(lam=1.0, gamma=1.5), "gamma")):
        with pytest.raises(ConfigError, match=rf"^critic\.{name} must be in \[0, 1\], got 1\.5$"):
            lambda_returns(v, m, 1.0, **kw)
    with pytest.raises(ConfigError, match=r"^critic\.smooth_l1 delta must be > 0, got 0\.0$"):
        lambda_return_sequence_losses(v, m, 1.0, lam=1.0, loss="smooth_l1", delta=0.0)
    with pytest.raises(ConfigError, match=r"^critic\.value_loss must be 'mse' or 'smooth_l1', got 'huber'$"):
        lambda_return_sequence_losses(v, m, 1.0, lam=1.0, loss="huber")


def test_a_one_token_sequence_is_valid_and_not_halved():
    # the one response token is the last: G = R = 1, loss (0.9 − 1)² = 0.01
    loss, valid = lambda_return_sequence_losses(torch.tensor([[0.3, 0.9]]), torch.tensor([[0, 1]]), 1.0, lam=0.5)
    assert loss.item() == pytest.approx(0.01, abs=1e-7) and valid.tolist() == [True]


def test_pair_shapes_each_check_and_unequal_lengths_are_fine():
    ok, ok3 = torch.zeros(1, 2), torch.zeros(1, 3)
    pairwise_losses(ok, ok, ok3, torch.ones(1, 3))  # T ≠ T' is allowed
    for args in ((ok, torch.ones(1, 3), ok, ok), (ok, ok, ok, torch.ones(1, 3)),
                 (torch.zeros(1, 2, 1), torch.ones(1, 2, 1), torch.zeros(1, 2, 1), torch.ones(1, 2, 1))):
        with pytest.raises(ValueError, match=r"^pairwise_losses expects v_pos, m_pos \[P, T\]"):
            pairwise_losses(*args)


def test_lambda_returns_keep_a_float64_reward_exact():
    v = torch.zeros(1, 2, dtype=torch.float64)
    got = lambda_returns(v, torch.ones(1, 2), 0.1, lam=1.0)
    assert got.dtype == torch.float64 and got[0, 1].item() == 0.1 and got[0, 0].item() == 0.1
