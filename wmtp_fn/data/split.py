"""A deterministic train/validation split by problem (never by record: no problem may leak)."""

from __future__ import annotations

import hashlib
import math

from wmtp_fn.data.index import Index


def _key(seed: int, problem_id: str) -> str:
    return hashlib.sha256(f"{seed}\0{problem_id}".encode("utf-8")).hexdigest()


def split_problems(index: Index, val_fraction: float, seed: int) -> tuple[list[str], list[str]]:
    """``(train_ids, val_ids)``, each sorted, disjoint, covering every problem of ``index``.

    Problems are ordered by ``sha256(f"{seed}\\0{problem_id}")`` and the first
    ``round(val_fraction * n)`` (half up; at least 1 when ``val_fraction > 0``) go to validation.
    Hash order, unlike a shuffled list, barely moves when problems are added or removed, and it
    needs no RNG library, so the split is the same everywhere.
    """
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction!r}")
    ids = sorted(index["problems"], key=lambda pid: (_key(seed, pid), pid))
    n_val = math.floor(val_fraction * len(ids) + 0.5)
    if val_fraction > 0:
        n_val = max(n_val, 1)
    if n_val >= len(ids):
        raise ValueError(
            f"val_fraction={val_fraction} leaves no training problem out of {len(ids)}"
        )
    return sorted(ids[n_val:]), sorted(ids[:n_val])
