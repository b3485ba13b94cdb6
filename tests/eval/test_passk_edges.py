"""pass@k and the bootstrap at their edges: the k type check and messages, an empty problem set,
no floating-point warnings, fp64 averaging of fp32 values, the seed defaults and several index
chunks against one independent draw of every resample (surviving mutants of eval.passk)."""

from __future__ import annotations

import warnings

import numpy as np
import pytest

from wmtp_fn.eval.passk import bootstrap_ci, paired_bootstrap_diff, pass_at_k, pass_at_k_diff


def reference_interval(values, *, n_boot, confidence, seed):
    """Percentile bootstrap written out: every resample's indices in one draw, a loop of means."""
    x = np.asarray(values, dtype=np.float64)
    idx = np.random.default_rng(seed).integers(0, x.size, size=(n_boot, x.size))
    means = [float(np.sum(x[row]) / x.size) for row in idx]
    lo, hi = np.quantile(means, [(1 - confidence) / 2, (1 + confidence) / 2])
    return float(np.sum(x) / x.size), float(lo), float(hi)


def test_k_accepts_numpy_ints_and_names_a_bad_type():
    # 10 samples, 4 pass, k = 2: 1 - C(6, 2)/C(10, 2) = 1 - 15/45 = 2/3
    assert float(pass_at_k(10, 4, np.int64(2))) == pytest.approx(2 / 3, abs=1e-15)
    with pytest.raises(ValueError, match=r"^pass_at_k: k must be an int, got float \(2\.0\)$"):
        pass_at_k(10, 4, 2.0)


def test_k_above_n_says_the_estimator_is_undefined():
    with pytest.raises(ValueError, match=r"^pass_at_k: k=5 exceeds the number of samples n=3 "
                                         r"\(C\(n, k\) = 0: pass@k is undefined\)$"):
        pass_at_k([3, 8], [1, 1], 5)


def test_no_problems_give_an_empty_float64_result():
    got = pass_at_k(np.array([], dtype=np.int64), np.array([], dtype=np.int64), 3)
    assert got.shape == (0,) and got.dtype == np.float64


def test_pass_at_k_raises_no_floating_point_warning():
    """Every factor 1 − k/i has i ≥ 1: nothing divides by zero, even where a factor is unused."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with np.errstate(all="raise"):
            got = pass_at_k(np.array([1, 4, 6]), np.array([0, 4, 2]), 1)
    np.testing.assert_allclose(got, [0.0, 1.0, 2 / 6], atol=1e-15)


def test_fp32_values_are_averaged_in_float64():
    """In fp32, 2²⁴ + 1 rounds back to 2²⁴: an fp32 mean of (2²⁴, 1, 1, 1) is 2²² exactly, the
    fp64 one 2²² + 0.75."""
    values = np.array([2.0**24, 1.0, 1.0, 1.0], dtype=np.float32)
    assert bootstrap_ci(values, n_boot=20).mean == 2.0**22 + 0.75


def test_bootstrap_defaults_to_seed_0_and_n_boot_1_is_allowed():
    values = np.random.default_rng(11).random(17)
    got = bootstrap_ci(values, n_boot=300)
    assert tuple(got) == pytest.approx(reference_interval(values, n_boot=300, confidence=0.95, seed=0), abs=1e-12)
    one = bootstrap_ci(values, n_boot=1, seed=2)
    idx = np.random.default_rng(2).integers(0, 17, size=(1, 17))
    assert one.lo == one.hi == pytest.approx(values[idx[0]].mean(), abs=1e-12)


def test_confidence_zero_is_refused():
    with pytest.raises(ValueError, match=r"^bootstrap_ci: confidence must be in \(0, 1\), got 0\.0$"):
        bootstrap_ci([0.5, 0.25], confidence=0.0)


def test_several_index_chunks_equal_one_draw_of_every_resample():
    """P = 1000 problems: resamples are drawn 2000 at a time (2e6 / P), so n_boot = 4500 takes
    chunks of 2000, 2000 and 500; the result is that of drawing all 4500 × 1000 indices at once."""
    values = np.random.default_rng(12).random(1000)
    got = bootstrap_ci(values, n_boot=4500, confidence=0.9, seed=5)
    assert tuple(got) == pytest.approx(reference_interval(values, n_boot=4500, confidence=0.9, seed=5), abs=1e-12)


def test_paired_difference_defaults_to_seed_0():
    rng = np.random.default_rng(13)
    a, b = rng.random(15), rng.random(15)
    got = paired_bootstrap_diff(a, b, n_boot=300)
    assert tuple(got) == pytest.approx(reference_interval(a - b, n_boot=300, confidence=0.95, seed=0), abs=1e-12)


def test_pass_at_k_diff_messages_list_five_ids_of_b_and_say_no_results():
    a = {"p0": (4, 1)}
    b = {f"q{i}": (4, 1) for i in range(6)}
    b["p0"] = (4, 1)
    with pytest.raises(ValueError, match=r"only in a: \[\], only in b: \['q0', 'q1', 'q2', 'q3', 'q4'\]$"):
        pass_at_k_diff(a, b)
    with pytest.raises(ValueError, match=r"^pass_at_k_diff: no results \(expected problem_id -> \(n, c\)\)$"):
        pass_at_k_diff({}, {})
