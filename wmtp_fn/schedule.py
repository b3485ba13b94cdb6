"""Learning-rate schedules: linear warm-up from 0, then cosine / linear decay or constant.

``lr_at`` is a pure function of a Python step number, so it never touches a device and the
step function can pass the scheduled learning rate to the optimizer kernels as a float.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

_KINDS = ("cosine", "linear", "constant")


@dataclass(frozen=True)
class ScheduleConfig:
    """Warm-up and decay shape of the learning rate.

    kind: ``"cosine"`` or ``"linear"`` decay from ``base_lr`` (at ``warmup_steps``) to
        ``min_lr_ratio · base_lr`` (at ``total_steps``, and held there after), or
        ``"constant"`` (``base_lr`` after warm-up; ``min_lr_ratio`` is unused).
    warmup_steps: steps of linear warm-up; ``lr(0) = 0``, ``lr(warmup_steps) = base_lr``.
    total_steps: the step at which decay ends; must exceed ``warmup_steps`` for the
        decaying kinds (the decay needs at least one step).
    min_lr_ratio: the final fraction of ``base_lr``, in ``[0, 1]``.
    """

    kind: Literal["cosine", "linear", "constant"] = "cosine"
    warmup_steps: int = 0
    total_steps: int = 1
    min_lr_ratio: float = 0.0

    def __post_init__(self) -> None:
        if self.kind not in _KINDS:
            raise ValueError(f"ScheduleConfig.kind must be one of {_KINDS}, got {self.kind!r}")
        for name in ("warmup_steps", "total_steps"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise ValueError(f"ScheduleConfig.{name} must be an int >= 0, got {v!r}")
        if self.kind != "constant" and self.total_steps <= self.warmup_steps:
            raise ValueError(
                f"ScheduleConfig(kind={self.kind!r}) needs total_steps > warmup_steps, got "
                f"total_steps={self.total_steps}, warmup_steps={self.warmup_steps}"
            )
        if not (0.0 <= self.min_lr_ratio <= 1.0):
            raise ValueError(f"ScheduleConfig.min_lr_ratio must be in [0, 1], got {self.min_lr_ratio!r}")


def lr_at(step: int, base_lr: float, cfg: ScheduleConfig) -> float:
    """The learning rate for optimizer step ``step`` (0-based).

    Warm-up: ``base_lr · step / warmup_steps`` for ``step < warmup_steps``. Then, with
    ``p = (step − warmup) / (total − warmup)`` clipped to ``[0, 1]`` and ``m = min_lr_ratio``:
    cosine ``base_lr · (m + (1 − m) · (1 + cos πp) / 2)``,
    linear ``base_lr · (m + (1 − m)(1 − p))``, constant ``base_lr``.
    """
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise ValueError(f"step must be an int >= 0, got {step!r}")
    if not (base_lr >= 0.0 and math.isfinite(base_lr)):
        raise ValueError(f"base_lr must be finite and >= 0, got {base_lr!r}")
    if step < cfg.warmup_steps:
        return base_lr * step / cfg.warmup_steps
    if cfg.kind == "constant":
        return base_lr
    progress = min(1.0, (step - cfg.warmup_steps) / (cfg.total_steps - cfg.warmup_steps))
    m = cfg.min_lr_ratio
    if cfg.kind == "cosine":
        shape = 0.5 * (1.0 + math.cos(math.pi * progress))
    else:
        shape = 1.0 - progress
    return base_lr * (m + (1.0 - m) * shape)
