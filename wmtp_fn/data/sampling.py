"""Seeded, deterministic samplers over an ``Index`` (pure functions of their arguments).

Randomness: ``numpy.random.Generator(PCG64)`` seeded with a ``SeedSequence`` of integer words
``[seed, stream, ...]``; each use has its own stream (difficulty sampling, pairs of one problem,
the order of one epoch), so e.g. adding a problem does not change the pairs of another, and an
epoch's order does not depend on how many batches were drawn before it. The same arguments
give the same result on any machine with the same numpy (PCG64's raw stream is fixed by NEP 19;
``permutation``/``choice`` are stable in practice, though numpy does not promise it across
major versions).

Resuming: a sample is a pure function of ``(index, config, seed)``, so a resumed run recomputes
it and continues from the saved ``Cursor`` of ``next_batch``.

- ``sample_by_difficulty``: ``n_samples`` split across ``bins`` by ``weights`` (largest
  remainder, ties by bin name), within a bin ``round(correct_ratio * n_bin)`` correct records
  (round half up) and the rest incorrect, drawn uniformly over the bin's records without
  replacement while possible (full passes over a shuffled pool, then a partial one).
- ``sample_pairs``: unique (correct, incorrect) offset pairs of the same problem, at most
  ``max_pairs_per_problem`` per problem, optionally only within the same length bucket.
- ``next_batch``: epoch-wise permutations, resumable from a JSON-able ``Cursor``.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from wmtp_fn.data.index import Index

DEFAULT_BINS: dict[str, tuple[int, int]] = {"all": (1, 25)}
DEFAULT_WEIGHTS: dict[str, float] = {"all": 1.0}

# Stream ids keep the uses of one seed independent of each other.
_STREAM_DIFFICULTY = 1
_STREAM_PAIRS = 2
_STREAM_PAIR_ORDER = 3
_STREAM_EPOCH = 4


def _rng(seed: int, *words: int) -> np.random.Generator:
    if type(seed) is not int or seed < 0:
        raise ValueError(f"seed must be an int >= 0, got {seed!r}")
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence([seed, *words])))


def _name_word(name: str) -> int:
    # A stable 32-bit word per name (hash() is salted per process).
    return zlib.crc32(name.encode("utf-8"))


def check_bins(
    bins: Mapping[str, Sequence[int]], weights: Mapping[str, float]
) -> list[tuple[str, int, int, float]]:
    """Validate ``difficulty_bins``/``difficulty_weights`` → ``[(name, lo, hi, weight)]`` by name."""
    if not bins:
        raise ValueError("difficulty_bins is empty: give at least one bin, e.g. {'all': [1, 25]}")
    for name in weights:
        if name not in bins:
            raise ValueError(
                f"difficulty_weights names unknown bin {name!r} (bins: {', '.join(sorted(bins))})"
            )
    out = []
    for name in sorted(bins):
        lo_hi = bins[name]
        if (
            len(lo_hi) != 2
            or not all(type(v) is int for v in lo_hi)
            or lo_hi[0] > lo_hi[1]
        ):
            raise ValueError(
                f"difficulty_bins[{name!r}]: expected [lo, hi] ints with lo <= hi, got {list(lo_hi)!r}"
            )
        if name not in weights:
            raise ValueError(f"difficulty_weights has no weight for bin {name!r}")
        w = weights[name]
        if isinstance(w, bool) or not isinstance(w, (int, float)) or not math.isfinite(w) or w < 0:
            raise ValueError(f"difficulty_weights[{name!r}]: expected a finite number >= 0, got {w!r}")
        out.append((name, lo_hi[0], lo_hi[1], float(w)))
    if sum(w for *_, w in out) <= 0:
        raise ValueError("difficulty_weights sum to 0: at least one bin needs a positive weight")
    return out


def split_counts(n: int, weights: Sequence[float]) -> list[int]:
    """Split ``n`` into integers proportional to ``weights`` (largest remainder; ties → first)."""
    total = sum(weights)
    quotas = [n * w / total for w in weights]
    counts = [math.floor(q) for q in quotas]
    by_remainder = sorted(range(len(weights)), key=lambda i: (-(quotas[i] - counts[i]), i))
    for i in by_remainder[: n - sum(counts)]:
        counts[i] += 1
    return counts


def _draw(pool: Sequence[Any], k: int, rng: np.random.Generator) -> list[Any]:
    """``k`` items: whole shuffled passes over ``pool`` (no repeats within a pass), then a part."""
    out: list[Any] = []
    while len(out) < k:
        order = rng.permutation(len(pool))[: k - len(out)]
        out.extend(pool[i] for i in order)
    return out


def _problems_in(index: Index, lo: int, hi: int) -> list[str]:
    return sorted(pid for pid, e in index["problems"].items() if lo <= e["difficulty"] <= hi)


def sample_by_difficulty(
    index: Index,
    *,
    n_samples: int,
    seed: int,
    bins: Mapping[str, Sequence[int]] = DEFAULT_BINS,
    weights: Mapping[str, float] = DEFAULT_WEIGHTS,
    correct_ratio: float = 1.0,
) -> list[int]:
    """Record offsets: ``n_samples`` split over difficulty bins, ``correct_ratio`` correct."""
    if type(n_samples) is not int or n_samples < 0:
        raise ValueError(f"n_samples must be an int >= 0, got {n_samples!r}")
    if not 0.0 <= correct_ratio <= 1.0:
        raise ValueError(f"correct_ratio must be in [0, 1], got {correct_ratio!r}")
    spec = check_bins(bins, weights)
    counts = split_counts(n_samples, [w for *_, w in spec])
    rng = _rng(seed, _STREAM_DIFFICULTY)
    out: list[int] = []
    for (name, lo, hi, _), n_bin in zip(spec, counts):
        problems = _problems_in(index, lo, hi)
        n_correct = math.floor(correct_ratio * n_bin + 0.5)
        for label, k in (("correct", n_correct), ("incorrect", n_bin - n_correct)):
            pool = sorted(o for p in problems for o in index["problems"][p][f"{label}_offsets"])
            if k > 0 and not pool:
                raise ValueError(
                    f"bin {name!r} [{lo}, {hi}]: {k} {label} samples requested but the bin has "
                    f"no {label} records ({len(problems)} problems)"
                )
            out.extend(_draw(pool, k, rng))
    return [out[i] for i in rng.permutation(len(out))]


def _bucketed(offsets: Sequence[int], lengths: Mapping[int, int] | None, width: int | None):
    if width is None:
        return {0: list(offsets)}
    groups: dict[int, list[int]] = {}
    for o in offsets:
        if o not in lengths:  # type: ignore[operator]
            raise KeyError(f"lengths has no token length for the record at byte offset {o}")
        groups.setdefault(lengths[o] // width, []).append(o)  # type: ignore[index]
    return groups


def problem_pairs(
    index: Index,
    problem_id: str,
    *,
    seed: int,
    max_pairs_per_problem: int,
    lengths: Mapping[int, int] | None = None,
    length_bucket: int | None = None,
) -> list[tuple[int, int]]:
    """Up to ``max_pairs_per_problem`` unique ``(correct, incorrect)`` offsets of one problem.

    With ``length_bucket`` (tokens), both sides must fall into the same bucket
    ``length // length_bucket`` (``lengths``: offset → token length), so the positive and the
    negative of a pair have matching lengths and a critic cannot rank by length.
    The pairs are drawn without building the full product.
    """
    entry = index["problems"][problem_id]
    pos = _bucketed(sorted(entry["correct_offsets"]), lengths, length_bucket)
    neg = _bucketed(sorted(entry["incorrect_offsets"]), lengths, length_bucket)
    blocks = [(pos[b], neg[b]) for b in sorted(pos) if b in neg]
    sizes = [len(p) * len(n) for p, n in blocks]
    total = sum(sizes)
    k = min(total, max_pairs_per_problem)
    if k == 0:
        return []
    rng = _rng(seed, _STREAM_PAIRS, _name_word(problem_id))
    starts = np.cumsum([0] + sizes)
    out = []
    for flat in rng.choice(total, size=k, replace=False).tolist():
        b = int(np.searchsorted(starts, flat, side="right")) - 1
        p, n = blocks[b]
        i, j = divmod(flat - int(starts[b]), len(n))
        out.append((p[i], n[j]))
    return out


def sample_pairs(
    index: Index,
    *,
    seed: int,
    max_pairs_per_problem: int = 60,
    n_pairs: int | None = None,
    bins: Mapping[str, Sequence[int]] = DEFAULT_BINS,
    weights: Mapping[str, float] = DEFAULT_WEIGHTS,
    lengths: Mapping[int, int] | None = None,
    length_bucket: int | None = None,
) -> list[tuple[int, int]]:
    """Unique ``(correct_offset, incorrect_offset)`` pairs of the same problem, shuffled.

    Every problem in a bin contributes ``problem_pairs`` (at most ``max_pairs_per_problem``).
    ``n_pairs=None`` returns all of them; otherwise ``n_pairs`` is split across bins by weight
    and each bin's share is drawn without replacement (asking for more pairs than a bin has is
    an error, since pairs must stay unique). Bins must not overlap.
    """
    if type(max_pairs_per_problem) is not int or max_pairs_per_problem < 1:
        raise ValueError(f"max_pairs_per_problem must be an int >= 1, got {max_pairs_per_problem!r}")
    if (length_bucket is None) != (lengths is None):
        raise ValueError("length balancing needs both `lengths` and `length_bucket` (or neither)")
    if length_bucket is not None and (type(length_bucket) is not int or length_bucket < 1):
        raise ValueError(f"length_bucket must be an int >= 1, got {length_bucket!r}")
    spec = check_bins(bins, weights)
    for i, (a, alo, ahi, _) in enumerate(spec):
        for b, blo, bhi, _ in spec[i + 1:]:
            if alo <= bhi and blo <= ahi:
                raise ValueError(
                    f"difficulty_bins overlap ({a!r} [{alo}, {ahi}] and {b!r} [{blo}, {bhi}]): "
                    "pairs must be unique"
                )
    pools = [
        [
            pair
            for pid in _problems_in(index, lo, hi)
            for pair in problem_pairs(
                index, pid, seed=seed, max_pairs_per_problem=max_pairs_per_problem,
                lengths=lengths, length_bucket=length_bucket,
            )
        ]
        for _, lo, hi, _ in spec
    ]
    rng = _rng(seed, _STREAM_PAIR_ORDER)
    if n_pairs is None:
        out = [pair for pool in pools for pair in pool]
    else:
        if type(n_pairs) is not int or n_pairs < 0:
            raise ValueError(f"n_pairs must be an int >= 0 or None, got {n_pairs!r}")
        out = []
        for (name, lo, hi, _), pool, k in zip(spec, pools, split_counts(n_pairs, [w for *_, w in spec])):
            if k > len(pool):
                raise ValueError(
                    f"bin {name!r} [{lo}, {hi}]: {k} pairs requested but only {len(pool)} unique "
                    f"pairs exist (max_pairs_per_problem={max_pairs_per_problem}); "
                    "lower n_pairs or use n_pairs=None for all"
                )
            out.extend(pool[i] for i in rng.permutation(len(pool))[:k])
    return [out[i] for i in rng.permutation(len(out))]


@dataclass(frozen=True)
class Cursor:
    """Where a run is in its data: epoch ``epoch``, the next item is ``position`` of that epoch's
    permutation. JSON-able through ``to_dict``/``from_dict``; store it in the checkpoint."""

    seed: int
    epoch: int = 0
    position: int = 0

    def to_dict(self) -> dict[str, int]:
        return asdict(self)

    @staticmethod
    def from_dict(obj: Mapping[str, Any]) -> Cursor:
        if not isinstance(obj, Mapping):
            raise ValueError(f"cursor: expected a dict, got {type(obj).__name__}")
        unknown = sorted(set(obj) - {"seed", "epoch", "position"})
        if unknown:
            raise ValueError(f"cursor: unknown key {unknown[0]!r} (expected seed, epoch, position)")
        for key in ("seed", "epoch", "position"):
            if key not in obj:
                raise ValueError(f"cursor: missing key {key!r}")
            if type(obj[key]) is not int or obj[key] < 0:
                raise ValueError(f"cursor: {key!r} must be an int >= 0, got {obj[key]!r}")
        return Cursor(obj["seed"], obj["epoch"], obj["position"])


def epoch_permutation(n_items: int, seed: int, epoch: int) -> np.ndarray:
    """The order of epoch ``epoch``: a permutation of ``range(n_items)``, ``[n_items]`` int64."""
    return _rng(seed, _STREAM_EPOCH, epoch).permutation(n_items)


def next_batch(
    n_items: int, batch_size: int, cursor: Cursor, *, drop_last: bool = False
) -> tuple[list[int], Cursor]:
    """The next batch of item indices and the advanced cursor.

    A batch never spans two epochs: the last batch of an epoch is shorter, or with ``drop_last``
    it is skipped and the batch comes from the start of the next epoch. Costs O(n_items) per
    call (the epoch's permutation is recomputed, not stored).
    """
    if type(n_items) is not int or n_items < 1:
        raise ValueError(f"n_items must be an int >= 1, got {n_items!r}")
    if type(batch_size) is not int or batch_size < 1:
        raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")
    if drop_last and batch_size > n_items:
        raise ValueError(
            f"drop_last with batch_size={batch_size} > n_items={n_items} would never yield a batch"
        )
    if not 0 <= cursor.position < n_items:
        raise ValueError(
            f"cursor position {cursor.position} is outside an epoch of {n_items} items "
            "(was the cursor saved for a different dataset?)"
        )
    epoch, position = cursor.epoch, cursor.position
    if drop_last and n_items - position < batch_size:
        epoch, position = epoch + 1, 0
    end = min(position + batch_size, n_items)
    batch = epoch_permutation(n_items, cursor.seed, epoch)[position:end].tolist()
    if end == n_items or (drop_last and n_items - end < batch_size):
        epoch, end = epoch + 1, 0
    return batch, Cursor(cursor.seed, epoch, end)


# --------------------------------------------------------------------------- the seeds' pair rule

_STREAM_SEEDS_PAIRS = 5
# Length bins of the seeds' length-balanced critic pairs: the first edge b with length < b.
SEEDS_LENGTH_EDGES: tuple[int, ...] = (0, 50, 100, 125, 150, 175, 200, 250, 300, 350, 400, 500, 600, 800, 1000, 1500, 2000)


def seeds_length_bin(n_tokens: int) -> str:
    """``"<b"`` for the first edge ``b`` of ``SEEDS_LENGTH_EDGES`` with ``n_tokens < b``, else
    ``"2000+"``."""
    for edge in SEEDS_LENGTH_EDGES:
        if n_tokens < edge:
            return f"<{edge}"
    return f"{SEEDS_LENGTH_EDGES[-1]}+"


def seeds_problem_pairs(
    index: Index, problem_id: str, *, seed: int, max_pairs_per_problem: int, lengths: Mapping[int, int] | None = None
) -> list[tuple[int, int]]:
    """The seeds' pairs of one problem: correct and incorrect records shuffled and matched one
    to one, so every record is used at most once: ``min(#correct, #incorrect,
    max_pairs_per_problem)`` pairs. With ``lengths`` (offset → tokens) both members must share a
    ``seeds_length_bin``; the per-problem cap applies after that matching."""
    entry = index["problems"][problem_id]
    rng = _rng(seed, _STREAM_SEEDS_PAIRS, _name_word(problem_id))
    pos = [entry["correct_offsets"][i] for i in rng.permutation(len(entry["correct_offsets"]))]
    neg = [entry["incorrect_offsets"][i] for i in rng.permutation(len(entry["incorrect_offsets"]))]
    if lengths is None:
        return list(zip(pos, neg))[:max_pairs_per_problem]
    by_bin: dict[str, tuple[list[int], list[int]]] = {}
    for side, offsets in ((0, pos), (1, neg)):
        for o in offsets:
            if o not in lengths:
                raise KeyError(f"lengths has no token length for the record at byte offset {o}")
            by_bin.setdefault(seeds_length_bin(lengths[o]), ([], []))[side].append(o)
    matched = [pair for p, n in by_bin.values() for pair in zip(p, n)]
    return [matched[i] for i in rng.permutation(len(matched))[:max_pairs_per_problem]]


def seeds_pairs(
    index: Index,
    *,
    n_pairs: int,
    seed: int,
    bins: Mapping[str, Sequence[int]] = DEFAULT_BINS,
    weights: Mapping[str, float] = DEFAULT_WEIGHTS,
    max_pairs_per_problem: int = 60,
    lengths: Mapping[int, int] | None = None,
) -> list[tuple[int, int]]:
    """``n_pairs`` (correct, incorrect) offset pairs by the research code's rule (``sampling =
    "seeds_pairs"``), shuffled.

    Only problems with a difficulty inside a bin and at least one record of each label take
    part; each gives ``seeds_problem_pairs``. Bin targets are ``int(n_pairs · w)`` over the bins
    that have pairs (an empty bin's weight is spread over the others), the remainder one each to
    the bins with the most pairs; a bin with fewer pairs than its target is an error. With
    ``lengths`` (length-balanced critic pairs) the weights are ignored, as the seeds did: the bins
    only filter, and ``n_pairs`` are drawn from all of their pairs. Pointwise objectives keep the
    correct member of each pair.
    """
    if type(n_pairs) is not int or n_pairs < 1:
        raise ValueError(f"n_pairs must be an int >= 1, got {n_pairs!r}")
    if type(max_pairs_per_problem) is not int or max_pairs_per_problem < 1:
        raise ValueError(f"max_pairs_per_problem must be an int >= 1, got {max_pairs_per_problem!r}")
    spec = check_bins(bins, weights)
    taken: set[str] = set()  # a problem in two overlapping bins is paired once
    pools: list[list[tuple[int, int]]] = []
    for _, lo, hi, _ in spec:
        pool = []
        for pid in _problems_in(index, lo, hi):
            if pid not in taken:
                taken.add(pid)
                pool += seeds_problem_pairs(index, pid, seed=seed, max_pairs_per_problem=max_pairs_per_problem, lengths=lengths)
        pools.append(pool)
    rng = _rng(seed, _STREAM_SEEDS_PAIRS)
    if lengths is not None:
        spec = [("all bins", min(s[1] for s in spec), max(s[2] for s in spec), 1.0)]
        pools = [[pair for pool in pools for pair in pool]]
    targets = _seeds_targets(n_pairs, [w for *_, w in spec], [len(p) for p in pools])
    out = []
    for (name, lo, hi, _), pool, k in zip(spec, pools, targets):
        if k > len(pool):
            raise ValueError(
                f"bin {name!r} [{lo}, {hi}]: {k} pairs requested but only {len(pool)} exist "
                f"(max_pairs_per_problem={max_pairs_per_problem}); lower n_pairs or widen the bins"
            )
        out += [pool[i] for i in rng.permutation(len(pool))[:k]]
    return [out[i] for i in rng.permutation(len(out))]


def _seeds_targets(n: int, weights: Sequence[float], available: Sequence[int]) -> list[int]:
    """``int(n · w)`` per bin with pairs (weights renormalised over them), the remainder one
    each to the bins with the most pairs (ties: the first bin)."""
    live = [w if a > 0 else 0.0 for w, a in zip(weights, available)]
    total = sum(live)
    if total == 0:
        raise ValueError("no bin with a positive weight has any (correct, incorrect) pair")
    targets = [int(n * w / total) for w in live]
    richest = sorted((i for i, w in enumerate(live) if w > 0), key=lambda i: (-available[i], i))
    for j in range(n - sum(targets)):
        targets[richest[j % len(richest)]] += 1
    return targets
