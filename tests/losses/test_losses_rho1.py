"""Rho-1 selection: exact ⌈k·N⌉ per head with the documented tie rule (vs a sorted-list
reference, heavy ties), step scope == micro-batch scope, a multi-rank run through a threaded
fake Comm, the per-head alignment of policy and reference, the three modes vs float64, the
seeds' quantile rule, k = 1 / k = 0 against the plain MTP loss, and the statistics."""

import math
import threading

import pytest
import torch
from hypothesis import given, settings, strategies as st

from wmtp_fn.losses.mtp import head_token_nll, mtp_loss, mtp_token_nll, mtp_valid
from wmtp_fn.losses.rho1 import (
    align_reference_nll,
    excess_loss,
    rho1_weights,
    select_exact,
    select_quantile,
    selected_count,
    selection_stats,
)


# ---------------------------------------------------------------- independent references


def ceil_frac(p: int, n: int, q: int) -> int:
    """⌈p·n/q⌉ in integers."""
    return -(-p * n // q)


def reference_select(excess, valid, p, q):
    """Per head: list the valid tokens as (excess, flat index) in the order micro-batch, b, t;
    sort by excess descending then index ascending; the first ⌈p·N/q⌉ get weight 1."""
    H = excess[0].shape[-1]
    out = [torch.zeros(e.shape, dtype=torch.float64) for e in excess]
    for h in range(H):
        tokens, flat = [], 0
        for i, (e, v) in enumerate(zip(excess, valid)):
            B, T, _ = e.shape
            for b in range(B):
                for t in range(T):
                    if bool(v[b, t, h]):
                        tokens.append((float(e[b, t, h]), flat, i, b, t))
                    flat += 1
        tokens.sort(key=lambda x: (-x[0], x[1]))
        for _, _, i, b, t in tokens[: ceil_frac(p, len(tokens), q)]:
            out[i][b, t, h] = 1.0
    return out


def reference_quantile(values, q):
    """torch.quantile's linear rule on a Python list: position q·(n−1) between sorted values."""
    s = sorted(values)
    pos = q * (len(s) - 1)
    lo = math.floor(pos)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (pos - lo) * (s[hi] - s[lo])


def ce64(row, y):
    row = row.double()
    return float(torch.logsumexp(row, 0) - row[y])


# ---------------------------------------------------------------- exact selection


@st.composite
def selection_case(draw):
    H = draw(st.integers(1, 3))
    n_mb = draw(st.integers(1, 3))
    ties = draw(st.booleans())
    seed = draw(st.integers(0, 2**16))
    g = torch.Generator().manual_seed(seed)
    excess, valid = [], []
    for _ in range(n_mb):
        B, T = draw(st.integers(1, 3)), draw(st.integers(1, 6))
        if ties:
            e = torch.randint(0, 3, (B, T, H), generator=g).float()  # excess in {0, 1, 2}
        else:
            e = torch.randn(B, T, H, generator=g)
        excess.append(e)
        valid.append(torch.rand(B, T, H, generator=g) < draw(st.floats(0, 1)))
    q = draw(st.integers(1, 12))
    p = draw(st.integers(0, q))
    return excess, valid, p, q


@settings(max_examples=80)
@given(selection_case())
def test_exact_selection_matches_sorted_reference(case):
    excess, valid, p, q = case
    weights, threshold = select_exact(excess, valid, p / q)
    expected = reference_select(excess, valid, p, q)
    for w, ref, e in zip(weights, expected, excess):
        assert w.dtype == e.dtype and w.shape == e.shape
        assert torch.equal(w.double(), ref)
    H = excess[0].shape[-1]
    for h in range(H):
        n_valid = sum(int(v[..., h].sum()) for v in valid)
        n_sel = sum(int(w[..., h].sum()) for w in weights)
        assert n_sel == ceil_frac(p, n_valid, q)  # exactly ⌈k·N⌉, ties included
        picked = [float(e[..., h][w[..., h] > 0].min()) for e, w in zip(excess, weights) if w[..., h].any()]
        assert float(threshold[h]) == (min(picked) if picked else 0.0)


def test_ratio_is_read_as_the_written_fraction():
    # plain float arithmetic overshoots: 0.07·100 = 7.000000000000001 and 0.55·180 = 99.00000000000001
    assert math.ceil(0.07 * 100) == 8 and math.ceil(0.55 * 180) == 100
    n = torch.tensor([100, 30, 10, 0, 1])
    assert selected_count(n, 0.07).tolist() == [7, 3, 1, 0, 1]
    assert selected_count(torch.tensor([180]), 0.55).tolist() == [99]
    assert selected_count(n, 0.1).tolist() == [10, 3, 1, 0, 1]
    assert selected_count(n, 0.7).tolist() == [70, 21, 7, 0, 1]
    assert selected_count(n, 1 / 3).tolist() == [34, 10, 4, 0, 1]


def test_tie_rule_by_hand():
    """Head 0: values 2 appear at flat positions 1, 2 (micro-batch 0, row 0), 3 (row 1) and 6
    (micro-batch 1); N = 8 valid, k = 3/8 → 3 tokens: the three lowest-index 2s. Head 1: one
    invalid 5 must not be taken; k = 3/8 of 7 valid → 3: the 4, then the 3s at positions 0 and 6
    (micro-batch 1's 3 at flat 6 is before micro-batch 1's 3 at flat 7)."""
    e0 = torch.tensor([[[1.0, 3.0], [2.0, 5.0], [2.0, 4.0]], [[2.0, 0.0], [0.0, 1.0], [1.0, 2.0]]])
    v0 = torch.ones(2, 3, 2, dtype=torch.bool)
    v0[0, 1, 1] = False
    e1 = torch.tensor([[[2.0, 3.0], [0.5, 3.0]]])
    v1 = torch.ones(1, 2, 2, dtype=torch.bool)
    v1[0, 1, 0] = False
    (w0, w1), threshold = select_exact([e0, e1], [v0, v1], 3 / 8)
    assert w0[..., 0].tolist() == [[0, 1, 1], [1, 0, 0]] and w1[..., 0].tolist() == [[0, 0]]
    assert w0[..., 1].tolist() == [[1, 0, 1], [0, 0, 0]] and w1[..., 1].tolist() == [[1, 0]]
    assert threshold.tolist() == [2.0, 3.0]
    # -0.0 and +0.0 are the same excess: the lower index wins
    (w,), _ = select_exact([torch.tensor([[[-0.0], [0.0]]])], [torch.ones(1, 2, 1, dtype=torch.bool)], 0.5)
    assert w[..., 0].tolist() == [[1, 0]]


def test_step_scope_equals_micro_batch_scope_on_the_concatenation():
    g = torch.Generator().manual_seed(4)
    e = torch.randint(0, 3, (5, 6, 2), generator=g).float()
    v = torch.rand(5, 6, 2, generator=g) < 0.8
    (whole,), t_whole = select_exact([e], [v], 0.7)
    parts, t_parts = select_exact([e[:2], e[2:3], e[3:]], [v[:2], v[2:3], v[3:]], 0.7)
    assert torch.equal(torch.cat(parts), whole) and torch.equal(t_parts, t_whole)
    w_mb, t_mb, excess = rho1_weights(e, torch.zeros_like(e), v, ratio=0.7, mode="signed")
    assert torch.equal(w_mb, whole) and torch.equal(t_mb, t_whole) and torch.equal(excess, e)


class ThreadComm:
    """A process group of threads: ``sum_`` is a barrier-synchronised all-reduce."""

    def __init__(self, rank, world, slots, barrier):
        self.rank, self.world_size, self._slots, self._barrier = rank, world, slots, barrier

    def sum_(self, t):
        self._slots[self.rank] = t.clone()
        self._barrier.wait()
        total = sum(self._slots)
        self._barrier.wait()
        t.copy_(total)


@pytest.mark.parametrize("world", [2, 3])
def test_across_ranks_equals_the_union_on_one_process(world):
    g = torch.Generator().manual_seed(world)
    per_rank = [
        [torch.randint(0, 3, (2, int(torch.randint(1, 6, (1,), generator=g)), 3), generator=g).float() for _ in range(2)]
        for _ in range(world)
    ]
    valid = [[torch.rand(e.shape, generator=g) < 0.7 for e in es] for es in per_rank]
    expected, t_expected = select_exact([e for es in per_rank for e in es], [v for vs in valid for v in vs], 0.7)
    slots, barrier, results = [None] * world, threading.Barrier(world), [None] * world

    def run(r):
        results[r] = select_exact(per_rank[r], valid[r], 0.7, comm=ThreadComm(r, world, slots, barrier))

    threads = [threading.Thread(target=run, args=(r,)) for r in range(world)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    got = [w for ws, _ in results for w in ws]
    assert all(torch.equal(a, b) for a, b in zip(got, expected))
    assert all(torch.equal(th, t_expected) for _, th in results)


# ---------------------------------------------------------------- alignment and modes


def test_alignment_head_k_meets_the_reference_prediction_of_the_same_token():
    """Two label rows differ only at position j. The reference is uniform except at position
    j−1, where it puts logit 5 on row A's token labels[j]; the policy is uniform except that head
    k at t = j−k puts logit 5 on the same token. So the aligned reference NLL and the policy NLL
    must differ between the rows exactly at (t = j−k, head k) for every k, with the hand-computed
    values there, and the excess of every mode is then 0 for row A (both models agree)."""
    V, T, H, j = 6, 8, 3, 5
    a = torch.tensor([0, 1, 2, 3, 4, 2, 1, 0])
    b = a.clone()
    b[j] = 5
    labels = torch.stack([a, b])
    ref_logits = torch.zeros(2, T, V)
    ref_logits[:, j - 1, a[j]] = 5.0
    pol_logits = torch.zeros(2, T, H, V)
    for k in range(1, H + 1):
        pol_logits[:, j - k, k - 1, a[j]] = 5.0
    ref_nll = align_reference_nll(mtp_token_nll(ref_logits.unsqueeze(2), labels)[0][..., 0], H)
    pol_nll, valid = mtp_token_nll(pol_logits, labels)
    hit, miss, uniform = math.log(V - 1 + math.e**5) - 5, math.log(V - 1 + math.e**5), math.log(V)
    for k in range(1, H + 1):
        for t in range(T - k):
            want_a = hit if t == j - k else uniform
            want_b = miss if t == j - k else uniform
            for nll in (ref_nll, pol_nll):
                assert nll[0, t, k - 1].item() == pytest.approx(want_a, rel=1e-5)
                assert nll[1, t, k - 1].item() == pytest.approx(want_b, rel=1e-5)
    for mode in ("signed", "absolute"):
        e = excess_loss(pol_nll, ref_nll, mode)
        assert torch.allclose(e[valid], torch.zeros(()), atol=1e-6)


@pytest.mark.parametrize("mode", ["signed", "absolute", "difficult"])
def test_modes_match_float64_reference(mode):
    """The hidden-state path (chunked CE per head for the policy, k = 1 for the reference, then
    aligned) against a float64 loop over policy logits [t, k−1] and reference logits [t+k−1]."""
    g = torch.Generator().manual_seed(8)
    B, T, H, d, V = 2, 7, 3, 5, 11
    pol_h = torch.randn(B, T, H, d, generator=g)
    ref_h = torch.randn(B, T, d, generator=g)
    W = torch.randn(V, d, generator=g)
    labels = torch.randint(0, V, (B, T), generator=g)
    labels[0, 3] = -100
    policy = torch.stack([head_token_nll(pol_h[:, :, k - 1], W, labels, k, chunk_size=4)[0] for k in range(1, H + 1)], -1)
    ref = align_reference_nll(head_token_nll(ref_h, W, labels, 1, chunk_size=4)[0], H)
    got = excess_loss(policy, ref, mode)
    valid = mtp_valid(labels, n_future=H)
    pol_logits, ref_logits = pol_h.double() @ W.double().T, ref_h.double() @ W.double().T
    for k in range(1, H + 1):
        for bb in range(B):
            for t in range(T):
                y = int(labels[bb, t + k]) if t + k < T else -100
                assert bool(valid[bb, t, k - 1]) == (y != -100)
                if y == -100:
                    continue
                lp, lr = ce64(pol_logits[bb, t, k - 1], y), ce64(ref_logits[bb, t + k - 1], y)
                want = {"signed": lp - lr, "absolute": abs(lp - lr), "difficult": lr}[mode]
                assert got[bb, t, k - 1].item() == pytest.approx(want, rel=1e-5, abs=1e-5)


# ---------------------------------------------------------------- against the MTP loss


def _mtp_case(seed):
    g = torch.Generator().manual_seed(seed)
    B, T, H, V = 3, 8, 3, 9
    logits = torch.randn(B, T, H, V, generator=g, requires_grad=True)
    labels = torch.randint(0, V, (B, T), generator=g)
    labels[1, :3] = -100
    mask = torch.ones(B, T, dtype=torch.long)
    mask[2, 6:] = 0
    ref = torch.rand(B, T, H, generator=g) * 3
    return logits, labels, mask, ref


@pytest.mark.parametrize("rule", ["exact", "quantile"])
def test_ratio_one_is_the_plain_mtp_loss(rule):
    logits, labels, mask, ref = _mtp_case(1)
    nll, valid = mtp_token_nll(logits.detach(), labels, mask)
    w, _, _ = rho1_weights(nll, ref, valid, ratio=1.0, rule=rule)
    assert torch.equal(w.bool(), valid)
    selected = mtp_loss(logits, labels, attention_mask=mask, weights=w)
    plain = mtp_loss(logits, labels, attention_mask=mask)
    torch.testing.assert_close(selected, plain, rtol=1e-6, atol=0)
    (ga,) = torch.autograd.grad(selected, logits)
    (gb,) = torch.autograd.grad(plain, logits)
    torch.testing.assert_close(ga, gb, rtol=1e-6, atol=1e-9)


def test_ratio_zero_is_a_finite_zero_with_zero_grads():
    logits, labels, mask, ref = _mtp_case(2)
    nll, valid = mtp_token_nll(logits.detach(), labels, mask)
    w, threshold, _ = rho1_weights(nll, ref, valid, ratio=0.0)
    assert torch.count_nonzero(w) == 0 and torch.all(threshold == 0)
    loss = mtp_loss(logits, labels, attention_mask=mask, weights=w)
    assert loss.item() == 0.0 and math.isfinite(loss.item())
    (g,) = torch.autograd.grad(loss, logits)
    assert torch.count_nonzero(g) == 0


def test_selected_loss_is_mask_normalised():
    """k = 0.5 with per-head weights: the MTP loss of the selection equals a hand sum of the
    selected CEs divided by the head's full mask count."""
    logits, labels, mask, ref = _mtp_case(3)
    nll, valid = mtp_token_nll(logits.detach(), labels, mask)
    w, _, _ = rho1_weights(nll, ref, valid, ratio=0.5, mode="absolute")
    heads = [float((nll[..., h] * w[..., h]).sum() / valid[..., h].sum()) for h in range(3)]
    assert mtp_loss(logits, labels, attention_mask=mask, weights=w).item() == pytest.approx(sum(heads) / 3, rel=1e-5)


# ---------------------------------------------------------------- the seeds' quantile rule


@settings(max_examples=60)
@given(selection_case())
def test_quantile_rule_matches_reference(case):
    excess, valid, p, q = case
    e, v = excess[0].double(), valid[0]
    w, threshold = select_quantile(e, v, p / q)
    for h in range(e.shape[-1]):
        vals = [float(x) for x in e[..., h][v[..., h]]]
        if not vals:
            assert w[..., h].sum() == 0 and threshold[h] == 0
            continue
        tau = reference_quantile(vals, 1 - p / q)
        assert float(threshold[h]) == pytest.approx(tau, rel=1e-12, abs=1e-12)
        want = [[float(bool(v[b, t, h]) and float(e[b, t, h]) >= tau) for t in range(e.shape[1])] for b in range(e.shape[0])]
        assert w[..., h].tolist() == want


def test_quantile_rule_over_selects_under_ties():
    e = torch.tensor([[[1.0], [1.0], [1.0], [1.0], [0.0]]])
    v = torch.ones_like(e, dtype=torch.bool)
    w_q, t_q = select_quantile(e, v, 0.4)  # quantile(…, 0.6) = 1 → all four 1s
    (w_x,), _ = select_exact([e], [v], 0.4)  # ⌈0.4·5⌉ = 2
    assert w_q[..., 0].tolist() == [[1, 1, 1, 1, 0]] and t_q.item() == 1.0
    assert w_x[..., 0].tolist() == [[1, 1, 0, 0, 0]]
    w0, _ = select_quantile(torch.tensor([[[0.0], [3.0], [1.0]]]), torch.ones(1, 3, 1, dtype=torch.bool), 0.0)
    assert w0[..., 0].tolist() == [[0, 1, 0]]  # the seeds' k = 0 still takes the maximum


# ---------------------------------------------------------------- statistics and errors


def test_selection_stats():
    e = torch.tensor([[[1.0, -1.0], [3.0, 0.5], [2.0, 2.0]]])
    v = torch.tensor([[[True, True], [True, False], [False, True]]])
    nll = torch.tensor([[[0.5, 1.5], [2.0, 9.0], [7.0, 4.0]]])
    (w,), threshold = select_exact([e], [v], 0.5)  # head 0: {3.0}; head 1: {2.0}
    s = selection_stats(w, v, e, nll, threshold)
    assert s["selected"].tolist() == [1, 1] and s["valid"].tolist() == [2, 2]
    assert s["excess_sum"].tolist() == [4.0, 1.0]
    assert s["selected_excess_sum"].tolist() == [3.0, 2.0]
    assert s["selected_ce_sum"].tolist() == [2.0, 4.0]
    assert s["threshold_sum"].tolist() == [3.0, 2.0] and s["threshold_count"].tolist() == [1, 1]
    (w0,), t0 = select_exact([e], [v], 0.0)
    s0 = selection_stats(w0, v, e, nll, t0)
    assert s0["threshold_count"].tolist() == [0, 0] and s0["selected_ce_sum"].tolist() == [0.0, 0.0]
    assert s0["threshold_sum"].tolist() == [0.0, 0.0]  # a head that selected nothing adds no threshold
    assert s["threshold_count"].dtype == torch.int64  # summed over micro-batches and ranks as a count
    s64 = selection_stats(w, v, e, nll, threshold.double())
    assert s64["threshold_sum"].dtype == e.dtype and s64["threshold_sum"].tolist() == [3.0, 2.0]


def test_bad_input_errors():
    e = torch.zeros(1, 3, 2)
    v = torch.ones(1, 3, 2, dtype=torch.bool)
    with pytest.raises(ValueError, match=r"ratio must be a number in \[0, 1\]"):
        select_exact([e], [v], 1.5)
    with pytest.raises(ValueError, match="mode must be one of"):
        excess_loss(e, e, "relative")
    with pytest.raises(ValueError, match="micro-batch 0"):
        select_exact([e], [v[..., :1]], 0.5)
    with pytest.raises(ValueError, match="align the reference"):
        excess_loss(e, e[..., :1])
    with pytest.raises(ValueError, match="rule must be"):
        rho1_weights(e, e, v, ratio=0.5, rule="topk")
