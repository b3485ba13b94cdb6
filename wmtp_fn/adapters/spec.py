"""What an adapter is, apart from its weights: rank, scaling, variant, targets, base.

The spec travels with the adapter's TensorDict (saved beside it as JSON) and is all that the
binding code needs to turn the fp32 master leaves into the tensors a slot computes with.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable, Mapping
from typing import Any

# HuggingFace Llama linear names, in the order PEFT and the seeds list them.
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# Meta's (MTP) names for the same linears.
META_ALIASES = {
    "wq": "q_proj",
    "wk": "k_proj",
    "wv": "v_proj",
    "wo": "o_proj",
    "w1": "gate_proj",
    "w3": "up_proj",
    "w2": "down_proj",
}


def resolve_targets(names: Iterable[str] | str) -> tuple[str, ...]:
    """Canonical HF target names, in `TARGETS` order; Meta aliases accepted, unknown names rejected."""
    if isinstance(names, str):
        names = ["all"] if names == "all" else [names]
    names = list(names)
    if names == ["all"]:
        return TARGETS
    out = set()
    for name in names:
        canonical = META_ALIASES.get(name, name)
        if canonical not in TARGETS:
            raise ValueError(
                f"unknown LoRA target {name!r}; valid names are {', '.join(TARGETS)} "
                f"(or Meta aliases {', '.join(META_ALIASES)}, or 'all')"
            )
        out.add(canonical)
    if not out:
        raise ValueError("LoRA targets are empty; name at least one of " + ", ".join(TARGETS))
    return tuple(t for t in TARGETS if t in out)


@dataclasses.dataclass(frozen=True)
class AdapterSpec:
    """Hyper-parameters and identity of one LoRA adapter.

    rank, alpha: `W' = W + s·B·A` with `s = alpha / rank` (rsLoRA: `alpha / sqrt(rank)`).
    dropout: probability of dropping LoRA *inputs* in training (the base path never sees it).
    targets: canonical linear names (see `resolve_targets`); layers: decoder-layer indices the
    adapter covers (None = all). use_dora: add a per-row magnitude (DoRA, PEFT's math).
    base_fingerprint: the `models.base.fingerprint` of the base it was initialised on.
    """

    rank: int = 16
    alpha: float = 32.0
    dropout: float = 0.0
    targets: tuple[str, ...] = TARGETS
    layers: tuple[int, ...] | None = None
    use_rslora: bool = False
    use_dora: bool = False
    base_fingerprint: Mapping[str, str] | None = None

    def __post_init__(self):
        object.__setattr__(self, "targets", resolve_targets(self.targets))
        if self.layers is not None:
            object.__setattr__(self, "layers", tuple(sorted({int(i) for i in self.layers})))
        if self.base_fingerprint is not None:
            object.__setattr__(self, "base_fingerprint", dict(self.base_fingerprint))
        if not (isinstance(self.rank, int) and self.rank > 0):
            raise ValueError(f"AdapterSpec.rank must be a positive int, got {self.rank!r}")
        if not (isinstance(self.alpha, (int, float)) and self.alpha > 0):
            raise ValueError(f"AdapterSpec.alpha must be a positive number, got {self.alpha!r}")
        if not (0.0 <= float(self.dropout) < 1.0):
            raise ValueError(f"AdapterSpec.dropout must be in [0, 1), got {self.dropout!r}")

    @property
    def scaling(self) -> float:
        return self.alpha / (math.sqrt(self.rank) if self.use_rslora else self.rank)

    @property
    def variant(self) -> str:
        return ("rs" if self.use_rslora else "") + ("dora" if self.use_dora else "lora")

    def replace(self, **changes: Any) -> "AdapterSpec":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["targets"] = list(self.targets)
        d["layers"] = None if self.layers is None else list(self.layers)
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "AdapterSpec":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown AdapterSpec field(s) {unknown}; expected a subset of {sorted(known)}")
        d = dict(d)
        if d.get("targets") is not None:
            d["targets"] = tuple(d["targets"])
        if d.get("layers") is not None:
            d["layers"] = tuple(d["layers"])
        return cls(**d)
