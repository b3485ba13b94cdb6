"""Deterministic splits by problem (never by record: no problem may leak).

Two splits, in this order: `held_out_problems` sets aside the problems a study evaluates on
(`data.heldout_fraction`, by its own fixed `data.heldout_seed`, so every pipeline and every
run seed holds out the same problems); `split_problems` then takes the validation problems
from the rest (`data.val_fraction`, by the run's seed). Training sees neither.
"""

from __future__ import annotations

import hashlib
import math

from wmtp_fn.data.index import Index, subset
from wmtp_fn.errors import ConfigError


def _key(seed: int | str, problem_id: str) -> str:
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


def held_out_problems(index: Index, fraction: float, seed: int = 0) -> tuple[list[str], list[str]]:
    """``(rest_ids, held_out_ids)``: ``round(fraction * n)`` problems (half up) set aside for
    evaluation, ordered by ``sha256(f"heldout:{seed}\\0{problem_id}")`` (a namespace of its own:
    the held-out set does not depend on the run's seed or on the validation split).
    ``fraction = 0`` holds out nothing."""
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"heldout_fraction must be in [0, 1), got {fraction!r}")
    ids = sorted(index["problems"], key=lambda pid: (_key(f"heldout:{seed}", pid), pid))
    n_out = math.floor(fraction * len(ids) + 0.5)
    if n_out >= len(ids):
        raise ValueError(f"heldout_fraction={fraction} leaves no problem to train on out of {len(ids)}")
    return sorted(ids[n_out:]), sorted(ids[:n_out])


def configured_held_out(index: Index, data_cfg) -> tuple[list[str], list[str]]:
    """``held_out_problems`` with a run's ``data.heldout_fraction`` / ``data.heldout_seed`` (0 for
    configs written before them); a bad fraction is a ``ConfigError`` naming the key."""
    fraction, seed = float(data_cfg.get("heldout_fraction", 0.0)), int(data_cfg.get("heldout_seed", 0))
    try:
        return held_out_problems(index, fraction, seed)
    except ValueError as e:
        raise ConfigError(f"data.{e}") from None


def run_splits(index: Index, data_cfg, seed: int) -> tuple[list[str], list[str], list[str]]:
    """``(train_ids, val_ids, held_out_ids)`` of a run's train file (no validation file)."""
    rest, held_out = configured_held_out(index, data_cfg)
    train, val = split_problems(subset(index, rest), data_cfg.val_fraction, seed)
    return train, val, held_out
