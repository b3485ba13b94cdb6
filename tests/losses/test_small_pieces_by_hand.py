"""Hand-computed values for the small pieces every weighted loss leans on (each assertion here
was written against a mutant that survived the module's own tests)."""

import pytest
import torch

from wmtp_fn.errors import ConfigError
from wmtp_fn.losses.normalise import component_weights
from wmtp_fn.losses.rho1 import rho1_weights
from wmtp_fn.losses.weighting import clip_weights, lognormal_weights, whitening_sums


def test_component_weights_by_hand():
    # N = (0, 1, 4): two active components, scale_k = 1 / (N_k · 2), the empty one 0
    got = component_weights(torch.tensor([0, 1, 4]))
    assert got.dtype == torch.float32 and got.tolist() == [0.0, 0.5, 0.125]
    assert component_weights(torch.tensor([0, 0, 3])).tolist() == [0.0, 0.0, pytest.approx(1 / 3)]
    assert component_weights(torch.tensor([0, 0])).tolist() == [0.0, 0.0]  # all masked: a finite 0


def test_whitening_sums_by_hand_and_its_shape_check():
    x = torch.tensor([[1.5, -2.0, 7.0]], dtype=torch.float32)
    sums = whitening_sums(x, torch.tensor([[1, 1, 0]]))
    assert sums.dtype == torch.float64 and sums.tolist() == [-0.5, 6.25, 2.0]
    with pytest.raises(ValueError, match=r"whitening_sums expects \[B, T\] tensors of one shape, got \{'x': \(1, 3\), 'mask': \(1, 2\)\}"):
        whitening_sums(x, torch.ones(1, 2))


def test_clip_weights_allows_a_single_point_range():
    mask = torch.tensor([[1, 1, 0]])
    got = clip_weights(torch.tensor([[0.2, 5.0, 9.0]]), mask, w_min=1.0, w_max=1.0)
    assert got.tolist() == [[1.0, 1.0, 0.0]]
    with pytest.raises(ConfigError, match="0 <= w_min <= w_max"):
        clip_weights(torch.ones(1, 1), torch.ones(1, 1), w_min=2.0, w_max=1.0)


def test_lognormal_weights_are_fp32_whatever_the_moments_dtype():
    mask = torch.ones(2, 3)
    gen = torch.Generator().manual_seed(0)
    w = lognormal_weights(mask, torch.tensor(1.3, dtype=torch.float64), torch.tensor(0.9, dtype=torch.float64),
                          generator=gen)
    assert w.dtype == torch.float32 and bool((w > 0).all())


def test_rho1_weights_use_the_mode_they_are_given():
    """absolute mode ranks |policy − ref|: the token the policy predicts far *better* than the
    reference (excess −5) is selected, which the signed default would never select."""
    policy = torch.tensor([[[0.0], [3.0], [1.0]]])
    ref = torch.tensor([[[5.0], [2.0], [1.0]]])
    valid = torch.ones(1, 3, 1, dtype=torch.bool)
    w, _, _ = rho1_weights(policy, ref, valid, ratio=1 / 3, mode="absolute")
    assert w[0, :, 0].tolist() == [1.0, 0.0, 0.0]
    w_signed, _, _ = rho1_weights(policy, ref, valid, ratio=1 / 3)
    assert w_signed[0, :, 0].tolist() == [0.0, 1.0, 0.0]


def test_lambda_schedule_bounds_defaults_and_argument_errors():
    from wmtp_fn.losses.critic import lambda_at

    assert lambda_at(100) == 1.0  # default: constant at start = 1 (Monte-Carlo)
    assert lambda_at(3, start=0.0) == 0.0  # the bounds are inclusive
    assert lambda_at(10, schedule="linear", start=1.0, end=0.5, warmup_steps=0, decay_steps=1) == 0.5
    for key, kwargs, shown in (("start", dict(start=1.5), "1.5"), ("end", dict(end=-0.1), "-0.1")):
        with pytest.raises(ConfigError, match=rf"critic.lambda_schedule.{key} must be in \[0, 1\], got {shown}"):
            lambda_at(0, **kwargs)
    for step in (-1, 2.5, True):
        with pytest.raises(ValueError, match=rf"step must be an int >= 0, got {step!r}"):
            lambda_at(step, schedule="linear")
    for decay in (0, 1.5, True):
        with pytest.raises(ConfigError, match=rf"decay_steps must be an int >= 1, got {decay!r}"):
            lambda_at(0, schedule="cosine", decay_steps=decay)


def test_auc_by_hand_with_ties_and_its_shape_error():
    from wmtp_fn.losses.critic import auc

    # positives 0.9, 0.5; negatives 0.5, 0.1: pairs (0.9>0.5, 0.9>0.1, 0.5=0.5 -> 1/2, 0.5>0.1) = 3.5 / 4
    got = auc(torch.tensor([0.9, 0.5, 0.5, 0.1], dtype=torch.float32), torch.tensor([1, 1, 0, 0]))
    assert got.dtype == torch.float64 and got.item() == 0.875
    with pytest.raises(ValueError, match=r"auc expects scores \[N\] and labels \[N\], got \(2, 2\), \(4,\)"):
        auc(torch.zeros(2, 2), torch.zeros(4))
    with pytest.raises(ValueError, match=r"got \(4,\), \(3,\)"):
        auc(torch.zeros(4), torch.zeros(3))


def test_sequence_value_stats_by_hand_on_tiny_and_constant_values():
    """Row 0 rises by 1e-3 a step (a perfect position correlation however small the scale), row 1
    is constant (correlation ~0, variance 0), row 2 has one jump (spikiness max/mean = 3/1.5)."""
    from wmtp_fn.losses.critic import sequence_value_stats

    v = torch.tensor([[0.0, 1e-3, 2e-3, 3e-3], [0.5, 0.5, 0.5, 0.5], [0.0, 0.0, 3.0, 9.0]], dtype=torch.float32)
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 1, 1], [1, 1, 1, 0]])
    stats = sequence_value_stats(v, mask)
    corr, ok = stats["position_corr"]
    assert ok.tolist() == [True, True, True]
    assert corr[0].item() == pytest.approx(1.0, abs=1e-6) and corr[1].item() == pytest.approx(0.0, abs=1e-6)
    assert corr.dtype == torch.float64
    var, _ = stats["token_variance"]
    assert var[1].item() == pytest.approx(0.0, abs=1e-12) and var[0].item() == pytest.approx(float(torch.tensor([0, 1e-3, 2e-3, 3e-3]).double().var()), rel=1e-5)
    spike, spike_ok = stats["spikiness"]
    assert spike_ok.tolist() == [True, True, True] and spike[2].item() == pytest.approx(3.0 / 1.5)


def test_head_token_nll_honours_a_custom_ignore_index_and_checks_shapes():
    from wmtp_fn.losses.mtp import head_token_nll

    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(2, 5, 8, generator=gen, dtype=torch.float64)
    unembedding = torch.randn(11, 8, generator=gen, dtype=torch.float64)
    labels = torch.tensor([[1, 2, 3, -100, 4], [5, -100, 6, 7, 8]])
    want_nll, want_valid = head_token_nll(hidden, unembedding, labels, 2)
    custom = torch.where(labels == -100, torch.full_like(labels, -7), labels)
    got_nll, got_valid = head_token_nll(hidden, unembedding, custom, 2, ignore_index=-7)
    assert torch.equal(got_valid, want_valid) and torch.equal(got_nll, want_nll)
    # head 2 at t predicts labels[t + 2]: by hand for one position
    logp = torch.log_softmax(hidden[0, 0] @ unembedding.T, dim=-1)
    assert want_nll[0, 0].item() == pytest.approx(-logp[3].item(), abs=1e-12) and not want_valid[0, 1]
    with pytest.raises(ValueError, match=r"head_token_nll expects hidden \[B, T, d\] and labels \[B, T\]; got \(2, 5, 8\), \(2, 4\)"):
        head_token_nll(hidden, unembedding, labels[:, :4], 1)


def test_td_weights_pass_their_clip_and_temperature_on():
    from wmtp_fn.losses.weighting import td_weights, validation_td_weights

    adv = torch.tensor([[-4.0, -0.5, 0.0, 0.5, 4.0]], dtype=torch.float64)
    mask = torch.ones(1, 5)
    mean, std = torch.tensor(0.0, dtype=torch.float64), torch.tensor(1.0, dtype=torch.float64)
    w = td_weights(adv, mask, mean, std, beta=2.0, w_min=0.5, w_max=1.5)
    want = torch.exp(adv / (1.0 + 1e-8) / 2.0).clamp(0.5, 1.5)
    assert torch.allclose(w, want, atol=1e-12) and w.min() == 0.5 and w.max() == 1.5
    vw, vmean, vstd = validation_td_weights(adv, mask, beta=2.0, w_min=0.5, w_max=1.5)
    assert torch.allclose(vw, td_weights(adv, mask, vmean, vstd, beta=2.0, w_min=0.5, w_max=1.5), atol=0)
    assert vw.min() == 0.5 and vw.max() == 1.5
