"""The frozen base: build or load a HuggingFace Llama, freeze it, fingerprint it.

The base is built once per process and never mutated by training. Adapters store the
fingerprint of the base they were trained on, so loading one onto another base fails loudly.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM, LlamaModel

KINDS = {"causal_lm": LlamaForCausalLM, "model": LlamaModel}

# Config fields that decide whether two bases are the same architecture.
_ARCH_FIELDS = (
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "vocab_size",
    "rms_norm_eps",
    "rope_theta",
)
# Elements hashed per tensor: enough to tell two checkpoints apart, cheap on a 7B model.
_HASH_ELEMENTS = 1 << 16


def tiny_llama_config(vocab_size: int = 1024, **overrides) -> LlamaConfig:
    """A Llama small enough for CPU tests and the embedded demo (~0.2M parameters)."""
    cfg = dict(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=176,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        tie_word_embeddings=False,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=3,
        attn_implementation="sdpa",
    )
    cfg.update(overrides)
    return LlamaConfig(**cfg)


def freeze(model: nn.Module) -> nn.Module:
    """Freeze every parameter and switch to eval mode (no HF dropout); returns the same module."""
    for p in model.parameters():
        p.requires_grad_(False)
    return model.eval()


def build_base(
    config: LlamaConfig, *, kind: str = "causal_lm", seed: int = 0, dtype: torch.dtype = torch.float32
) -> nn.Module:
    """A randomly initialised, frozen Llama (seeded, so the same seed gives the same weights)."""
    cls = _kind(kind)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = cls(config)
    return freeze(model.to(dtype))


def load_base(
    path: str | Path,
    *,
    kind: str = "causal_lm",
    dtype: torch.dtype | str = torch.float32,
    device: str | torch.device = "cpu",
    attn_implementation: str | None = "sdpa",
) -> nn.Module:
    """Load a HuggingFace Llama from a local directory (`from_pretrained`), frozen, in eval mode."""
    path = Path(path)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"base model directory {str(path)!r} has no config.json")
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    kwargs = {"dtype": dtype}
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    model = _kind(kind).from_pretrained(str(path), **kwargs)
    return freeze(model.to(device))


def fingerprint(model: nn.Module) -> dict[str, str]:
    """Identify a base: architecture, parameter shapes, dtype and a hash of a few weight tensors.

    Tensors are hashed after rounding to bfloat16 on the CPU, so the same checkpoint loaded in
    fp32 or bf16 has the same `weights` digest; `dtype` is recorded for information only
    (see `check_same_base`). Must be computed on the unsharded base (before FSDP).
    """
    cfg = getattr(model, "config", None)
    arch = {"class": type(model).__name__}
    if cfg is not None:
        arch.update({f: getattr(cfg, f, None) for f in _ARCH_FIELDS})
    named = {n: p for n, p in model.named_parameters()}
    shapes = json.dumps({n: list(p.shape) for n, p in named.items()}, sort_keys=True)
    h = hashlib.sha256()
    for name in _hashed_names(list(named)):
        flat = named[name].detach().reshape(-1)[:_HASH_ELEMENTS]
        h.update(name.encode())
        h.update(flat.to("cpu", torch.bfloat16).view(torch.int16).numpy().tobytes())
    dtype = next(iter(named.values())).dtype if named else torch.float32
    return {
        "arch": json.dumps(arch, sort_keys=True),
        "shapes": hashlib.sha256(shapes.encode()).hexdigest()[:16],
        "weights": h.hexdigest()[:16],
        "dtype": str(dtype).removeprefix("torch."),
    }


def check_same_base(expected: dict[str, str] | None, actual: dict[str, str], *, what: str = "adapter") -> None:
    """Raise if `actual` is not the base `expected` was made for (dtype may differ)."""
    if not expected:
        return
    diff = [k for k in ("arch", "shapes", "weights") if expected.get(k) != actual.get(k)]
    if diff:
        raise ValueError(
            f"{what} was made for a different base: {', '.join(diff)} differ\n"
            f"  {what} base fingerprint: {json.dumps(expected, sort_keys=True)}\n"
            f"  this base fingerprint:  {json.dumps(actual, sort_keys=True)}"
        )


def _hashed_names(names: list[str]) -> list[str]:
    """A few tensors spread over the model: first, last, and a middle one of the list."""
    if not names:
        return []
    picks = {0, len(names) // 2, len(names) - 1}
    return [names[i] for i in sorted(picks)]


def _kind(kind: str) -> type:
    if kind not in KINDS:
        raise ValueError(f"unknown base kind {kind!r}; expected one of {sorted(KINDS)}")
    return KINDS[kind]


# Architectures (config.json `model_type`) whose weights load into a HF Llama unchanged.
SUPPORTED_MODEL_TYPES = ("llama",)


def check_base_dir(path: str | Path, *, key: str = "base.path") -> dict:
    """Read `path/config.json` and refuse anything that is not a supported architecture,
    before any weight (or tokenizer) is loaded. Returns the parsed config.json.

    Raises `BaseModelError` with one line naming `key`: a missing directory, no config.json,
    invalid JSON, or another `model_type` (a GPT-2 directory would otherwise be instantiated
    as a Llama of the wrong shape).
    """
    from wmtp_fn.errors import BaseModelError

    path = Path(path)
    if not path.is_dir():
        raise BaseModelError(f"{key}: {str(path)!r} is not a directory (expected a HuggingFace model directory)")
    cfg_path = path / "config.json"
    if not cfg_path.is_file():
        raise BaseModelError(f"{key}: {str(path)!r} has no config.json (expected a HuggingFace model directory)")
    try:
        cfg = json.loads(cfg_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise BaseModelError(f"{key}: {cfg_path} is not valid JSON ({e})") from None
    model_type = cfg.get("model_type") if isinstance(cfg, dict) else None
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise BaseModelError(
            f"{key}: {str(path)!r} is a {model_type or 'unknown'} model; wmtp_fn supports "
            f"Llama-architecture models ({', '.join(SUPPORTED_MODEL_TYPES)}, and the MTP format)"
        )
    return cfg
