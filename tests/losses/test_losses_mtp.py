"""MTP loss: a float64 loop reference (random masks, both weight kinds), NTP equivalence at
n_future = 1, hidden-state path == logits path, additivity over micro-batches, all-masked
batches, gradient checks and shape errors."""

import math

import pytest
import torch
from hypothesis import given, settings, strategies as st

from wmtp_fn.losses.mtp import (
    head_ce_sums,
    mtp_count,
    mtp_counts,
    mtp_loss,
    mtp_metrics,
    mtp_sums,
)
from wmtp_fn.losses.ntp import ntp_loss


def reference(logits, labels, mask, weights):
    """Float64 loop: per head (1-based k) the weighted CE sum, the unweighted sum and the count
    over t < T−k whose target labels[t+k] is not -100 and attended; loss = mean over heads with
    a target of sum / count. weights: None, [B, T] (weight of the target token) or [B, T, H]
    (weight of the predicting position and head)."""
    B, T, H, V = logits.shape
    lg = logits.double()
    wsum, usum, cnt = [0.0] * H, [0.0] * H, [0] * H
    for k in range(1, H + 1):
        for b in range(B):
            for t in range(T - k):
                y = int(labels[b, t + k])
                if y == -100 or (mask is not None and int(mask[b, t + k]) == 0):
                    continue
                row = lg[b, t, k - 1]
                ce = float(torch.logsumexp(row, 0) - row[y])
                if weights is None:
                    w = 1.0
                elif weights.dim() == 2:
                    w = float(weights[b, t + k])
                else:
                    w = float(weights[b, t, k - 1])
                wsum[k - 1] += w * ce
                usum[k - 1] += ce
                cnt[k - 1] += 1
    heads = [wsum[i] / cnt[i] for i in range(H) if cnt[i] > 0]
    loss = sum(heads) / len(heads) if heads else 0.0
    return loss, wsum, usum, cnt


@st.composite
def mtp_case(draw):
    B, T, H, V = draw(st.integers(1, 3)), draw(st.integers(1, 7)), draw(st.integers(1, 4)), draw(st.integers(2, 9))
    seed = draw(st.integers(0, 2**16))
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(B, T, H, V, generator=g) * 3
    labels = torch.randint(0, V, (B, T), generator=g)
    labels[torch.rand(B, T, generator=g) < draw(st.floats(0, 1))] = -100
    mask = None
    if draw(st.booleans()):
        mask = (torch.rand(B, T, generator=g) < 0.7).long()
    kind = draw(st.sampled_from(["none", "position", "per_head"]))
    weights = {
        "none": None,
        "position": torch.rand(B, T, generator=g) * 2,
        "per_head": torch.rand(B, T, H, generator=g) * 2,
    }[kind]
    return logits, labels, mask, weights


@settings(max_examples=60)
@given(mtp_case())
def test_matches_float64_loop_reference(case):
    logits, labels, mask, weights = case
    loss_ref, wsum, usum, cnt = reference(logits, labels, mask, weights)
    H = logits.shape[2]
    counts = mtp_counts(labels, mask, n_future=H)
    assert counts.tolist() == cnt
    batch = {"labels": labels} if mask is None else {"labels": labels, "attention_mask": mask}
    assert mtp_count(batch, n_future=H).tolist() == cnt
    weighted, unweighted = mtp_sums(logits, labels, attention_mask=mask, weights=weights)
    torch.testing.assert_close(weighted.double(), torch.tensor(wsum, dtype=torch.float64), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(unweighted.double(), torch.tensor(usum, dtype=torch.float64), rtol=1e-5, atol=1e-5)
    loss = mtp_loss(logits, labels, attention_mask=mask, weights=weights)
    assert math.isfinite(loss.item())
    assert loss.item() == pytest.approx(loss_ref, rel=1e-5, abs=1e-6)


def test_normaliser_is_mask_count_not_weight_sum():
    """One head, two valid targets with weights 2 and 0: CE_1 = (2·ce_a + 0·ce_b) / 2."""
    logits = torch.zeros(1, 3, 1, 4)
    labels = torch.tensor([[0, 1, 2]])
    w = torch.tensor([[9.0, 2.0, 0.0]])  # target-indexed: w[0] belongs to no target
    loss = mtp_loss(logits, labels, weights=w)
    assert loss.item() == pytest.approx(2.0 * math.log(4) / 2, rel=1e-6)


def test_weights_at_positions_without_a_target_are_never_read():
    """NaN weights wherever no head has a valid target (position 0 for position weights, masked
    labels, unattended positions) give the same loss and gradients as zeros there."""
    g = torch.Generator().manual_seed(9)
    logits = torch.randn(2, 6, 2, 5, generator=g, requires_grad=True)
    labels = torch.randint(0, 5, (2, 6), generator=g)
    labels[0, 3] = -100
    mask = torch.ones(2, 6, dtype=torch.long)
    mask[1, 4:] = 0
    w = torch.rand(2, 6, generator=g)
    holes = torch.zeros(2, 6, dtype=torch.bool)
    holes[:, 0] = True
    holes[0, 3] = True
    holes[1, 4:] = True
    loss_nan = mtp_loss(logits, labels, attention_mask=mask, weights=torch.where(holes, torch.nan, w))
    loss_zero = mtp_loss(logits, labels, attention_mask=mask, weights=torch.where(holes, 0.0, w))
    assert math.isfinite(loss_nan.item())
    torch.testing.assert_close(loss_nan, loss_zero)
    (g_nan,) = torch.autograd.grad(loss_nan, logits)
    (g_zero,) = torch.autograd.grad(loss_zero, logits)
    torch.testing.assert_close(g_nan, g_zero)
    hidden = torch.randn(2, 6, 3, generator=g, requires_grad=True)
    W = torch.randn(5, 3, generator=g)
    for k in (1, 2):  # the chunked CE's backward multiplies the upstream gradient of every row
        s_nan, _ = head_ce_sums(hidden, W, labels, k, attention_mask=mask, weights=torch.where(holes, torch.nan, w))
        s_zero, _ = head_ce_sums(hidden, W, labels, k, attention_mask=mask, weights=torch.where(holes, 0.0, w))
        torch.testing.assert_close(s_nan, s_zero)
        torch.testing.assert_close(torch.autograd.grad(s_nan, hidden)[0], torch.autograd.grad(s_zero, hidden)[0])


def test_heads_without_targets_do_not_dilute_the_mean():
    """T = 3, H = 3: head 3 has no target (t < T−3 is empty), heads 1 and 2 do; uniform logits
    give CE = log V on every target, so the loss is log V (not 2/3 of it)."""
    logits = torch.zeros(2, 3, 3, 5)
    labels = torch.randint(0, 5, (2, 3))
    assert mtp_counts(labels, n_future=3).tolist() == [4, 2, 0]
    assert mtp_loss(logits, labels).item() == pytest.approx(math.log(5), rel=1e-6)


def test_n_future_1_equals_ntp_value_and_gradient():
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(3, 9, 11, generator=g, requires_grad=True)
    labels = torch.randint(0, 11, (3, 9), generator=g)
    labels[0, :4] = -100
    labels[2, 7:] = -100
    a = mtp_loss(logits.unsqueeze(2), labels)
    b = ntp_loss(logits, labels)
    torch.testing.assert_close(a, b, rtol=1e-6, atol=0)
    (ga,) = torch.autograd.grad(a, logits)
    (gb,) = torch.autograd.grad(b, logits)
    torch.testing.assert_close(ga, gb, rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("kind", ["none", "position", "per_head"])
def test_hidden_path_equals_logits_path(kind):
    """head_ce_sums from head k's hidden states (chunked CE) == mtp_sums on hidden @ W.T, in
    value and in the gradient w.r.t. the hidden states, at several chunk sizes."""
    g = torch.Generator().manual_seed(5)
    B, T, H, d, V = 2, 8, 3, 6, 13
    hidden = torch.randn(B, T, H, d, generator=g, dtype=torch.float64, requires_grad=True)
    W = torch.randn(V, d, generator=g, dtype=torch.float64)
    labels = torch.randint(0, V, (B, T), generator=g)
    labels[1, 2] = -100
    mask = torch.ones(B, T, dtype=torch.long)
    mask[0, 6:] = 0
    weights = {"none": None, "position": torch.rand(B, T, generator=g, dtype=torch.float64),
               "per_head": torch.rand(B, T, H, generator=g, dtype=torch.float64)}[kind]
    ref_w, ref_u = mtp_sums(torch.einsum("bthd,vd->bthv", hidden, W), labels, attention_mask=mask, weights=weights)
    for chunk in (1, 5, 4096):
        for k in range(1, H + 1):
            w, u = head_ce_sums(hidden[:, :, k - 1], W, labels, k, attention_mask=mask, weights=weights, chunk_size=chunk)
            torch.testing.assert_close(w.double(), ref_w[k - 1].double(), rtol=1e-6, atol=1e-9)
            torch.testing.assert_close(u.double(), ref_u[k - 1].double(), rtol=1e-6, atol=1e-9)
            (g_hidden,) = torch.autograd.grad(w, hidden)
            (g_ref,) = torch.autograd.grad(ref_w[k - 1], hidden, retain_graph=True)
            torch.testing.assert_close(g_hidden, g_ref.to(g_hidden.dtype), rtol=1e-5, atol=1e-7)


def test_sums_are_additive_over_micro_batches():
    """The step contract: Σ_mb sums with the global counts equals the loss of the whole batch."""
    from wmtp_fn.train.step import component_weights

    g = torch.Generator().manual_seed(11)
    logits = torch.randn(4, 6, 3, 7, generator=g)
    labels = torch.randint(0, 7, (4, 6), generator=g)
    labels[:2, 3:] = -100  # the halves have very different counts
    weights = torch.rand(4, 6, 3, generator=g)
    parts = [(logits[:2], labels[:2], weights[:2]), (logits[2:], labels[2:], weights[2:])]
    counts = sum(mtp_counts(lab, n_future=3) for _, lab, _ in parts)
    sums = sum(mtp_sums(lg, lab, weights=w)[0] for lg, lab, w in parts)
    whole = mtp_loss(logits, labels, weights=weights)
    torch.testing.assert_close((component_weights(counts) * sums).sum(), whole, rtol=1e-6, atol=0)


def test_all_masked_is_finite_zero_with_zero_grads():
    logits = torch.randn(2, 5, 3, 7, requires_grad=True)
    hidden = torch.randn(2, 5, 4, requires_grad=True)
    W = torch.randn(7, 4)
    labels = torch.full((2, 5), -100)
    labels[:, 0] = 1  # position 0 is never a target
    mask_off = torch.ones(2, 5, dtype=torch.long)
    labels2 = torch.randint(0, 7, (2, 5))
    mask_off[:, 1:] = 0  # every target position unattended
    for lab, m in ((labels, None), (labels2, mask_off)):
        loss = mtp_loss(logits, lab, attention_mask=m, weights=torch.rand(2, 5))
        assert loss.item() == 0.0 and math.isfinite(loss.item())
        (g,) = torch.autograd.grad(loss, logits)
        assert torch.count_nonzero(g) == 0
        for k in (1, 2, 3):
            w, u = head_ce_sums(hidden, W, lab, k, attention_mask=m)
            assert w.item() == 0.0 and u.item() == 0.0
            (gh,) = torch.autograd.grad(w, hidden)
            assert torch.count_nonzero(gh) == 0


def test_gradcheck():
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(2, 4, 2, 3, generator=g, dtype=torch.float64, requires_grad=True)
    labels = torch.tensor([[0, 2, -100, 1], [1, 1, 0, 2]])
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 1, 0]])
    w = torch.rand(2, 4, 2, generator=g, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda x: mtp_loss(x, labels, attention_mask=mask, weights=w), (logits,))
    hidden = torch.randn(2, 4, 3, generator=g, dtype=torch.float64, requires_grad=True)
    W = torch.randn(3, 3, generator=g, dtype=torch.float64)
    pw = torch.rand(2, 4, generator=g, dtype=torch.float64)
    assert torch.autograd.gradcheck(
        lambda h: head_ce_sums(h, W, labels, 2, attention_mask=mask, weights=pw, chunk_size=3)[0], (hidden,)
    )


def test_metrics_are_the_sums_and_counts():
    logits = torch.randn(1, 4, 2, 5)
    labels = torch.randint(0, 5, (1, 4))
    w, u = mtp_sums(logits, labels, weights=torch.zeros(1, 4))
    m = mtp_metrics(w, u, mtp_counts(labels, n_future=2))
    assert m["count"].tolist() == [3, 2]
    assert torch.all(m["weighted_ce_sum"] == 0) and torch.all(m["ce_sum"] > 0)


def test_bad_shapes_name_the_argument():
    logits = torch.randn(2, 5, 3, 7)
    labels = torch.randint(0, 7, (2, 5))
    with pytest.raises(ValueError, match="weights"):
        mtp_loss(logits, labels, weights=torch.rand(2, 4))
    with pytest.raises(ValueError, match="per-head weights have 2 heads"):
        mtp_loss(logits, labels, weights=torch.rand(2, 5, 2))
    with pytest.raises(ValueError, match="attention_mask"):
        mtp_counts(labels, torch.ones(2, 4), n_future=3)
    with pytest.raises(ValueError, match="1-based"):
        head_ce_sums(torch.randn(2, 5, 3), torch.randn(7, 3), labels, 0)
    with pytest.raises(KeyError, match="labels"):
        mtp_count({"input_ids": labels}, n_future=2)
