"""Per-step randomness derived from ``(seed, step, rank)``, so resuming needs no generator state.

Every train step runs under ``seeded(step_seed(seed, step, rank), device)``: the global
generators are forked (restored on exit) and re-seeded from the triple. A resumed run at step
``s`` therefore draws the same dropout masks as the uninterrupted run, each data-parallel rank
draws its own masks, and the step leaves the caller's global RNG untouched.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch

_MASK64 = (1 << 64) - 1


def _splitmix64(x: int) -> int:
    """One round of SplitMix64 (Steele et al. 2014): a bijective, well-mixing 64-bit hash."""
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def step_seed(seed: int, step: int, rank: int = 0) -> int:
    """A seed in ``[0, 2**63)`` for step ``step`` on data-parallel rank ``rank`` of the run
    seeded ``seed``.

    Pure and platform-independent (integer arithmetic only; Python's ``hash`` is not stable
    across versions). Nearby triples give unrelated seeds. Rank 0 gets the seed of a
    single-process run (the rank is folded in by one more mixing round only for rank > 0), so
    adding ranks does not change what rank 0 draws.
    """
    for name, v in (("seed", seed), ("step", step), ("rank", rank)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 0:
            raise ValueError(f"step_seed: {name} must be an int >= 0, got {v!r}")
    x = _splitmix64(_splitmix64(seed & _MASK64) ^ (step & _MASK64))
    if rank:
        x = _splitmix64(x ^ (rank & _MASK64))
    return x >> 1


@contextmanager
def seeded(seed: int, device: torch.device | str = "cpu") -> Iterator[None]:
    """Run the block with the CPU generator (and, for a CUDA ``device``, that device's
    generator) seeded to ``seed``; all of them are restored afterwards."""
    device = torch.device(device)
    cuda = []
    if device.type == "cuda":
        cuda = [device.index if device.index is not None else torch.cuda.current_device()]
    with torch.random.fork_rng(devices=cuda):
        torch.default_generator.manual_seed(seed)
        for index in cuda:
            with torch.cuda.device(index):
                torch.cuda.manual_seed(seed)
        yield
