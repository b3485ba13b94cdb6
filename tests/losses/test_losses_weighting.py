"""TD weighting: TD errors, GAE, running and batch whitening, clipped weights, the logged
statistics and the control modes. Golden values are worked out by hand in the comments; the
property tests compare with float64 loops written here, independently of the vectorised code."""

import math

import pytest
import torch
from hypothesis import given, settings, strategies as st

from wmtp_fn.errors import ConfigError
from wmtp_fn.losses.weighting import (
    control_weights,
    init_whitening,
    moments,
    random_weights,
    reverse_discounted_cumsum,
    shuffle_weights,
    td_advantages,
    td_errors,
    td_weights,
    update_whitening,
    validation_td_weights,
    weight_stats,
    weight_sums,
    whitening_sums,
)

F64 = torch.float64


def t(rows, dtype=F64):
    return torch.tensor(rows, dtype=dtype)


# ------------------------------------------------------------------- float64 loop references


def gae_loop(values, mask, gamma, lam, initial_value):
    """The recursion as written: for each row walk back from its last response token."""
    B, T = len(values), len(values[0])
    out = [[0.0] * T for _ in range(B)]
    for b in range(B):
        valid = [i for i in range(T) if mask[b][i]]
        if not valid:
            continue
        running = 0.0
        for i in range(valid[-1], -1, -1):
            previous = values[b][i - 1] if i > 0 else initial_value
            delta = gamma * values[b][i] - previous
            running = delta + gamma * lam * running
            out[b][i] = running if mask[b][i] else 0.0
    return out


# ----------------------------------------------------------------------------- TD and GAE

# One row: prompt at positions 0-1, response at 2-3, padding at 4 (a garbage value that must
# never reach the response).
V1 = [[0.2, 0.4, 0.7, 0.5, 9.0]]
M1 = [[0, 0, 1, 1, 0]]


def test_td_errors_first_response_token_uses_last_prompt_value():
    # δ_t = γ v_t − v_{t−1}, γ = 0.9, v_{−1} = 0.5:
    # δ0 = 0.18 − 0.5, δ1 = 0.36 − 0.2, δ2 = 0.63 − 0.4 (last prompt value), δ3 = 0.45 − 0.7, δ4 = 8.1 − 0.5
    delta = td_errors(t(V1), gamma=0.9, initial_value=0.5)
    torch.testing.assert_close(delta, t([[-0.32, 0.16, 0.23, -0.25, 7.6]]))


def test_gae_golden_gamma_below_one_with_prompt_and_padding():
    # γλ = 0.45: A3 = δ3 = −0.25 (nothing after the last response token, padding ignored),
    # A2 = 0.23 + 0.45·(−0.25) = 0.1175; prompt and padding masked.
    adv = td_advantages(t(V1), t(M1), gamma=0.9, lam=0.5, initial_value=0.5)
    torch.testing.assert_close(adv, t([[0.0, 0.0, 0.1175, -0.25, 0.0]]))


def test_gae_lambda_zero_is_the_masked_td_error():
    adv = td_advantages(t(V1), t(M1), gamma=0.9, lam=0.0, initial_value=0.5)
    torch.testing.assert_close(adv, t([[0.0, 0.0, 0.23, -0.25, 0.0]]))


# prompt 0-1, response 2-4, padding 5; γ = 1 so δ = [0, 0.1, −0.3, 0.5, −0.4, ...]
V2 = [[0.5, 0.6, 0.3, 0.8, 0.4, 7.0]]
M2 = [[0, 0, 1, 1, 1, 0]]


def test_gae_lambda_095():
    # A4 = −0.4; A3 = 0.5 + 0.95·(−0.4) = 0.12; A2 = −0.3 + 0.95·0.12 = −0.186
    adv = td_advantages(t(V2), t(M2), gamma=1.0, lam=0.95, initial_value=0.5)
    torch.testing.assert_close(adv, t([[0.0, 0.0, -0.186, 0.12, -0.4, 0.0]]))


def test_lambda_one_special_case_and_its_discontinuity():
    # seeds' rule: A = R − v = 1 − v on the response
    mc = td_advantages(t(V2), t(M2), gamma=1.0, lam=1.0, mc_at_lambda_one=True)
    torch.testing.assert_close(mc, t([[0.0, 0.0, 0.7, 0.2, 0.6, 0.0]]))
    # the recursion itself telescopes to v_last − v_{t−1}: 0.4 − [0.6, 0.3, 0.8]
    rec = td_advantages(t(V2), t(M2), gamma=1.0, lam=1.0, mc_at_lambda_one=False)
    torch.testing.assert_close(rec, t([[0.0, 0.0, -0.2, 0.1, -0.4, 0.0]]))
    # the flag only acts at λ = γ = 1
    near = td_advantages(t(V2), t(M2), gamma=1.0, lam=0.95, mc_at_lambda_one=True)
    torch.testing.assert_close(near, td_advantages(t(V2), t(M2), gamma=1.0, lam=0.95))


def test_initial_value_reaches_a_response_that_starts_at_position_zero():
    # δ0 = γ v0 − initial_value: 0.3 − 0.5 and 0.3 − 0.0
    v, m = t([[0.3, 0.6]]), t([[1, 0]])
    assert td_advantages(v, m, lam=0.0, initial_value=0.5)[0, 0].item() == pytest.approx(-0.2)
    assert td_advantages(v, m, lam=0.0, initial_value=0.0)[0, 0].item() == pytest.approx(0.3)


@settings(max_examples=60)
@given(
    B=st.integers(1, 4),
    T=st.integers(1, 24),
    gamma=st.floats(0.0, 1.0),
    lam=st.floats(0.0, 1.0),
    initial_value=st.floats(-1.0, 1.0),
    seed=st.integers(0, 2**16),
)
def test_gae_equals_float64_loop_on_random_inputs_and_masks(B, T, gamma, lam, initial_value, seed):
    g = torch.Generator().manual_seed(seed)
    values = torch.randn(B, T, generator=g, dtype=F64)
    mask = torch.rand(B, T, generator=g) < 0.6  # arbitrary masks, holes and empty rows included
    ref = t(gae_loop(values.tolist(), mask.tolist(), gamma, lam, initial_value))
    got = td_advantages(values, mask, gamma=gamma, lam=lam, initial_value=initial_value)
    torch.testing.assert_close(got, ref, rtol=1e-10, atol=1e-10)
    got32 = td_advantages(values.float(), mask, gamma=gamma, lam=lam, initial_value=initial_value)
    torch.testing.assert_close(got32.double(), ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("discount", [0.5, 0.95, 0.999, 1.0])
def test_discounted_sum_is_stable_at_length_2048(discount):
    """fp32 inputs of length 2048, where a (γλ)^(−t) rescaling would overflow (0.95^−2048 ≈ 1e45)."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 2048, generator=g)
    ref = torch.zeros(2, 2048, dtype=F64)
    acc = torch.zeros(2, dtype=F64)
    xd = x.double()
    for i in range(2047, -1, -1):
        acc = xd[:, i] + discount * acc
        ref[:, i] = acc
    got = reverse_discounted_cumsum(x, discount)
    assert got.dtype == torch.float32 and torch.isfinite(got).all()
    torch.testing.assert_close(got.double(), ref, rtol=1e-6, atol=1e-4)


def test_bad_discounts_are_named():
    with pytest.raises(ConfigError, match="lam"):
        td_advantages(t(V1), t(M1), lam=1.5)
    with pytest.raises(ConfigError, match="gamma"):
        td_errors(t(V1), gamma=-0.1)


# ------------------------------------------------------------------------------- whitening

# Three steps of valid tokens: [1, 3] (μ 2, σ 1), [0, 0, 6] (μ 2, σ √8), [5] (μ 5, σ √1e-8 = 1e-4).
STEPS = [[1.0, 3.0], [0.0, 0.0, 6.0], [5.0]]


def run_steps(steps, **kw):
    stats = init_whitening()
    history = []
    for xs in steps:
        # two micro-batches per step, summed before the single update (as the prepare pass does)
        half = len(xs) // 2
        parts = [xs[:half], xs[half:]]
        total = sum(whitening_sums(t([p + [99.0]]), t([[1] * len(p) + [0]])) for p in parts)
        stats = update_whitening(stats, total, **kw)
        history.append((stats["mean"].item(), stats["std"].item(), stats["updates"].item()))
    return history


def test_running_statistics_three_steps_in_warmup():
    # W = 10: weight of the old statistics (n−1)/W = 0, 0.1, 0.2
    # n1: μ 2, σ 1; n2: μ 0.1·2 + 0.9·2 = 2, σ 0.1·1 + 0.9·√8 = 2.6455844
    # n3: μ 0.2·2 + 0.8·5 = 4.4, σ 0.2·2.6455844 + 0.8·1e-4 = 0.5291969
    h = run_steps(STEPS, warmup=10, alpha=0.1)
    expected = [(2.0, 1.0, 1), (2.0, 0.1 + 0.9 * math.sqrt(8), 2), (4.4, 0.2 * (0.1 + 0.9 * math.sqrt(8)) + 0.8e-4, 3)]
    for (m, s, n), (em, es, en) in zip(h, expected):
        assert m == pytest.approx(em, abs=1e-12) and s == pytest.approx(es, abs=1e-12) and n == en


def test_running_statistics_leave_warmup_for_the_ema():
    # W = 2, α = 0.25: n1 batch; n2 old weight 1/2: σ 0.5 + 0.5·√8; n3 > W: EMA 0.75 old + 0.25 new
    h = run_steps(STEPS, warmup=2, alpha=0.25)
    s2 = 0.5 + 0.5 * math.sqrt(8)
    assert h[1][:2] == pytest.approx((2.0, s2), abs=1e-12)
    assert h[2][:2] == pytest.approx((0.75 * 2 + 0.25 * 5, 0.75 * s2 + 0.25e-4), abs=1e-12)


def test_step_without_valid_tokens_leaves_statistics_unchanged():
    stats = update_whitening(init_whitening(), whitening_sums(t([[1.0, 3.0]]), t([[1, 1]])))
    same = update_whitening(stats, whitening_sums(t([[5.0, 7.0]]), t([[0, 0]])))
    assert same["mean"].item() == 2.0 and same["std"].item() == 1.0 and same["updates"].item() == 1
    empty = update_whitening(init_whitening(), torch.zeros(3, dtype=F64))
    assert empty["mean"].item() == 0.0 and empty["std"].item() == 1.0 and empty["updates"].item() == 0


def test_population_std_has_the_floor():
    # one token: E[x²] − E[x]² = 0, floored at 1e-8 -> σ = 1e-4
    mean, std = moments(whitening_sums(t([[2.5]]), t([[1]])))
    assert mean.item() == 2.5 and std.item() == pytest.approx(1e-4)


# --------------------------------------------------------------------------------- weights


def test_weights_with_clipping_golden():
    # Â = (A − 0.5)/(0.5 + 1e-8) ≈ [−7, −1, 0, 3, 9], /β (β = 2) = [−3.5, −0.5, 0, 1.5, 4.5]
    # exp = [0.0302, 0.6065, 1, 4.4817, 90.0] -> clip [0.1, 3]; the last token is masked
    adv = t([[-3.0, 0.0, 0.5, 2.0, 5.0]])
    mask = t([[1, 1, 1, 1, 0]])
    w = td_weights(adv, mask, torch.tensor(0.5, dtype=F64), torch.tensor(0.5, dtype=F64), beta=2.0, w_min=0.1, w_max=3.0)
    torch.testing.assert_close(w, t([[0.1, math.exp(-0.5), 1.0, 3.0, 0.0]]), rtol=1e-7, atol=1e-7)


def test_first_step_weights_are_unwhitened():
    adv, mask = t([[0.2, -0.4]]), t([[1, 1]])
    stats = init_whitening()
    w = td_weights(adv, mask, stats["mean"], stats["std"], beta=1.0, w_min=0.0, w_max=10.0)
    torch.testing.assert_close(w, torch.exp(adv), rtol=1e-7, atol=0)


def test_validation_weights_use_the_batch_unbiased_std():
    # valid A = [1, 2, 3]: μ = 2, unbiased σ = 1 (population would be 0.816) -> w = exp([−1, 0, 1])
    adv = t([[1.0, 2.0, 50.0], [3.0, -9.0, -9.0]])
    mask = t([[1, 1, 0], [1, 0, 0]])
    w, mean, std = validation_td_weights(adv, mask, beta=1.0, w_min=0.0, w_max=100.0)
    assert mean.item() == pytest.approx(2.0) and std.item() == pytest.approx(1.0)
    torch.testing.assert_close(w, t([[math.exp(-1), 1.0, 0.0], [math.exp(1), 0.0, 0.0]]), rtol=1e-6, atol=1e-7)


def test_validation_with_one_valid_token_gives_the_mask():
    w, _, _ = validation_td_weights(t([[0.3, 8.0]]), t([[1, 0]]), w_min=0.5, w_max=0.6)
    assert w.tolist() == [[1.0, 0.0]]


def test_all_masked_gives_zero_weights_and_no_nan():
    values = t([[0.1, 1e30, float("nan")], [2.0, -1e30, 0.0]])
    mask = torch.zeros(2, 3)
    adv = td_advantages(values, mask)
    assert torch.equal(adv, torch.zeros_like(adv))
    stats = update_whitening(init_whitening(), whitening_sums(adv, mask))
    w = td_weights(values, mask, stats["mean"], stats["std"])  # huge / nan values off the mask
    vw, vm, vs = validation_td_weights(adv, mask)
    assert torch.equal(w, torch.zeros_like(w)) and torch.equal(vw, torch.zeros_like(vw))
    for stat in weight_stats(weight_sums(w, mask, raw=w)).values():
        assert torch.isfinite(stat)
    for mode in ("uniform", "random", "shuffled"):
        cw = control_weights(mode, w, mask, generator=torch.Generator().manual_seed(0))
        assert torch.equal(cw, torch.zeros_like(cw))


def test_weight_statistics_golden_and_additive():
    w = t([[0.5, 1.0, 0.0], [2.5, 0.0, 0.0]])
    mask = t([[1, 1, 0], [1, 0, 0]])
    raw = t([[0.05, 1.0, 7.0], [4.0, 7.0, 7.0]])  # two of three valid raw weights outside [0.1, 3]
    split = [weight_sums(w[i : i + 1], mask[i : i + 1], raw[i : i + 1]) for i in range(2)]
    reduced = {k: (min if k == "min" else max if k == "max" else sum)(s[k] for s in split) for k in split[0]}
    stats = weight_stats(reduced)
    ws = [0.5, 1.0, 2.5]
    total = sum(ws)
    mean = total / 3
    p = [x / total for x in ws]
    expected = {
        "mean": mean,
        "std": math.sqrt(sum((x - mean) ** 2 for x in ws) / 3),
        "min": 0.5,
        "max": 2.5,
        "entropy": -sum(x * math.log(x + 1e-10) for x in ws) / 3,
        "normalized_entropy": -sum(q * math.log(q) for q in p) / math.log(3),
        "clip_ratio": 2 / 3,
    }
    for k, v in expected.items():
        assert stats[k].item() == pytest.approx(v, rel=1e-8), k


# ---------------------------------------------------------------------------- control modes


def response_batch(seed=0, B=6, T=20):
    """Prompt, response, right padding per row, and critic weights on the response only."""
    g = torch.Generator().manual_seed(seed)
    mask = torch.zeros(B, T, dtype=torch.long)
    attn = torch.zeros(B, T, dtype=torch.long)
    for b in range(B):
        p = int(torch.randint(1, 5, (1,), generator=g))
        n = int(torch.randint(p + 1, T + 1, (1,), generator=g))
        attn[b, :n] = 1
        mask[b, p:n] = 1
    w = torch.where(mask.bool(), 0.1 + 2.9 * torch.rand(B, T, generator=g), 0.0)
    return w, mask, attn


def test_shuffled_keeps_each_sequence_multiset_and_stays_on_the_response():
    w, mask, attn = response_batch()
    moved = False
    for seed in range(5):
        s = control_weights("shuffled", w, mask, attention_mask=attn, generator=torch.Generator().manual_seed(seed))
        assert torch.equal(s[mask == 0], torch.zeros_like(s[mask == 0]))  # never onto prompt/padding
        for b in range(w.shape[0]):
            assert torch.equal(torch.sort(s[b][mask[b] == 1]).values, torch.sort(w[b][mask[b] == 1]).values)
        moved |= not torch.equal(s, w)
    assert moved


def test_shuffled_is_a_uniform_permutation():
    """3 response tokens: each of the 6 orders should come up 1/6 of the time. 6000 draws give a
    standard error of sqrt(p(1−p)/n) ≈ 0.0048 per order; 0.025 is > 5 standard errors."""
    w = torch.tensor([[0.0, 1.0, 2.0, 3.0, 0.0]]).expand(6000, 5).contiguous()
    mask = torch.tensor([[0, 1, 1, 1, 0]]).expand(6000, 5)
    s = shuffle_weights(w, mask, generator=torch.Generator().manual_seed(1))
    _, counts = torch.unique(s[:, 1:4], dim=0, return_counts=True)
    assert len(counts) == 6
    assert (counts / 6000 - 1 / 6).abs().max() < 0.025


def test_seeds_shuffle_moves_weights_over_all_attended_positions():
    w, mask, attn = response_batch(seed=2)
    s = control_weights("shuffled", w, mask, attention_mask=attn, shuffle_scope="attended",
                        generator=torch.Generator().manual_seed(0))
    for b in range(w.shape[0]):
        assert torch.equal(torch.sort(s[b][attn[b] == 1]).values, torch.sort(w[b][attn[b] == 1]).values)
    assert torch.equal(s[attn == 0], torch.zeros_like(s[attn == 0]))
    assert (s[(attn == 1) & (mask == 0)] > 0).any()  # response weights landed on the prompt


def test_random_matched_follows_each_batch_moments():
    """Per batch, the LogNormal weights match the critic weights' mean and (population) std.
    The two batches have moments (1.04, 0.32) and (1.40, 0.23). With N = 40 000 draws the
    standard error of the mean is std/√N ≤ 0.0016, and that of the std, for a LogNormal with this
    spread (kurtosis κ ≈ 4.6), about std·sqrt((κ−1)/N)/2 ≤ 0.0016; the tolerance 0.01 is > 6
    standard errors, while the batches differ by 0.36 in mean and 0.09 in std (and the seeds'
    fixed 1.328 / 0.981 are further still), so moments not taken from the batch at hand fail."""
    g = torch.Generator().manual_seed(5)
    mask = torch.ones(200, 201)
    mask[:, 0] = 0  # the prompt
    batches = [torch.exp(0.3 * torch.randn(200, 201, generator=g)), 1.2 + 0.8 * torch.rand(200, 201, generator=g) ** 3]
    for cw in batches:
        cw = cw * mask
        target_mean, target_std = moments(whitening_sums(cw, mask))
        w = random_weights(cw, mask, matched=True, generator=torch.Generator().manual_seed(9))
        valid = w[mask == 1].double()
        assert torch.equal(w[mask == 0], torch.zeros(200))
        assert (valid > 0).all()
        assert abs(valid.mean() - target_mean) < 0.01
        assert abs(valid.std(correction=0) - target_std) < 0.01


def test_seeds_random_is_fixed_lognormal_clamped():
    """Same generator, two very different batches: identical weights (the distribution does not
    look at the batch). 40 000 draws: mean within 0.02 of the clamped LogNormal(1.328, 0.981)
    mean, integrated numerically here (SE ≈ 0.8/√N = 0.004)."""
    mask = torch.ones(200, 200)
    a = random_weights(torch.full((200, 200), 0.2), mask, matched=False, generator=torch.Generator().manual_seed(4))
    b = random_weights(torch.full((200, 200), 2.9), mask, matched=False, generator=torch.Generator().manual_seed(4))
    assert torch.equal(a, b)
    assert a.min() >= 0.1 and a.max() <= 3.0
    s2 = math.log(1 + (0.981 / 1.328) ** 2)
    mu, s = math.log(1.328) - s2 / 2, math.sqrt(s2)
    z = torch.linspace(-10, 10, 200_001, dtype=F64)
    density = torch.exp(-z * z / 2) / math.sqrt(2 * math.pi)
    clamped_mean = (torch.exp(mu + s * z).clamp(0.1, 3.0) * density).sum() * (z[1] - z[0])
    assert abs(a.double().mean() - clamped_mean) < 0.02


def test_uniform_and_critic_modes_and_bad_mode():
    w, mask, _ = response_batch(seed=3)
    assert torch.equal(control_weights("uniform", w, mask), mask.float())
    assert control_weights("critic", w, mask) is w
    with pytest.raises(ConfigError, match="control mode"):
        control_weights("noise", w, mask)


def test_weight_sums_by_hand_at_the_clip_bounds_a_zero_weight_and_one_token():
    """Hand-computed sums: a raw weight exactly at w_min or w_max is not clipped, a valid zero
    weight adds 0 to Σ w·log(w + 1e-10) (not NaN), every sum is fp64, and one valid token's
    statistics are that token's weight."""
    w = torch.tensor([[0.1, 3.0, 0.1, 3.0, 0.0, 2.0]], dtype=torch.float32)
    raw = torch.tensor([[0.1, 3.0, 0.05, 3.5, 0.0, 2.0]])
    mask = torch.tensor([[1, 1, 1, 1, 1, 0]])
    sums = weight_sums(w, mask, raw, w_min=0.1, w_max=3.0)
    assert all(v.dtype == torch.float64 for v in sums.values())
    assert sums["clipped"].item() == 3  # 0.05, 3.5 and the raw 0.0 — not the two at the bounds
    wd = w.double()[0, :5]
    assert sums["w_log_w_sum"].item() == pytest.approx(float((wd * torch.log(wd + 1e-10)).sum()), abs=1e-12)
    assert (sums["n"].item(), sums["w_sum"].item()) == (5, pytest.approx(6.2, abs=1e-6))

    one = weight_stats(weight_sums(torch.tensor([[2.5, 9.0]]), torch.tensor([[1, 0]])))
    assert one["mean"].item() == pytest.approx(2.5) and one["std"].item() == 0.0
    assert (one["min"].item(), one["max"].item()) == (2.5, 2.5)


def test_validation_td_weights_by_hand_with_the_default_settings():
    """Float64 hand computation with the defaults (β = 1, clip [0.1, 3.0]) on values that reach
    both clip bounds; the batch's own unbiased moments, or the `sums` given for a larger batch;
    exactly two valid tokens already get whitened weights (one gets w = m, in adv's dtype)."""
    import math

    from wmtp_fn.losses.weighting import whiten, whitening_sums

    vals = [-10.0, 1.0] + [0.0] * 17 + [10.0]  # 20 valid tokens: z reaches about ±3
    adv = torch.tensor([vals + [9.0]], dtype=torch.float64)
    mask = torch.tensor([[1] * 20 + [0]])
    mu = sum(vals) / 20
    sd = math.sqrt(sum((v - mu) ** 2 for v in vals) / 19)
    want = [min(max(math.exp((v - mu) / (sd + 1e-8)), 0.1), 3.0) for v in vals] + [0.0]
    w, mean, std = validation_td_weights(adv, mask)
    assert (mean.item(), std.item()) == (pytest.approx(mu), pytest.approx(sd))
    assert w[0].tolist() == pytest.approx(want, abs=1e-12)
    assert want[0] == 0.1 and want[19] == 3.0 and 1.0 < want[1] < 3.0  # both bounds, and β = 1, matter

    wider = whitening_sums(torch.tensor([[10.0, 20.0, 30.0]], dtype=torch.float64), torch.ones(1, 3))
    _, mean2, _ = validation_td_weights(adv, mask, sums=wider)
    assert mean2.item() == pytest.approx(20.0)

    two, _, _ = validation_td_weights(adv, torch.tensor([[1, 1] + [0] * 19]))
    assert two[0, :2].tolist() != [1.0, 1.0] and two[0, 2:].abs().sum() == 0
    one, _, _ = validation_td_weights(adv, torch.tensor([[0, 1] + [0] * 19]))
    assert one.dtype == adv.dtype and one[0].tolist() == [0.0, 1.0] + [0.0] * 19

    x = torch.tensor([1.0, 2.0], dtype=torch.float32)
    assert whiten(x, torch.tensor(1.0, dtype=torch.float64), torch.tensor(2.0, dtype=torch.float64)).dtype == torch.float32


def test_the_weight_functions_defaults_are_the_documented_settings():
    """td_weights / control_weights called with their defaults give what the documented
    defaults (β = 1, clip [0.1, 3.0], random matched to the batch, the caller's generator)
    give when passed explicitly, on inputs where every one of them changes the result."""
    from wmtp_fn.errors import ConfigError
    from wmtp_fn.losses.weighting import control_weights, raw_weights, td_weights

    adv = torch.tensor([[-10.0, 1.0, 0.0, 0.0, 10.0, 0.5]], dtype=torch.float64)
    mask = torch.tensor([[1, 1, 1, 1, 1, 0]])
    mean, std = torch.tensor(0.0, dtype=torch.float64), torch.tensor(3.0, dtype=torch.float64)
    explicit = td_weights(adv, mask, mean, std, beta=1.0, w_min=0.1, w_max=3.0)
    assert torch.equal(td_weights(adv, mask, mean, std), explicit)
    assert explicit[0, 0] == 0.1 and explicit[0, 4] == 3.0 and 1.0 < explicit[0, 1] < 3.0

    def random(**kw):
        return control_weights("random", explicit, mask, generator=torch.Generator().manual_seed(4), **kw)

    want = random(random_matched=True, w_min=0.1, w_max=3.0)
    assert torch.equal(random(), want)
    assert not torch.equal(random(random_matched=False), want)
    torch.manual_seed(0)  # the global generator must not be what draws them
    assert torch.equal(random(), want)
    uniform = control_weights("uniform", explicit, mask)
    assert uniform.dtype == explicit.dtype and uniform.tolist() == [[1.0, 1.0, 1.0, 1.0, 1.0, 0.0]]
    with pytest.raises(ConfigError, match=r"td.beta must be > 0, got 0.0"):
        raw_weights(adv, mean, std, beta=0.0)


def test_whitening_state_types_and_update_arguments():
    """The running statistics are fp64 / int64 scalars in a batch-less TensorDict; the update
    refuses a bad warm-up (negative, float, bool), a bad alpha and bad sums, each naming the
    key; warm-up 0 blends with α from the first update; fp32 sums are reduced in fp64."""
    from wmtp_fn.errors import ConfigError
    from wmtp_fn.losses.weighting import init_whitening, update_whitening

    s = init_whitening()
    assert s.batch_size == torch.Size([])
    assert (s["mean"].dtype, s["std"].dtype, s["updates"].dtype) == (torch.float64, torch.float64, torch.int64)
    sums = torch.tensor([6.0, 14.0, 3.0], dtype=torch.float64)  # x = 1, 2, 3: μ = 2, σ = sqrt(2/3)
    for bad in (-1, 1.5, True):
        with pytest.raises(ConfigError, match=rf"td.whitening warmup must be an int >= 0, got {bad!r}"):
            update_whitening(s, sums, warmup=bad)
    with pytest.raises(ConfigError, match=r"td.whitening alpha must be in \[0, 1\], got 1.5"):
        update_whitening(s, sums, alpha=1.5)
    with pytest.raises(ValueError, match=r"batch_sums \(Σx, Σx², N\) of shape \[3\], got \(2,\)"):
        update_whitening(s, sums[:2])
    zero = update_whitening(s, sums, warmup=0, alpha=0.25)
    assert zero["mean"].item() == pytest.approx(0.25 * 2.0) and zero["updates"].item() == 1

    x = [3000.0, 3001.0, 3004.0]  # fp32 sums whose variance cancels in fp32 (1.41 instead of 1.60)
    sums32 = torch.tensor([sum(x), sum(v * v for v in x), 3.0], dtype=torch.float32)
    t, q = float(sums32[0]), float(sums32[1])
    want = math.sqrt(max(q / 3 - (t / 3) ** 2, 1e-8))
    assert update_whitening(init_whitening(), sums32, warmup=1)["std"].item() == pytest.approx(want, rel=1e-9)
