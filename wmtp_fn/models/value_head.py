"""Value heads: a per-position scalar ``v [B, T]`` read from the critic's final hidden states.

A head is data, not a module: its fp32 parameters are a small ``TensorDict`` that lives in the
trainable pytree beside the critic adapter (``params["value_head"]``), and ``value_head`` is a
pure function of them. Every layer is stored like an ``nn.Linear`` (``weight [out, in]``,
``bias [out]``) under a name that says where it sits; the last layer is always ``out``:

- ``linear``:  ``out: d -> 1``; weight and bias start at zero, so ``v = bias_init`` everywhere.
- ``sigmoid``: the linear head followed by a sigmoid (``0.5`` at init with ``bias_init = 0``).
- ``mlp``:     ``fc1: d -> d/4``, GELU, dropout, ``fc2: d/4 -> d/8``, GELU, dropout, ``out: d/8 -> 1``.
  Only ``out`` starts at zero; ``fc1``/``fc2`` start as ``nn.Linear`` does (Kaiming-uniform
  with ``a = sqrt(5)``, bias uniform in ``±1/sqrt(fan_in)``). Zeroing them too would make every
  hidden unit identical and their gradients zero, so the head could never leave its init.

``bias_init`` overwrites the bias of ``out`` (the Monte-Carlo critic starts at 0.5, pairwise
critics at 0.0). The input is the base's last hidden state after its final norm (HF Llama), or
the normalised trunk output of an MTP base; the head computes in fp32 whatever that dtype is.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any, Literal

import torch
import torch.nn.functional as F
from tensordict import TensorDict
from torch import Tensor

from wmtp_fn.errors import ConfigError

KINDS = ("linear", "sigmoid", "mlp")
SPEC_TYPE = "value_head"  # the tag that marks a value-head spec in checkpoint metadata
Kind = Literal["linear", "sigmoid", "mlp"]


def _check_kind(kind: str) -> None:
    if kind not in KINDS:
        raise ConfigError(f"value head kind must be one of {KINDS}, got {kind!r}")


def layer_shapes(kind: Kind, d: int) -> dict[str, tuple[int, int]]:
    """``{layer name: (out_features, in_features)}`` of a head of ``kind`` on hidden size ``d``,
    in forward order (the last entry is ``out``)."""
    _check_kind(kind)
    if kind != "mlp":
        return {"out": (1, d)}
    if d < 8:
        raise ConfigError(f"an mlp value head needs hidden size d >= 8 (d/4 and d/8 units), got d={d}")
    return {"fc1": (d // 4, d), "fc2": (d // 8, d // 4), "out": (1, d // 8)}


@dataclasses.dataclass(frozen=True)
class ValueHeadSpec:
    """What a value head is, apart from its weights; saved beside them in checkpoints.

    kind: ``linear`` | ``sigmoid`` | ``mlp``; d: the hidden size it reads; dropout: the mlp's
    dropout probability in training (unused by the other kinds); bias_init: the initial bias of
    the last layer.
    """

    kind: Kind
    d: int
    dropout: float = 0.2
    bias_init: float = 0.0

    def __post_init__(self) -> None:
        _check_kind(self.kind)
        if isinstance(self.d, bool) or not isinstance(self.d, int) or self.d < 1:
            raise ConfigError(f"ValueHeadSpec.d must be a positive int, got {self.d!r}")
        layer_shapes(self.kind, self.d)
        if not (0.0 <= float(self.dropout) < 1.0):
            raise ConfigError(f"ValueHeadSpec.dropout must be in [0, 1), got {self.dropout!r}")
        if not math.isfinite(float(self.bias_init)):
            raise ConfigError(f"ValueHeadSpec.bias_init must be finite, got {self.bias_init!r}")

    def to_dict(self) -> dict[str, Any]:
        return {"type": SPEC_TYPE, **dataclasses.asdict(self)}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "ValueHeadSpec":
        if d.get("type") != SPEC_TYPE:
            raise ConfigError(f"not a value-head spec: expected type {SPEC_TYPE!r}, got {d.get('type')!r}")
        fields = {f.name for f in dataclasses.fields(cls)}
        body = {k: v for k, v in d.items() if k != "type"}
        unknown = sorted(set(body) - fields)
        if unknown:
            raise ConfigError(f"unknown ValueHeadSpec field(s) {unknown}; expected a subset of {sorted(fields)}")
        return cls(**body)


def init_value_head(kind: Kind, d: int, *, bias_init: float = 0.0, seed: int = 0) -> TensorDict:
    """Fresh fp32 parameters (on the CPU, from ``seed``) of a ``kind`` head on hidden size ``d``.

    Returns ``TensorDict{name: {"weight": [out, in], "bias": [out]}}`` with names from
    ``layer_shapes``; ``out`` is zero apart from its bias, which is ``bias_init``.
    """
    gen = torch.Generator().manual_seed(seed)
    layers = {}
    for name, (n_out, n_in) in layer_shapes(kind, d).items():
        weight, bias = torch.zeros(n_out, n_in), torch.zeros(n_out)
        if name != "out":
            # nn.Linear's own initialisation, drawn from our generator.
            torch.nn.init.kaiming_uniform_(weight, a=math.sqrt(5), generator=gen)
            bias.uniform_(-1.0 / math.sqrt(n_in), 1.0 / math.sqrt(n_in), generator=gen)
        layers[name] = {"weight": weight, "bias": bias}
    layers["out"]["bias"].fill_(float(bias_init))
    return TensorDict(layers, batch_size=[])


def check_value_head(params: TensorDict, kind: Kind, d: int) -> None:
    """Raise a ``ValueError`` naming the first parameter of ``params`` that does not fit a
    ``kind`` head on hidden size ``d`` (missing, extra, or of the wrong shape)."""
    shapes = layer_shapes(kind, d)
    expected = {f"{n}.{leaf}": s if leaf == "weight" else s[:1] for n, s in shapes.items() for leaf in ("weight", "bias")}
    found = {".".join(k): tuple(v.shape) for k, v in params.items(include_nested=True, leaves_only=True)}
    for key in sorted(set(expected) | set(found)):
        if key not in found:
            raise ValueError(f"value head ({kind}, d={d}) is missing parameter {key!r} of shape {expected[key]}")
        if key not in expected:
            raise ValueError(f"value head ({kind}, d={d}) has an unexpected parameter {key!r}")
        if found[key] != expected[key]:
            raise ValueError(f"value head ({kind}, d={d}) parameter {key!r} has shape {found[key]}, expected {expected[key]}")


def _dropout(x: Tensor, p: float, generator: torch.Generator | None) -> Tensor:
    """Inverted dropout drawn from ``generator`` (``F.dropout`` takes none): keep with
    probability ``1 − p`` and rescale by ``1/(1 − p)``."""
    keep = torch.empty_like(x).bernoulli_(1.0 - p, generator=generator)
    return x * keep / (1.0 - p)


def value_head(
    params: TensorDict,
    hidden: Tensor,
    *,
    kind: Kind,
    train: bool = False,
    dropout: float = 0.2,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Per-position values of a ``kind`` head.

    params: from ``init_value_head`` (fp32). hidden: ``[B, T, d]``, any float dtype.
    train: apply the mlp's dropout (probability ``dropout``, masks drawn from ``generator``, or
    the global generator when None). Returns ``v: [B, T]`` fp32.
    """
    _check_kind(kind)
    if hidden.dim() != 3:
        raise ValueError(f"value_head expects hidden [B, T, d], got shape {tuple(hidden.shape)}")
    x = hidden.float()
    names = ["fc1", "fc2", "out"] if kind == "mlp" else ["out"]
    for name in names:
        x = F.linear(x, params[name, "weight"], params[name, "bias"])
        if name != "out":
            x = F.gelu(x)
            if train and dropout > 0:
                x = _dropout(x, dropout, generator)
    v = x.squeeze(-1)
    return torch.sigmoid(v) if kind == "sigmoid" else v
