"""Per-step randomness derived from ``(seed, step)``, so resuming needs no generator state.

Every train step runs under ``seeded(step_seed(rng, step), device)``: the global generators
are forked (restored on exit) and re-seeded from the pair. A resumed run at step ``s``
therefore draws the same dropout masks as the uninterrupted run, and the step leaves the
caller's global RNG untouched.
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


def step_seed(rng: int, step: int) -> int:
    """A seed in ``[0, 2**63)`` for step ``step`` of the run seeded ``rng``.

    Pure and platform-independent (integer arithmetic only; Python's ``hash`` is not stable
    across versions). Nearby ``(rng, step)`` pairs give unrelated seeds.
    """
    for name, v in (("rng", rng), ("step", step)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 0:
            raise ValueError(f"step_seed: {name} must be an int >= 0, got {v!r}")
    return _splitmix64(_splitmix64(rng & _MASK64) ^ (step & _MASK64)) >> 1


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
