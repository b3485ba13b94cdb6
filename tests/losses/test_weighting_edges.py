"""TD weighting at its edges, by hand: the shape messages, the logged statistics of zero, one
and two tokens, the whitening warm-up default, the control modes' defaults, bounds and the
caller's generator (surviving mutants of losses.weighting)."""

import math

import pytest
import torch

from wmtp_fn.errors import ConfigError
from wmtp_fn.losses.weighting import (
    clip_weights,
    control_weights,
    gae,
    init_whitening,
    lognormal_weights,
    moments,
    random_weights,
    raw_weights,
    reverse_discounted_cumsum,
    shuffle_weights,
    td_advantages,
    td_errors,
    update_whitening,
    validation_td_weights,
    weight_stats,
    weight_sums,
    whitening_sums,
)


def test_shape_messages_name_the_function_and_both_shapes():
    w, m = torch.ones(2, 3), torch.ones(2, 4)
    with pytest.raises(ValueError, match=r"^random_weights expects \[B, T\] tensors of one shape, "
                                         r"got \{'critic_w': \(2, 3\), 'mask': \(2, 4\)\}$"):
        random_weights(w, m)
    with pytest.raises(ValueError, match=r"^shuffle_weights expects \[B, T\] tensors of one shape, "
                                         r"got \{'w': \(2, 3\), 'scope': \(2, 4\)\}$"):
        shuffle_weights(w, m)


def test_statistics_of_no_token_are_all_zero():
    stats = weight_stats(weight_sums(torch.full((1, 3), 2.0), torch.zeros(1, 3)))
    assert {k: v.item() for k, v in stats.items()} == {
        "mean": 0.0, "std": 0.0, "min": 0.0, "max": 0.0, "entropy": 0.0, "normalized_entropy": 0.0}


def test_normalized_entropy_of_one_and_two_tokens():
    # one token: the uniform value 1
    assert weight_stats(weight_sums(torch.tensor([[2.0, 5.0]]), torch.tensor([[1, 0]])))["normalized_entropy"].item() == 1.0
    # two tokens w = (1, 3): p = (1/4, 3/4), H = −(¼ ln ¼ + ¾ ln ¾) = 0.5623, / ln 2 = 0.8113
    got = weight_stats(weight_sums(torch.tensor([[1.0, 3.0]]), torch.ones(1, 2)))["normalized_entropy"].item()
    want = -(0.25 * math.log(0.25) + 0.75 * math.log(0.75)) / math.log(2)
    assert got == pytest.approx(want, abs=1e-9)


def test_whitening_warmup_defaults_to_ten_updates():
    """Ten batches of mean 0, then one of mean 1: the 11th update is the first past the warm-up,
    μ = 0.9 · 0 + 0.1 · 1 = 0.1 (a warm-up of 11 would give 1/11)."""
    stats = init_whitening()
    for _ in range(10):
        stats = update_whitening(stats, torch.tensor([0.0, 2.0, 2.0], dtype=torch.float64))  # x = ±1
    assert stats["mean"].item() == 0.0 and stats["std"].item() == pytest.approx(1.0)
    stats = update_whitening(stats, torch.tensor([2.0, 4.0, 2.0], dtype=torch.float64))  # x = 0, 2
    assert stats["mean"].item() == pytest.approx(0.1, abs=1e-12)
    assert int(stats["updates"]) == 11


def test_validation_weights_of_a_tiny_batch_keep_the_advantages_dtype():
    adv = torch.tensor([[0.3, -0.2]], dtype=torch.float32)
    w, _, _ = validation_td_weights(adv, torch.tensor([[1.0, 0.0]], dtype=torch.float64))
    assert w.dtype == torch.float32 and w.tolist() == [[1.0, 0.0]]


def test_lognormal_weights_are_exp_of_mu_plus_s_times_the_generators_normals():
    """mean 1.5, std 0.6: s² = ln(1 + 0.16) and μ = ln 1.5 − s²/2, in float64 by hand, applied
    to the generator's own N(0, 1) draws."""
    mask = torch.tensor([[1, 1, 0, 1]])
    got = lognormal_weights(mask, 1.5, 0.6, generator=torch.Generator().manual_seed(3))
    z = torch.randn(1, 4, generator=torch.Generator().manual_seed(3)).double()
    s2 = math.log(1 + (0.6 / 1.5) ** 2)
    want = torch.exp(math.log(1.5) - s2 / 2 + math.sqrt(s2) * z) * mask
    torch.testing.assert_close(got.double(), want, rtol=1e-6, atol=0)


def test_random_weights_match_the_batch_by_default():
    """A constant batch of critic weights 0.5: matched draws stay at 0.5 (its spread is the
    1e-4 floor), unlike the seeds' fixed LogNormal(1.328, 0.981)."""
    mask = torch.ones(4, 50)
    w = random_weights(torch.full((4, 50), 0.5), mask, generator=torch.Generator().manual_seed(0))
    assert (w - 0.5).abs().max() < 0.01


def test_random_weights_of_one_and_two_tokens():
    """One valid token: no spread, the weight is the critic weight itself (not one drawn with
    the moments' 1e-4 floor, let alone σ = 1). Two tokens (1, 3): mean 2, std 1, so the two
    draws differ."""
    cw, mask = torch.tensor([[0.0, 1.7, 0.0]]), torch.tensor([[0, 1, 0]])
    for seed in range(4):
        w = random_weights(cw, mask, generator=torch.Generator().manual_seed(seed))
        assert w[0, 1].item() == pytest.approx(1.7, rel=1e-6) and w[0, 0] == 0 and w[0, 2] == 0
    two = random_weights(torch.tensor([[1.0, 3.0]]), torch.ones(1, 2), generator=torch.Generator().manual_seed(1))
    assert abs(two[0, 0].item() - two[0, 1].item()) > 1e-3


def test_random_controls_clip_to_their_bounds_and_default_to_0_1_and_3():
    """The seeds' fixed LogNormal(1.328, 0.981) reaches below 0.5 and above 2 (and below 0.1 and
    above 3) in 20 000 draws: each given bound, and each default, is attained exactly."""
    cw, mask = torch.ones(100, 200), torch.ones(100, 200)
    for fn in (lambda **kw: random_weights(cw, mask, matched=False, **kw),
               lambda **kw: control_weights("random", cw, mask, random_matched=False, **kw)):
        w = fn(w_min=0.5, w_max=2.0, generator=torch.Generator().manual_seed(2))
        assert w.min().item() == 0.5 and w.max().item() == 2.0
        d = fn(generator=torch.Generator().manual_seed(2))
        assert d.min().item() == pytest.approx(0.1) and d.max().item() == 3.0


def test_shuffles_follow_the_callers_generator_not_the_global_rng():
    g = torch.Generator().manual_seed(1)
    w = torch.rand(3, 8, generator=g)
    mask = (torch.rand(3, 8, generator=g) > 0.3).int()
    for call in (lambda gen: shuffle_weights(w, mask, generator=gen),
                 lambda gen: control_weights("shuffled", w, mask, generator=gen),
                 lambda gen: control_weights("shuffled", w, mask, attention_mask=torch.ones(3, 8),
                                             shuffle_scope="attended", generator=gen)):
        torch.manual_seed(10)
        a = call(torch.Generator().manual_seed(7))
        torch.manual_seed(11)
        b = call(torch.Generator().manual_seed(7))
        c = call(torch.Generator().manual_seed(8))
        assert torch.equal(a, b) and not torch.equal(a, c)


def test_shuffle_scope_messages():
    w, mask = torch.ones(1, 3), torch.ones(1, 3)
    with pytest.raises(ValueError, match=r"^control_weights\(shuffle_scope='attended'\) needs the batch's attention_mask$"):
        control_weights("shuffled", w, mask, shuffle_scope="attended")
    with pytest.raises(ConfigError, match=r"^td\.shuffle_scope must be 'response' or 'attended', got 'prompt'$"):
        control_weights("shuffled", w, mask, shuffle_scope="prompt")


def test_td_errors_names_gamma_in_its_message():
    with pytest.raises(ConfigError, match=r"^td\.gamma must be in \[0, 1\], got 1\.5$"):
        td_errors(torch.zeros(1, 2), gamma=1.5)


def test_whitening_sums_square_in_float64():
    """4097² = 16 785 409 is not an fp32 number (above 2²⁴, odd): Σx² = 33 570 818 exactly only
    if the squares are taken in float64 (fp32 can only give a multiple of 4 there)."""
    got = whitening_sums(torch.tensor([[4097.0, 4097.0]]), torch.ones(1, 2))
    assert got.tolist() == [8194.0, 33570818.0, 2.0]


def test_unbiased_moments_of_two_values_by_hand():
    # x = (1, 3): Σ = 4, Σx² = 10, μ = 2, unbiased var = (10 − 2·2²)/(2 − 1) = 2
    mean, std = moments(torch.tensor([4.0, 10.0, 2.0], dtype=torch.float64), unbiased=True)
    assert mean.item() == 2.0 and std.item() == pytest.approx(math.sqrt(2.0), abs=1e-15)


def test_td_errors_gae_and_advantages_defaults_by_hand():
    """v = (0.2, 0.7), both tokens scored. Defaults γ = 1, v₋₁ = 0.5: δ = (0.2 − 0.5, 0.7 − 0.2)
    = (−0.3, 0.5); GAE with λ = 0.95: A₁ = 0.5, A₀ = −0.3 + 0.95 · 0.5 = 0.175. At λ = γ = 1 the
    default is the recursion (A₀ = 0.2), not the Monte-Carlo rule R − v = (0.8, 0.3)."""
    v, m = torch.tensor([[0.2, 0.7]], dtype=torch.float64), torch.ones(1, 2)
    torch.testing.assert_close(td_errors(v), torch.tensor([[-0.3, 0.5]], dtype=torch.float64))
    torch.testing.assert_close(gae(torch.tensor([[-0.3, 0.5]], dtype=torch.float64), m),
                               torch.tensor([[0.175, 0.5]], dtype=torch.float64))
    torch.testing.assert_close(td_advantages(v, m), torch.tensor([[0.175, 0.5]], dtype=torch.float64))
    torch.testing.assert_close(td_advantages(v, m, lam=1.0), torch.tensor([[0.2, 0.5]], dtype=torch.float64))


def test_gae_and_advantages_messages():
    good, short = torch.zeros(1, 2), torch.ones(1, 3)
    with pytest.raises(ValueError, match=r"^gae expects \[B, T\] tensors of one shape, got \{'delta': \(1, 2\), 'mask': \(1, 3\)\}$"):
        gae(good, short)
    with pytest.raises(ValueError, match=r"^td_advantages expects \[B, T\] tensors of one shape, "
                                         r"got \{'values': \(1, 2\), 'mask': \(1, 3\)\}$"):
        td_advantages(good, short)
    with pytest.raises(ConfigError, match=r"^td\.gamma must be in \[0, 1\], got 1\.5$"):
        gae(good, torch.ones(1, 2), gamma=1.5)
    with pytest.raises(ConfigError, match=r"^td\.lam must be in \[0, 1\], got -0\.1$"):
        gae(good, torch.ones(1, 2), lam=-0.1)
    with pytest.raises(ConfigError, match=r"^discount must be in \[0, 1\], got 1\.5$"):
        reverse_discounted_cumsum(good, 1.5)


def test_raw_and_clipped_weights_defaults():
    # β = 1: exp((1 − 0)/(1 + 1e-8)) = e; clip to [0.1, 3]
    assert raw_weights(torch.tensor([[1.0]]), 0.0, 1.0).item() == pytest.approx(math.e, rel=1e-6)
    got = clip_weights(torch.tensor([[0.05, 1.0, 5.0]]), torch.ones(1, 3))
    assert got.tolist() == [[pytest.approx(0.1), 1.0, 3.0]]
