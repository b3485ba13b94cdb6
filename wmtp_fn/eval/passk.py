"""pass@k: the unbiased estimator per problem, its mean over problems, and bootstrap intervals.

For one problem with ``n`` samples of which ``c`` pass, the probability that at least one of
``k`` samples drawn without replacement passes is::

    pass@k = 1 - C(n - c, k) / C(n, k)          (1.0 when n - c < k: every k-subset has a pass)

Binomials overflow floats for n in the hundreds, so the ratio is computed as a product of
``n - (n - c)`` = ``c`` factors that are each in [0, 1)::

    C(n - c, k) / C(n, k) = prod_{i = n-c+1}^{n} (1 - k / i)

The mean over problems is the benchmark's pass@k. Its uncertainty comes from which problems
happened to be in the benchmark and from each problem's finite ``n``; both are captured by
resampling problems (each problem's estimate includes its own sampling noise, and problems are
independent), which is what ``bootstrap_ci`` does.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import numpy as np

DEFAULT_KS: tuple[int, ...] = (1, 5, 10, 20)
DEFAULT_N_BOOT = 10_000
DEFAULT_CONFIDENCE = 0.95


class Interval(NamedTuple):
    """A point estimate with a two-sided confidence interval ``[lo, hi]``."""

    mean: float
    lo: float
    hi: float


def pass_at_k(n: Any, c: Any, k: int) -> np.ndarray:
    """Unbiased pass@k per problem.

    n, c: ints or int arrays of the same shape ``[P]`` (samples, passing samples per problem);
    an int ``n`` broadcasts. k: 1 <= k <= every n. Returns float64 ``[P]`` (a 0-d array for
    scalar input).
    """
    n_arr, c_arr = np.broadcast_arrays(np.asarray(n), np.asarray(c))
    if not (np.issubdtype(n_arr.dtype, np.integer) and np.issubdtype(c_arr.dtype, np.integer)):
        raise ValueError(f"pass_at_k: n and c must be integers, got {n_arr.dtype} and {c_arr.dtype}")
    if type(k) is not int and not isinstance(k, np.integer):
        raise ValueError(f"pass_at_k: k must be an int, got {type(k).__name__} ({k!r})")
    if k < 1:
        raise ValueError(f"pass_at_k: k must be >= 1, got {k}")
    if n_arr.size and (c_arr.min() < 0 or (c_arr > n_arr).any()):
        raise ValueError(f"pass_at_k: need 0 <= c <= n, got n={n_arr.tolist()} c={c_arr.tolist()}")
    if n_arr.size and n_arr.min() < k:
        raise ValueError(
            f"pass_at_k: k={k} exceeds the number of samples n={int(n_arr.min())} "
            "(C(n, k) = 0: pass@k is undefined)"
        )
    n_max = int(n_arr.max()) if n_arr.size else 0
    i = np.arange(1, n_max + 1, dtype=np.float64)  # [n_max]
    # factor i of the product is used by a problem when n - c < i <= n
    used = (i > (n_arr - c_arr)[..., None]) & (i <= n_arr[..., None])  # [..., n_max]
    ratio = np.where(used, 1.0 - k / i, 1.0).prod(axis=-1)
    return np.where(n_arr - c_arr < k, 1.0, 1.0 - ratio)


def bootstrap_ci(
    values: Sequence[float] | np.ndarray,
    *,
    n_boot: int = DEFAULT_N_BOOT,
    confidence: float = DEFAULT_CONFIDENCE,
    seed: int = 0,
) -> Interval:
    """Mean of ``values: [P]`` (one number per problem) with a percentile bootstrap interval.

    Method: draw ``n_boot`` resamples of the P problems with replacement (numpy's PCG64 seeded
    with ``seed``), take each resample's mean, and report the ``(1 - confidence) / 2`` and
    ``(1 + confidence) / 2`` quantiles (linear interpolation) of those means. The point
    estimate is the mean of the original values. The same (P, n_boot, seed) gives the same
    resampled indices, so intervals of several adapters on the same problems are comparable.
    """
    x = np.asarray(values, dtype=np.float64)
    if x.ndim != 1 or x.size == 0:
        raise ValueError(f"bootstrap_ci: values must be a non-empty 1-d array, got shape {x.shape}")
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"bootstrap_ci: confidence must be in (0, 1), got {confidence}")
    if n_boot < 1:
        raise ValueError(f"bootstrap_ci: n_boot must be >= 1, got {n_boot}")
    rng = np.random.default_rng(seed)
    means = np.empty(n_boot)
    chunk = max(1, 2_000_000 // x.size)  # bounds the [chunk, P] index matrix to ~16 MB
    for start in range(0, n_boot, chunk):
        rows = min(chunk, n_boot - start)
        means[start : start + rows] = x[rng.integers(0, x.size, size=(rows, x.size))].mean(axis=1)
    alpha = 1.0 - confidence
    lo, hi = np.quantile(means, [alpha / 2, 1 - alpha / 2])
    return Interval(float(x.mean()), float(lo), float(hi))


def paired_bootstrap_diff(
    a: Sequence[float] | np.ndarray,
    b: Sequence[float] | np.ndarray,
    *,
    n_boot: int = DEFAULT_N_BOOT,
    confidence: float = DEFAULT_CONFIDENCE,
    seed: int = 0,
) -> Interval:
    """Mean of ``a - b`` with a paired percentile bootstrap interval.

    a, b: ``[P]``, the same problems in the same order (e.g. pass@k of two adapters). Problems
    are resampled as pairs, so the problem-to-problem variation both adapters share cancels:
    the interval is much narrower than one from two independent intervals. An interval that
    excludes 0 says ``a`` and ``b`` differ at that confidence.
    """
    a_arr, b_arr = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a_arr.shape != b_arr.shape:
        raise ValueError(
            f"paired_bootstrap_diff: a and b must have the same shape (the same problems), "
            f"got {a_arr.shape} and {b_arr.shape}"
        )
    return bootstrap_ci(a_arr - b_arr, n_boot=n_boot, confidence=confidence, seed=seed)


def usable_ks(ks: Sequence[int], n_min: int) -> tuple[list[int], dict[str, str]]:
    """The ks that every problem supports (k <= n_min), and a note per refused k."""
    used = [k for k in ks if k <= n_min]
    skipped = {
        f"pass@{k}": f"k={k} > n={n_min} (the fewest samples of any problem)"
        for k in ks
        if k > n_min
    }
    return used, skipped


def _counts(results: Mapping[str, tuple[int, int]], ids: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """``(n, c)``, each ``[P]``, in the order of ``ids``."""
    return np.array([results[p][0] for p in ids]), np.array([results[p][1] for p in ids])


def pass_at_k_table(
    results: Mapping[str, tuple[int, int]],
    ks: Sequence[int] = DEFAULT_KS,
    *,
    n_boot: int = DEFAULT_N_BOOT,
    confidence: float = DEFAULT_CONFIDENCE,
    seed: int = 0,
) -> dict[str, Any]:
    """pass@k per problem and averaged, with bootstrap intervals, for one adapter.

    results: ``problem_id -> (n, c)``. Only ``k <= min n`` are computed (a k that some problem
    cannot support would silently mix estimators); the others are listed in ``skipped`` with
    the reason. Returns a JSON-ready dict::

        {"n_problems": P, "n_min": int, "n_max": int, "ks": [1, 5],
         "pass_at_k": {"pass@1": {"mean", "lo", "hi"}, ...},
         "skipped": {"pass@10": "k=10 > n=5 ..."},
         "confidence": 0.95, "n_boot": 10000, "seed": 0,
         "per_problem": {problem_id: {"n", "c", "pass@1", ...}}}
    """
    if not results:
        raise ValueError("pass_at_k_table: no results (expected problem_id -> (n, c))")
    ids = list(results)
    n, c = _counts(results, ids)
    used, skipped = usable_ks(ks, int(n.min()))
    if not used:
        raise ValueError(f"pass_at_k_table: no k in {list(ks)} is <= n={int(n.min())}: {skipped}")
    per_k = {k: pass_at_k(n, c, k) for k in used}
    per_problem = {
        p: {"n": int(n[j]), "c": int(c[j]), **{f"pass@{k}": float(per_k[k][j]) for k in used}}
        for j, p in enumerate(ids)
    }
    summary = {
        f"pass@{k}": bootstrap_ci(v, n_boot=n_boot, confidence=confidence, seed=seed)._asdict()
        for k, v in per_k.items()
    }
    return {
        "n_problems": len(ids),
        "n_min": int(n.min()),
        "n_max": int(n.max()),
        "ks": used,
        "pass_at_k": summary,
        "skipped": skipped,
        "confidence": confidence,
        "n_boot": n_boot,
        "seed": seed,
        "per_problem": per_problem,
    }


def pass_at_k_diff(
    results_a: Mapping[str, tuple[int, int]],
    results_b: Mapping[str, tuple[int, int]],
    ks: Sequence[int] = DEFAULT_KS,
    *,
    n_boot: int = DEFAULT_N_BOOT,
    confidence: float = DEFAULT_CONFIDENCE,
    seed: int = 0,
) -> dict[str, Any]:
    """pass@k(a) - pass@k(b) with paired bootstrap intervals; both on the same problems.

    Returns ``{"ks": [...], "diff": {"pass@1": {"mean", "lo", "hi"}, ...}, "skipped": {...}}``.
    """
    if set(results_a) != set(results_b):
        only_a = sorted(set(results_a) - set(results_b))[:5]
        only_b = sorted(set(results_b) - set(results_a))[:5]
        raise ValueError(
            "pass_at_k_diff: the two adapters must be evaluated on the same problems; "
            f"only in a: {only_a}, only in b: {only_b}"
        )
    if not results_a:
        raise ValueError("pass_at_k_diff: no results (expected problem_id -> (n, c))")
    ids = list(results_a)
    (na, ca), (nb, cb) = _counts(results_a, ids), _counts(results_b, ids)
    used, skipped = usable_ks(ks, int(min(na.min(), nb.min())))
    if not used:
        raise ValueError(f"pass_at_k_diff: no k in {list(ks)} fits both adapters' n: {skipped}")
    diff = {
        f"pass@{k}": paired_bootstrap_diff(
            pass_at_k(na, ca, k), pass_at_k(nb, cb, k),
            n_boot=n_boot, confidence=confidence, seed=seed,
        )._asdict()
        for k in used
    }
    return {"ks": used, "diff": diff, "skipped": skipped, "confidence": confidence}
