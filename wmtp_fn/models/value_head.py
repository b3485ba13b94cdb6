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


# ------------------------------------------------------------------------ the seeds' key names

# The seeds' heads were nn.Modules: `linear` (linear and sigmoid heads) or an `mlp`
# nn.Sequential of Linear, GELU, Dropout, Linear, GELU, Dropout, Linear (so indices 0, 3, 6).
SEEDS_NAMES: dict[str, dict[str, str]] = {
    "linear": {"out": "linear"},
    "sigmoid": {"out": "linear"},
    "mlp": {"fc1": "mlp.0", "fc2": "mlp.3", "out": "mlp.6"},
}


def to_seeds_state(params: TensorDict, kind: Kind) -> dict[str, Tensor]:
    """The seeds' `value_head_state_dict` of a ``kind`` head (CPU tensors, ``mlp.0.weight`` /
    ``linear.bias`` names)."""
    _check_kind(kind)
    return {f"{seeds}.{leaf}": params[name, leaf].detach().cpu() for name, seeds in SEEDS_NAMES[kind].items()
            for leaf in ("weight", "bias")}


def seeds_kind(state: Mapping[str, Tensor], seeds_config: Mapping[str, Any] | None = None) -> Kind:
    """The kind of a seeds' `value_head_state_dict`: ``mlp.*`` keys are an mlp head; ``linear.*``
    keys are a linear or a sigmoid head, told apart by the seeds' run config
    (``training.value_head_type``)."""
    if any(k.startswith("mlp.") for k in state):
        return "mlp"
    if "linear.weight" not in state:
        raise ValueError(f"value_head_state_dict: expected mlp.* or linear.* keys (the seeds' heads), got {sorted(state)}")
    training = (seeds_config or {}).get("training") or {}
    kind = training.get("value_head_type") if isinstance(training, Mapping) else None
    if kind not in ("linear", "sigmoid"):
        raise ValueError(
            "value_head_state_dict: 'linear.*' keys fit a linear or a sigmoid head and the checkpoint's "
            f"config.training.value_head_type is {kind!r}; pass the head kind"
        )
    return kind


def from_seeds_state(state: Mapping[str, Tensor], kind: Kind) -> TensorDict:
    """Inverse of `to_seeds_state`: fp32 head parameters; a missing bias (the seeds' heads
    built with ``bias=False``) reads as zeros. A key that fits no layer is a ``ValueError``."""
    _check_kind(kind)
    known = {f"{seeds}.{leaf}" for seeds in SEEDS_NAMES[kind].values() for leaf in ("weight", "bias")}
    unknown = sorted(set(state) - known)
    if unknown:
        raise ValueError(f"value_head_state_dict: unexpected key {unknown[0]!r} for a {kind} head (expected {sorted(known)})")
    layers = {}
    for name, seeds in SEEDS_NAMES[kind].items():
        if f"{seeds}.weight" not in state:
            raise ValueError(f"value_head_state_dict: missing {seeds + '.weight'!r} of a {kind} head")
        weight = state[f"{seeds}.weight"].float()
        bias = state.get(f"{seeds}.bias")
        layers[name] = {"weight": weight, "bias": torch.zeros(weight.shape[0]) if bias is None else bias.float()}
    return TensorDict(layers, batch_size=[])


def read_seed_critic(path, model, *, head_kind: Kind | None = None, trusted: bool = False):
    """A critic written by the seeds (an `hf_lora` file with a `value_head_state_dict`):
    `(adapter, adapter_spec, head, head_spec)`, the adapter re-rooted onto `model` (a slotted
    base module or record, `adapters.seeds_io.read_seed_checkpoint`: `backbone.` prefixes and
    `._checkpoint_wrapped_module` infixes stripped, `optimizer_state_dict` ignored), validated,
    with `model`'s fingerprint, and everything on `model`'s device. `head_kind` overrides the
    kind the file's config names (`linear.*` keys fit a linear and a sigmoid head alike).
    `trusted` allows pickled objects (only for files you made)."""
    from pathlib import Path

    from wmtp_fn.adapters.lora import module_and_fingerprint
    from wmtp_fn.adapters.seeds_io import read_seed_checkpoint
    from wmtp_fn.errors import CheckpointError

    path = Path(path)
    module, fingerprint = module_and_fingerprint(model)
    seed = read_seed_checkpoint(path, module, trusted=trusted)
    if seed.kind != "hf_lora":
        raise CheckpointError(f"{path}: a {seed.kind!r} checkpoint; read_seed_critic reads the seeds' hf_lora critics")
    if not seed.value_head:
        raise CheckpointError(f"{path}: value_head_state_dict is empty: not a critic (a ref_tuning adapter?)")
    try:
        kind = head_kind or seeds_kind(seed.value_head, seed.meta.get("config"))
        head = from_seeds_state(seed.value_head, kind)
    except ValueError as e:
        raise CheckpointError(f"{path}: {e}") from None
    d = head["fc1" if kind == "mlp" else "out", "weight"].shape[1]
    hidden = module.config.hidden_size
    if d != hidden:
        raise CheckpointError(f"{path}: the value head reads hidden size {d}, the base has hidden_size {hidden}")
    device = next(module.parameters()).device
    spec = seed.spec if seed.spec.base_fingerprint else seed.spec.replace(base_fingerprint=fingerprint)
    return seed.adapter.to(device), spec, head.to(device), ValueHeadSpec(kind, d)
